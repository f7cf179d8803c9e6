import sys, time, numpy as np, fastload
m = fastload.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
L=int(sys.argv[2])
rng=np.random.default_rng(0); ids=rng.integers(100, 40000, size=(1, L))
out=m.generate(ids, max_new_tokens=1, do_sample=False)
t=time.perf_counter(); m.generate(ids, max_new_tokens=65, min_new_tokens=65, do_sample=False); t1=time.perf_counter()-t
t=time.perf_counter(); m.generate(ids, max_new_tokens=1, do_sample=False); t0=time.perf_counter()-t
rss=[l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('Rss')][0]
print(f"{0:.3f} {64/(t1-t0):.1f} {int(rss)//1024}")
