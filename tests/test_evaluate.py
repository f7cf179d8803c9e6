"""fastload.evaluate.perplexity and `python -m fastload perplexity` (issue 9 part 5), on the tiny random qwen2
fixture with a byte-level tokenizer (one token per UTF-8 byte, so multi-byte characters make bytes != characters).

Every expected number here is computed independently of fastload/evaluate.py: log-softmax in float64 numpy over
model.forward's logits, windows written out by hand or taken from lm-evaluation-harness's own test of
get_rolling_token_windows, and transformers' strided recipe run literally with forward(labels=)."""
import io
import json
import math
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import fastload
from fastload import evaluate
from fastload.__main__ import main
from golden_util import model_dir

TEXT = "The cat sat on the mat.\nCafé, naïve — «déjà vu».  Tea?\n"  # 63 bytes; 13 words by re.split (12 + the
# empty string after the final newline, which the harness counts too)
BOS, EOS = 256, 257


def byte_tokenizer_json():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    # bytes_to_unicode order: byte b -> the character ByteLevel maps it to; ids 0..255 by byte value
    b2u = {}
    n = 0
    for b in range(256):
        if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255):
            b2u[b] = chr(b)
        else:
            b2u[b] = chr(256 + n)
            n += 1
    assert set(b2u.values()) == set(alphabet)
    vocab = {b2u[b]: b for b in range(256)}
    vocab["<s>"] = BOS
    vocab["</s>"] = EOS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>"])
    return tk.to_str()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl") / "qwen2"
    d.mkdir()
    for f in model_dir("qwen2").iterdir():
        if f.name in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(f, d)
    (d / "tokenizer.json").write_text(byte_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": False}))
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return fastload.AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="module")
def tok(ckpt):
    return fastload.AutoTokenizer.from_pretrained(str(ckpt))


def logprobs(model, inp):
    """log p(next | prefix) for every position of `inp`, float64 [T, vocab], straight from model.forward."""
    lg = np.asarray(model(np.asarray(inp, dtype=np.int64)[None]).logits[0], dtype=np.float64)
    mx = lg.max(-1, keepdims=True)
    return lg - mx - np.log(np.exp(lg - mx).sum(-1, keepdims=True))


def rel(a, b):
    return abs(a - b) / abs(b)


def test_tokenizer_fixture_is_bytes(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == list(TEXT.encode("utf-8")) and len(ids) == 63
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)


def test_single_window_equals_numpy(model, tok):
    """context >= tokens: one window, [bos] + tokens[:-1] predicting every token; all four numbers to 1e-9."""
    toks = list(TEXT.encode("utf-8"))
    lp = logprobs(model, [BOS] + toks[:-1])
    ll = float(lp[np.arange(len(toks)), toks].sum())
    words, nbytes = len(re.split(r"\s+", TEXT)), len(TEXT.encode("utf-8"))
    assert (words, nbytes) == (13, 63)
    r = evaluate.perplexity(model, tok, TEXT, context=100)
    assert r["method"] == "rolling" and r["windows"] == 1
    assert (r["tokens"], r["words"], r["bytes"]) == (63, 13, 63)
    assert rel(r["loglikelihood"], ll) < 1e-9
    assert rel(r["perplexity"], math.exp(-ll / 63)) < 1e-9
    assert rel(r["word_perplexity"], math.exp(-ll / words)) < 1e-9
    assert rel(r["byte_perplexity"], math.exp(-ll / nbytes)) < 1e-9
    assert rel(r["bits_per_byte"], -ll / (nbytes * math.log(2))) < 1e-9
    assert r["seconds"] > 0 and r["tokens_per_s"] > 0


def test_harness_gold_windows():
    """lm-evaluation-harness's own test of get_rolling_token_windows (34 tokens, max_seq_len 10, context_len 1):
    inputs [prefix, 0..8], [9..18], [19..28], [23..32] predicting [0..9], [10..19], [20..29], [30..33]."""
    got = [(list(range(s, e - 1)), list(range(f, e))) for s, e, f in evaluate.rolling_windows(34, 10)]
    assert got == [(list(range(-1, 9)), list(range(0, 10))), (list(range(9, 19)), list(range(10, 20))),
                   (list(range(19, 29)), list(range(20, 30))), (list(range(23, 33)), list(range(30, 34)))]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 10, 11, 19, 20, 21, 57])
@pytest.mark.parametrize("context", [2, 3, 10])
def test_rolling_windows_cover_every_token_once(n, context):
    seen = []
    for s, e, f in evaluate.rolling_windows(n, context):
        assert e - 1 - s <= context            # input length
        assert s <= f - 1 and f < e            # every target's previous position is in the input
        seen += range(f, e)
    assert seen == list(range(n))


