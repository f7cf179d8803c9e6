"""Sum ncu --csv gpu__time_duration per kernel name (first template argument kept): python3 kernel_table.py k.csv"""
import csv, sys, collections, re
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; ki = hdr.index("Kernel Name"); vi = hdr.index("Metric Value"); ui = hdr.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    name = re.sub(r"\(.*", "", r[ki]); name = re.sub(r"<(.{0,60}).*", r"<\1>", name)
    if "Grid Size" in hdr: name += " grid" + r[hdr.index("Grid Size")] + " blk" + r[hdr.index("Block Size")]
    v = float(r[vi].replace(",", "")); v = v / 1000 if r[ui] in ("nsecond", "ns") else v * (1000 if r[ui] == "msecond" else 1)
    tot[name] += v; cnt[name] += 1
allt = sum(tot.values())
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{v:10.1f} us {100*v/allt:5.1f}% {cnt[k]:6d}x {v/cnt[k]:8.2f} us/call  {k}")
print(f"total {allt:.1f} us")
