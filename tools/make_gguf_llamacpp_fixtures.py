"""Write tests/fixtures/gguf_llamacpp/*.json: what llama.cpp's tokenizer makes of a set of texts, for GGUF vocabularies
of several kinds, so that tests/test_gguf_llamacpp.py can hold fastload.gguf_tokenizer to llama.cpp (the GGUF
format's own runtime) without llama.cpp in CI.

    python tools/make_gguf_llamacpp_fixtures.py NAME=FILE.gguf ... [--demo DEMO.gguf]

Needs llama-cpp-python (llama_cpp.Llama(path, vocab_only=True)) and fastload (to read the file's metadata). For
each NAME=FILE it writes NAME.json: the file's tokenizer.* metadata (and general.architecture) and, for every text,
llama.cpp's ids with and without its special tokens (tokenize(text, add_bos=..., special=True)). --demo writes
demo.json with the ids only (the demo GGUF is downloaded where the tests run).

The GGUFs used (2026-12-06, llama-cpp-python 0.3.36): tiny models whose vocabularies were trained with HF
`tokenizers` on a few hundred KB of mixed text and written as convert_hf_to_gguf writes them (byte-level BPE with
tokenizer.ggml.pre "smollm", "llama-bpe" with and without add_bos_token, "deepseek-coder", "deepseek-llm",
"falcon", "default"; 2026-12-07: "seed-coder", trained with Seed-Coder's own split regex, and "mellum" (one of the names llama.cpp reads as GPT-2's split) on a Llama-3-split vocabulary; a sentencepiece "llama" vocabulary with byte fallback, with and without add_space_prefix)."""
import json
import os
import sys

TEXTS = [
    "Hello world", " Hello world", "  Hello  world  ", "hello\nworld", "\n\nfoo\n", "\t\tindent\tx",
    "12345", "1234567890", "3.14159", "year 2024, 1,000,000", "x1y22z333", " 42", "  indented code",
    "def f(x):\n    return x**2  # square\n", "for (int i=0;i<10;i++){printf(\"%d\\n\",i);}",
    "naïve café résumé", "日本語のテキスト", "中文测试，标点。", "한국어 텍스트", "Привет мир", "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦", "ﬁ ligature", "Ａｂｃ fullwidth", "e\u0301 combining",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "text<|endoftext|>more", "<s> </s> <unk>",
    " <|im_start|> ", "I'm you're they've we'll he'd IT'S", "DON'T", "   ", " ", "a", "\u00a0nbsp\u00a0",
    "tabs\t\t\tand   spaces    mixed \t \n", "\r\nwindows\r\nlines", "https://example.com/path?q=1&r=2#frag",
    "$ echo $HOME && ls -la | grep '.py'", "{\"key\": [1, 2, 3], \"v\": null}", "a\u2581b", "\u2581\u2581lead",
    "1+1=2", "-42", "0.000001", "١٢٣ arabic digits", "①②③", "½ ¾", " ¼", "x²", "x ² y", "ℕ ⊆ ℝ",
    "      lots of leading spaces", "trailing spaces      ", "\n\n\n\n", "word\n\n\nword", "Mr. Smith's dog's bone",
    "\"\"\"docstring\"\"\"", "!!!???", "ΑΒΓ αβγ", "ñ Ñ ç Ç ß ẞ", "İstanbul ıi", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def main(argv):
    import llama_cpp
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fastload import _C
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf_llamacpp")
    os.makedirs(out_dir, exist_ok=True)
    jobs, demo = [], None
    it = iter(argv)
    for a in it:
        if a == "--demo":
            demo = next(it)
        else:
            name, path = a.split("=", 1)
            jobs.append((name, path))
    if demo:
        jobs.append(("demo", demo))
    for name, path in jobs:
        lm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
        cases = [{"text": t, "ids": lm.tokenize(t.encode("utf-8"), add_bos=False, special=True),
                  "ids_special": lm.tokenize(t.encode("utf-8"), add_bos=True, special=True)} for t in TEXTS]
        rec = {"source": os.path.basename(path), "llama_cpp_python": llama_cpp.__version__, "cases": cases}
        if name != "demo":
            with _C.GGUFFile(path) as f:
                meta = f.metadata
            rec["metadata"] = {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}
            rec["metadata"].pop("tokenizer.chat_template", None)
        with open(os.path.join(out_dir, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(rec, f, ensure_ascii=False, separators=(",", ":"))
        print(name, os.path.getsize(os.path.join(out_dir, name + ".json")), "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