def test_rolling_several_windows_by_hand(model, tok):
    """10 tokens, context 4: [bos,t0,t1,t2] -> t0..t3; [t3..t6] -> t4..t7; [t5..t8] -> t8,t9."""
    text = "abcdefghij"
    t = list(text.encode())
    ll = 0.0
    for inp, first_row, targets in (([BOS] + t[0:3], 0, t[0:4]), (t[3:7], 0, t[4:8]), (t[5:9], 2, t[8:10])):
        lp = logprobs(model, inp)
        ll += float(lp[np.arange(first_row, first_row + len(targets)), targets].sum())
    r = evaluate.perplexity(model, tok, text, context=4)
    assert r["windows"] == 3 and r["tokens"] == 10
    assert rel(r["loglikelihood"], ll) < 1e-9
    assert rel(r["word_perplexity"], math.exp(-ll / 1)) < 1e-9


def test_documents_are_pooled(model, tok):
    a, b = "one two three", "four\nfive"
    ra, rb = (evaluate.perplexity(model, tok, x, context=8) for x in (a, b))
    calls = []
    r = evaluate.perplexity(model, tok, [a, b], context=8, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(len(a), len(a) + len(b)), (len(a) + len(b), len(a) + len(b))]
    assert r["documents"] == 2 and r["words"] == 5 and r["bytes"] == len(a) + len(b)
    assert rel(r["loglikelihood"], ra["loglikelihood"] + rb["loglikelihood"]) < 1e-12
    assert rel(r["word_perplexity"], math.exp(-(ra["loglikelihood"] + rb["loglikelihood"]) / 5)) < 1e-12


def recipe(model, ids, max_length, stride):
    """transformers' guide "Perplexity of fixed-length models", literally, with numpy and fastload's forward(labels=)."""
    seq_len = len(ids)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = np.asarray(ids[begin_loc:end_loc])[None]
        target_ids = input_ids.copy()
        target_ids[:, :-trg_len] = -100
        loss = float(model(input_ids, labels=target_ids).loss)
        num_valid_tokens = int((target_ids != -100).sum())
        num_loss_tokens = num_valid_tokens - target_ids.shape[0]
        nll_sum += loss * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("context,stride", [(8, 3), (8, 8), (16, 5), (4, 1)])
def test_strided_matches_the_transformers_recipe(model, tok, context, stride):
    ids = tok(TEXT)["input_ids"]
    r = evaluate.perplexity(model, tok, TEXT, context=context, stride=stride)
    assert r["method"] == "strided" and r["stride"] == stride
    assert rel(r["recipe_perplexity"], recipe(model, ids, context, stride)) < 1e-5  # the loss is float32
    # the exact sum over the tokens the recipe scores: with overlap every token but the first, once
    ll, n = 0.0, 0
    prev = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        lp = logprobs(model, ids[begin:end])
        for j in range(max(prev - begin, 1), end - begin):
            ll += lp[j - 1, ids[begin + j]]
            n += 1
        prev = end
        if end == len(ids):
            break
    assert r["tokens"] == n
    if stride < context:
        assert n == len(ids) - 1
    assert rel(r["loglikelihood"], ll) < 1e-9
    assert rel(r["perplexity"], math.exp(-ll / n)) < 1e-9
    assert rel(r["bits_per_byte"], -ll / (63 * math.log(2))) < 1e-9


@pytest.mark.parametrize("kw,arg", [
    (dict(text=""), "text"), (dict(text=[]), "text"), (dict(text=["a", ""]), "text"),
    (dict(context=1), "context"), (dict(context=0), "context"), (dict(context=8, stride=9), "stride"),
    (dict(stride=0), "stride"),
])
def test_bad_input(model, tok, kw, arg):
    kw = dict(dict(text=TEXT, context=8), **kw)
    with pytest.raises(ValueError, match=arg):
        evaluate.perplexity(model, tok, kw.pop("text"), **kw)


def test_bad_types(model, tok):
    with pytest.raises(TypeError, match="text"):
        evaluate.perplexity(model, tok, b"bytes", context=8)
    with pytest.raises(TypeError, match="context"):
        evaluate.perplexity(model, tok, TEXT, context=8.0)


def test_default_context_is_the_harness_max_length(model, tok):
    assert evaluate.default_context(model, tok) == 128  # the fixture's max_position_embeddings
    r = evaluate.perplexity(model, tok, TEXT)
    assert r["context"] == 128 and r["windows"] == 1


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["perplexity", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli(model, tok, ckpt, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    ref = evaluate.perplexity(model, tok, TEXT, context=16)
    rc, out, _ = run_cli("--model", str(ckpt), "--file", str(f), "--device", "cpu", "--dtype", "float32",
                         "--context", "16")
    assert rc == 0
    for k in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        line = next(x for x in out.splitlines() if x.split()[0] == k)
        assert float(line.split()[1]) == pytest.approx(ref[k], rel=1e-4)
    rc, out, _ = run_cli("--model", str(ckpt), "--file", str(f), "--device", "cpu", "--dtype", "float32",
                         "--context", "16", "--stride", "5", "--json")
    assert rc == 0
    js = json.loads(out)
    ref = evaluate.perplexity(model, tok, TEXT, context=16, stride=5)
    assert js["method"] == "strided" and js["quant"] == "none" and js["device"] == "cpu"
    for k in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "recipe_perplexity"):
        assert js[k] == pytest.approx(ref[k], rel=1e-12)
    for k in ("tokens", "words", "bytes", "seconds", "tokens_per_s"):
        assert k in js


def test_cli_generate_options_stay_with_generate(ckpt):
    """Adding the perplexity command must leave generate's options alone (an edit once moved them under it)."""
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", "--model", str(ckpt), "--device", "cpu", "--prompt", "ab", "--raw", "--no-stream",
                   "--max-new-tokens", "2", "--seed", "1"])
    assert rc == 0
    with pytest.raises(SystemExit), redirect_stderr(io.StringIO()):
        main(["perplexity", "--model", str(ckpt), "--file", "x", "--max-new-tokens", "2"])


