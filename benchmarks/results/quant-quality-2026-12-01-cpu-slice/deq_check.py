"""Quantised kernels vs float on the dequantised weights: python3 deq_check.py int4 nf4 (see README.md here)."""
import sys, tempfile, os, json
import fastload
from fastload import evaluate
from fastload.demo import demo_model_path
g = demo_model_path()
tok = fastload.AutoTokenizer.from_pretrained(g)
text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data", "devils_dictionary.txt")).read()[:2000]
d = tempfile.mkdtemp()
ref = fastload.AutoModelForCausalLM.from_pretrained(g, device_map="cpu", torch_dtype="float16", quantization_config=fastload.QuantConfig(gguf="dequantize"))
ref.save_pretrained(d + "/ref"); del ref
out = {}
for s in sys.argv[1:]:
    q = fastload.AutoModelForCausalLM.from_pretrained(d + "/ref", device_map="cpu", torch_dtype="float16", quantization_config=s)
    rq = evaluate.perplexity(q, tok, text, context=256)
    q.save_pretrained(d + "/" + s); del q
    f = fastload.AutoModelForCausalLM.from_pretrained(d + "/" + s, device_map="cpu", torch_dtype="float32")
    rf = evaluate.perplexity(f, tok, text, context=256)
    out[s] = {"quantised_kernels_word_ppl": rq["word_perplexity"], "float_on_dequantised_word_ppl": rf["word_perplexity"]}
    print(s, out[s], flush=True)
