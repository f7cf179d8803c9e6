import sys, time, numpy as np, fastload
t=time.perf_counter()
m = fastload.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
tl=time.perf_counter()-t
ids = np.array([[1, 450, 4996, 17354, 1701]])
best=0
for i in range(3):
    t = time.perf_counter(); m.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False); best=max(best,64/(time.perf_counter()-t))
p = np.arange(1, 257)[None] + 200 + int(time.time()) % 97
t=time.perf_counter(); m.generate(p, max_new_tokens=1, do_sample=False); pp=256/(time.perf_counter()-t)
print(f"{tl:.3f} {best:.1f} {pp:.1f}")
