"""Why is the first of decode_ab's runs ~2% faster? 8 runs, with / without a pause, prefix caching on / off."""
import os, sys, time, json
import numpy as np
import fastload
mode = sys.argv[1]; pause = float(sys.argv[2])
kw = {} if mode == "bf16" else {"quantization_config": {"quant_method": "fastload", "scheme": mode}}
m = fastload.AutoModelForCausalLM.from_pretrained("/tmp/fl_qwen7b", device_map="cuda", torch_dtype="bfloat16", progress=False, **kw)
ids = np.random.default_rng(0).integers(100, 150000, size=(1, 32))
m.generate(ids, max_new_tokens=4, eos_token_id=[])
rates = []
for k in range(8):
    if pause: time.sleep(pause)
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, eos_token_id=[]); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); out = m.generate(ids, max_new_tokens=256, eos_token_id=[]); dt = time.perf_counter() - t0
    rates.append(round(256 / (dt - ttft), 1))
print(json.dumps({"mode": mode, "pause": pause, "env": {k: v for k, v in os.environ.items() if k.startswith("FASTLOAD_")}, "rates": rates}), flush=True)
