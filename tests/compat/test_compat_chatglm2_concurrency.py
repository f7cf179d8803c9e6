"""The ChatGLM2 concurrency script of the field reports: ChatGLM2-6B loaded as its README loads it
(THUDM/ChatGLM2-6B README.md: AutoTokenizer/AutoModel with trust_remote_code=True, device='cuda', .half(),
model.eval(), model.chat(tokenizer, query, history=[])), five queries answered in a for-loop and again through a
ThreadPoolExecutor, then torch.cuda's memory report; and the README's streaming loop over model.stream_chat
(cli_demo.py). Adapted: the import (fastload for transformers, fastload.cuda for torch.cuda), the model path,
DEVICE = "cuda" only when fastload.cuda.is_available() (the one change CI needs), English queries, and
max_new_tokens=24 on chat (ChatGLM's chat defaults to max_length=8192) to keep CI fast. Every wait is bounded."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastload as transformers
from fastload import cuda as torch_cuda  # the script's torch.cuda

AutoTokenizer = transformers.AutoTokenizer

QUERIES = ["What is 2+3?", "What is the capital of France?", "What is 10 minus 4?", "What colour is the sky?",
           "Say hello."]
WAIT = 300  # seconds: a bound on every wait, so that a regression fails instead of hanging CI


def chatglm2_script(path, max_workers):
    DEVICE = "cuda" if torch_cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = transformers.AutoModel.from_pretrained(path, trust_remote_code=True, device=DEVICE).half()
    model = model.eval()

    def ask(q):
        response, history = model.chat(tokenizer, q, history=[], max_new_tokens=24)
        return response

    t0 = time.time()
    loop = []
    for q in QUERIES:
        loop.append(ask(q))
    t_loop = time.time() - t0

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max_workers) as ex:
        pooled = list(ex.map(ask, QUERIES, timeout=WAIT))
    t_pool = time.time() - t0
    print(f"loop {t_loop:.2f} s, {max_workers} threads {t_pool:.2f} s ({t_loop / t_pool:.2f}x)")

    report = {"allocated": torch_cuda.memory_allocated() / 1024 ** 2,
              "max_allocated": torch_cuda.max_memory_allocated() / 1024 ** 2,
              "reserved": torch_cuda.memory_reserved() / 1024 ** 2,
              "max_reserved": torch_cuda.max_memory_reserved() / 1024 ** 2}
    if torch_cuda.is_available():
        report["device_name"] = torch_cuda.get_device_name(0)
    print(report)
    return model, tokenizer, loop, pooled, report


def test_chatglm2_loop_and_thread_pool(model_path):
    model, tokenizer, loop, pooled, report = chatglm2_script(model_path, max_workers=5)
    assert pooled == loop  # greedy: the same answers however the calls are scheduled
    assert all(r.strip() for r in loop)
    assert "Paris" in loop[1]
    assert str(model.device) == ("cuda:0" if torch_cuda.is_available() else "cpu")
    assert str(model.dtype).replace("torch.", "") == "float16"
    assert all(v >= 0 for k, v in report.items() if k != "device_name")
    if torch_cuda.is_available():
        assert report["allocated"] > 0 and isinstance(report["device_name"], str)


def test_chatglm2_stream_chat(model_path):
    """cli_demo.py's loop: print the new part of each (response, history) that stream_chat yields."""
    DEVICE = "cuda" if torch_cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model = transformers.AutoModel.from_pretrained(model_path, trust_remote_code=True, device=DEVICE)
    model = model.eval()
    query, history = "What is the capital of France?", []
    want, _ = model.chat(tokenizer, query, history=[], max_new_tokens=24)
    current_length, pieces, response = 0, [], ""
    for response, history in model.stream_chat(tokenizer, query, history=history, max_new_tokens=24):
        pieces.append(response[current_length:])
        current_length = len(response)
    assert response == want == "".join(pieces).strip()
    assert history == [(query, response)]
    # a second turn with that history is accepted and differs from a fresh start only in the prompt
    response2, history2 = model.chat(tokenizer, "And of Germany?", history=history, max_new_tokens=24)
    assert history2[:1] == history and history2[-1] == ("And of Germany?", response2) and response2.strip()


def test_chatglm2_readme_model_chains(model_path, tokenizer):
    """The README's ways to place the model: .half().cuda() on a GPU, .float() on a CPU without one; both
    change the weights as they say (a float32 load made .half() answers as a float16 load)."""
    if torch_cuda.is_available():
        model = transformers.AutoModel.from_pretrained(model_path, trust_remote_code=True).half().cuda()
        assert str(model.device).startswith("cuda") and str(model.dtype).endswith("float16")
        model = model.cpu()
        assert str(model.device) == "cpu"
    model = transformers.AutoModel.from_pretrained(model_path, trust_remote_code=True, torch_dtype="float16").float()
    assert str(model.dtype).endswith("float32")
    model = model.eval()
    r32, _ = model.chat(tokenizer, QUERIES[1], history=[], max_new_tokens=24)
    assert "Paris" in r32
    m = transformers.AutoModel.from_pretrained(model_path, trust_remote_code=True, torch_dtype="float32")
    assert m.half() is m or str(m.half().dtype).endswith("float16")
    m = m.half()
    assert str(m.dtype).endswith("float16")
    ref = transformers.AutoModel.from_pretrained(model_path, trust_remote_code=True, torch_dtype="float16")
    a, _ = m.chat(tokenizer, QUERIES[0], history=[], max_new_tokens=24)
    b, _ = ref.chat(tokenizer, QUERIES[0], history=[], max_new_tokens=24)
    assert a == b
    # chains that change nothing return a usable model
    m = m.to("cpu").eval().train(False).to(m.dtype)
    assert str(m.device) == "cpu" and str(m.dtype).endswith("float16")
    assert m.chat(tokenizer, QUERIES[0], history=[], max_new_tokens=24)[0] == a