def test_cli_bad_input(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    for argv, msg in ((["--file", str(empty)], "empty"), (["--file", str(latin)], "UTF-8"),
                      (["--file", str(tmp_path / "missing.txt")], "missing.txt"),
                      (["--file", str(good), "--context", "1"], "--context"),
                      (["--file", str(good), "--context", "8", "--stride", "9"], "stride")):
        rc, out, err = run_cli("--model", str(ckpt), "--device", "cpu", *argv)
        assert rc == 2 and msg in err and out == ""


@pytest.mark.skipif(not fastload.cuda.is_available(),
                    reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))
def test_gpu_model_matches_cpu(ckpt, tok, model):
    gm = fastload.AutoModelForCausalLM.from_pretrained(str(ckpt), device_map="cuda", torch_dtype="float32")
    for kw in (dict(context=16), dict(context=16, stride=5)):
        a = evaluate.perplexity(model, tok, TEXT, **kw)
        b = evaluate.perplexity(gm, tok, TEXT, **kw)
        assert b["tokens"] == a["tokens"]
        assert rel(b["loglikelihood"], a["loglikelihood"]) < 1e-4


def test_committed_text_is_intact():
    """benchmarks/data/devils_dictionary.txt: at least 100 KB of UTF-8, the checksum its README records."""
    import hashlib
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = open(os.path.join(root, "benchmarks", "data", "devils_dictionary.txt"), "rb").read()
    text = data.decode("utf-8")
    assert len(data) >= 100_000 and "\r" not in text
    digest = hashlib.sha256(data).hexdigest()
    readme = open(os.path.join(root, "benchmarks", "data", "README.md"), encoding="utf-8").read()
    assert digest == "31443f0fb26e5e3bb84051c17e04b4bf3ad31604190598e4ccfd826fdd070bb4" and digest in readme
    assert (evaluate.count_words(text), evaluate.count_bytes(text)) == (60817, 382581)


def test_word_perplexity_past_float_range_is_inf(model, tok):
    """A text of one word (no whitespace, as CJK text) whose loss passes 709.78 nats a word: exp() overflows, which
    used to throw the whole result away (OverflowError); the figure is inf, the others as usual."""
    text = "é" * 400  # 800 byte tokens, one word
    r = evaluate.perplexity(model, tok, text, context=32)
    assert r["words"] == 1 and -r["loglikelihood"] > 710
    assert r["word_perplexity"] == math.inf
    assert math.isfinite(r["perplexity"]) and math.isfinite(r["bits_per_byte"])
    assert r["perplexity"] == pytest.approx(math.exp(-r["loglikelihood"] / r["tokens"]))


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_cli_user_errors_are_one_line_not_tracebacks(ckpt, tmp_path):
    """Every subcommand answers a user's error (a missing model, a bad flag value, a bad setting, text that is not
    UTF-8) with `python -m fastload CMD: error: ...` and exit 2, as argparse does, naming the flag typed: these were
    tracebacks for all but perplexity."""
    m = str(ckpt)
    cases = [
        (("generate", "--prompt", "hi", "--model", str(tmp_path / "nope")), "no such file"),
        (("generate", "--prompt", "hi", "--model", m, "--dtype", "float64"), "argument --dtype"),
        (("generate", "--prompt", "hi", "--model", m, "--device", "gpu"), "argument --device"),
        (("generate", "--prompt", "hi", "--model", m, "--raw", "--max-new-tokens", "-5"), "max_new_tokens"),
        (("generate", "--prompt", "hi", "--model", m, "--raw", "--sample", "--top-p", "2"), "top_p"),
        (("generate", "--prompt", "\udcff\udcfe", "--model", m, "--raw"), "--prompt is not valid UTF-8"),
        (("info", "--model", str(tmp_path / "nope")), "no such file"),
        (("serve", "--model", m, "--port", "99999"), "argument --port"),
        (("serve", "--model", m, "--log-level", "loud"), "argument --log-level"),
    ]
    for argv, want in cases:
        rc, out, err = _cli(*argv)
        assert rc == 2, (argv, rc, err)
        assert "Traceback" not in err and want in err, (argv, err)
        assert err.startswith(f"python -m fastload {argv[0]}: error:") or "usage:" in err, (argv, err)
    rc, out, _ = _cli("generate", "--prompt", "ab", "--model", m, "--device", "cpu", "--raw", "--no-stream",
                      "--max-new-tokens", str(2 ** 40))  # past int32: generation stops at the context, as any count
    assert rc == 0
