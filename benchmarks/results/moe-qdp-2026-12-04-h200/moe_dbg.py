import sys, os, json
sys.path[:0] = ["tests", "."]
import numpy as np, fastload, tempfile
src = open("tests/test_cuda_quant.py").read()
i = src.index("def _wide_mixtral"); j = src.index("_MOE_CODE = (")
ns = {"np": np, "os": os}; exec(src[i:j], ns)
p = sys.argv[1]
if not os.path.exists(p + "/config.json"):
    ns["_wide_mixtral"](p)
ids = np.random.default_rng(0).integers(3, 320, size=(8, 5))
res = {}
for s in ("int4", "int8", "nf4"):
    m = fastload.AutoModelForCausalLM.from_pretrained(p, device_map="cuda", torch_dtype="bfloat16",
                                                      quantization_config={"quant_method": "fastload", "scheme": s})
    lay = [(l["name"], l["dtype"], l["group_size"], l.get("bytes")) for l in m._core.layouts() if "moe_w" in l["name"]][:2]
    res[s] = {"lay": lay, "b1": np.asarray(m(ids[:1, :1]).logits, np.float32).ravel()[:6].tolist(),
              "b3": float(np.abs(np.asarray(m(ids[:3, :1]).logits, np.float32)).sum()),
              "gen": m.generate(ids[:1], max_new_tokens=6, eos_token_id=[]).tolist()}
print(json.dumps({"env": os.environ.get("FASTLOAD_MOE_QDP"), "res": res}))
