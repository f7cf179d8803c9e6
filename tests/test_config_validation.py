"""Values from config.json, generation_config.json, the safetensors index and GGUF metadata are
checked (types, ranges, finiteness, divisibility, the shared limits of issue 7) before any
arithmetic: a bad value raises exactly CheckpointError naming the file and the key (and the limit
where one is exceeded); unsupported-but-valid values raise NotImplementedError. Before
fastload/checks.py these raised RecursionError, TypeError, ZeroDivisionError, OverflowError,
AttributeError, ValueError, NotImplementedError or loaded silently."""
import json
import shutil

import numpy as np
import pytest

import fastload
from gguf_util import GGML, GGUFWriter, T
from golden_util import model_dir

CheckpointError = fastload.CheckpointError
DROP = object()  # a value meaning "remove this key"


def copy_fixture(name, dst):
    for f in model_dir(name).iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "golden.json":
            shutil.copy(f, dst)
    return dst


def load(p):
    return fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map="cpu")


def edit(path, changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))  # allow_nan: NaN / Infinity literals, as Python's json reads them


def expect(exc, fn, *needles):
    with pytest.raises(Exception) as ei:
        fn()
    assert type(ei.value) is exc, f"{type(ei.value).__name__}: {ei.value}"
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# config.json (the Llama fixture: hidden 128, 4 heads, 2 kv heads, head_dim 32, 3 layers, vocab 512)
# ------------------------------------------------------------------------------------------------

LIM = "<= "
BAD_CONFIG = [
    # (case id, changes, key named in the message, extra text expected)
    # wrong type
    ("vocab_str", {"vocab_size": "512"}, "vocab_size", "'512'"),
    ("layers_float", {"num_hidden_layers": 3.0}, "num_hidden_layers", "integer"),
    ("layers_bool", {"num_hidden_layers": True}, "num_hidden_layers", "true"),
    ("hidden_list", {"hidden_size": [128]}, "hidden_size", "list"),
    ("heads_dict", {"num_attention_heads": {"n": 4}}, "num_attention_heads", "object"),
    ("kv_str", {"num_key_value_heads": "2"}, "num_key_value_heads", "integer"),
    ("head_dim_float", {"head_dim": 32.5}, "head_dim", "integer"),
    ("ffn_str", {"intermediate_size": "320"}, "intermediate_size", "integer"),
    ("maxpos_str", {"max_position_embeddings": "128"}, "max_position_embeddings", "integer"),
    ("eps_str", {"rms_norm_eps": "1e-5"}, "rms_norm_eps", "finite number"),
    ("eps_bool", {"rms_norm_eps": True}, "rms_norm_eps", "finite number"),
    ("theta_str", {"rope_theta": "10000"}, "rope_theta", "finite number"),
    ("rope_scaling_str", {"rope_scaling": "linear"}, "rope_scaling", "object"),
    ("rope_params_list", {"rope_parameters": [1, 2]}, "rope_parameters", "object"),
    ("rope_type_int", {"rope_parameters": {"rope_type": 3}}, "rope_parameters.rope_type", "string"),
    ("rope_factor_str", {"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "rope_parameters.factor", "finite"),
    ("rope_orig_float", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.5}},
     "rope_parameters.original_max_position_embeddings", "integer"),
    ("sliding_str", {"sliding_window": "4096"}, "sliding_window", "integer"),
    ("use_sliding_str", {"use_sliding_window": "yes"}, "use_sliding_window", "true or false"),
    ("mwl_str", {"max_window_layers": "2"}, "max_window_layers", "integer"),
    ("layer_types_str", {"layer_types": "full_attention"}, "layer_types", "list of strings"),
    ("layer_types_ints", {"layer_types": [1, 2, 3]}, "layer_types", "list of strings"),
    ("tie_str", {"tie_word_embeddings": "false"}, "tie_word_embeddings", "true or false"),
    ("tie_int", {"tie_word_embeddings": 0}, "tie_word_embeddings", "true or false"),
    ("attention_bias_str", {"attention_bias": "false"}, "attention_bias", "true or false"),
    ("act_list", {"hidden_act": ["silu"]}, "hidden_act", "string"),
    ("archs_str", {"architectures": "LlamaForCausalLM"}, "architectures", "list of strings"),
    ("archs_nested", {"architectures": [["LlamaForCausalLM"]]}, "architectures", "list of strings"),
    ("model_type_int", {"model_type": 5}, "model_type", "string"),
    ("dtype_int", {"dtype": 16}, "dtype", "string"),
    ("torch_dtype_list", {"torch_dtype": ["float16"]}, "torch_dtype", "string"),
    ("eos_str", {"eos_token_id": "2"}, "eos_token_id", "integer"),
    ("eos_list_str", {"eos_token_id": [2, "x"]}, "eos_token_id", "'x'"),
    ("eos_negative", {"eos_token_id": -5}, "eos_token_id", "-5"),  # -1 alone is the "none" sentinel
    ("bos_float", {"bos_token_id": 1.5}, "bos_token_id", "1.5"),
    ("pad_bool", {"pad_token_id": True}, "pad_token_id", "true"),
    ("bos_list", {"bos_token_id": [1, 2]}, "bos_token_id", "list"),
    # out of range / over a limit
    ("layers_zero", {"num_hidden_layers": 0}, "num_hidden_layers", "positive integer <= 1024"),
    ("layers_negative", {"num_hidden_layers": -3}, "num_hidden_layers", LIM + "1024"),
    ("layers_over", {"num_hidden_layers": 1025}, "num_hidden_layers", LIM + "1024"),
    ("heads_zero", {"num_attention_heads": 0, "head_dim": DROP}, "num_attention_heads", "positive integer <= 1024, got 0"),
    ("heads_over", {"num_attention_heads": 2048}, "num_attention_heads", LIM + "1024"),
    ("kv_zero", {"num_key_value_heads": 0}, "num_key_value_heads", LIM + "1024"),
    ("hidden_over", {"hidden_size": 131073}, "hidden_size", LIM + "131072"),
    ("hidden_zero", {"hidden_size": 0}, "hidden_size", LIM + "131072"),
    ("ffn_over", {"intermediate_size": 2**20 + 1}, "intermediate_size", LIM + "1048576"),
    ("vocab_over", {"vocab_size": 2**24 + 1}, "vocab_size", LIM + "16777216"),
    ("vocab_huge", {"vocab_size": 2**70}, "vocab_size", LIM + "16777216"),
    ("head_dim_over", {"head_dim": 2048}, "head_dim", LIM + "1024"),
    ("maxpos_over", {"max_position_embeddings": 2**31}, "max_position_embeddings", LIM + "2147483647"),
    ("maxpos_zero", {"max_position_embeddings": 0}, "max_position_embeddings", "positive"),
    ("eps_zero", {"rms_norm_eps": 0}, "rms_norm_eps", "(0, 1)"),
    ("eps_one", {"rms_norm_eps": 1.5}, "rms_norm_eps", "(0, 1)"),
    ("theta_negative", {"rope_theta": -5}, "rope_theta", "> 0"),
    ("rope_theta_in_params_zero", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     "rope_parameters.rope_theta", "> 0"),
    ("rope_factor_zero", {"rope_parameters": {"rope_type": "linear", "factor": 0}}, "rope_parameters.factor", "> 0"),
    ("rope_low_negative", {"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": -1}},
     "rope_scaling.low_freq_factor", "> 0"),
    ("sliding_negative", {"sliding_window": -1}, "sliding_window", "2147483647"),
    ("sliding_over", {"sliding_window": 2**31}, "sliding_window", "2147483647"),
    ("mwl_negative", {"max_window_layers": -1}, "max_window_layers", ">= 0"),
    # not finite (Python's json reads NaN / Infinity; 1e400 is inf; a 400-digit integer overflows float)
    ("eps_nan", {"rms_norm_eps": float("nan")}, "rms_norm_eps", "nan"),
    ("theta_inf", {"rope_theta": float("inf")}, "rope_theta", "inf"),
    ("theta_huge_int", {"rope_theta": 10**400}, "rope_theta", "bits"),
    ("rope_factor_inf", {"rope_parameters": {"rope_type": "linear", "factor": float("inf")}},
     "rope_parameters.factor", "inf"),
    ("rope_high_nan", {"rope_scaling": {"rope_type": "llama3", "factor": 8, "high_freq_factor": float("nan")}},
     "rope_scaling.high_freq_factor", "nan"),
    ("rope_orig_inf", {"rope_scaling": {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings":
                                        float("inf")}}, "rope_scaling.original_max_position_embeddings", "inf"),
    # relations between values
    ("kv_not_dividing", {"num_key_value_heads": 3}, "num_key_value_heads", "must divide"),
    ("kv_over_heads", {"num_key_value_heads": 8}, "num_key_value_heads", "must divide"),
    ("heads_not_dividing_hidden", {"head_dim": DROP, "num_attention_heads": 3, "num_key_value_heads": 1},
     "num_attention_heads", "must divide 'hidden_size' (128)"),
    ("head_dim_odd", {"head_dim": 33}, "head_dim", "even"),
    ("head_dim_odd_derived", {"head_dim": DROP, "hidden_size": 132, "num_attention_heads": 4}, "head_dim", "even"),
    ("layer_types_length", {"layer_types": ["full_attention"] * 2}, "layer_types", "num_hidden_layers=3"),
    ("llama3_high_not_above_low", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                       "high_freq_factor": 4.0}}, "high_freq_factor", "low_freq_factor"),
    # missing
    ("ffn_missing", {"intermediate_size": DROP}, "intermediate_size", "missing"),
    ("layers_null", {"num_hidden_layers": None}, "num_hidden_layers", "missing"),
]


@pytest.mark.parametrize("changes,key,extra", [c[1:] for c in BAD_CONFIG], ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_value(tmp_path, changes, key, extra):
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "config.json", changes)
    expect(CheckpointError, lambda: load(tmp_path), str(tmp_path / "config.json") + ":", f"'{key}'", extra)


GOOD_CONFIG = [
    ("float_fields_as_ints", {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000}}),
    ("none_means_default", {"tie_word_embeddings": None, "hidden_act": None, "sliding_window": None,
                            "max_position_embeddings": None, "rms_norm_eps": None, "pad_token_id": None}),
    ("eos_list", {"eos_token_id": [2, 3]}),
    ("eos_outside_vocab", {"eos_token_id": 100000}),  # transformers allows it; it never matches
    ("linear_rope_factor_int", {"rope_parameters": {"rope_type": "linear", "factor": 2, "rope_theta": 10000.0}}),
]


def test_pad_token_id_minus_one_means_none(tmp_path):
    """Early Llama conversions wrote "pad_token_id": -1 for "no pad token"; such checkpoints load, with
    the pad id unset (generate then pads with eos, as for a missing pad id). Other negatives stay errors."""
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "config.json", {"pad_token_id": -1})
    edit(tmp_path / "generation_config.json", {"pad_token_id": -1})
    m = load(tmp_path)
    assert m.generation_config.pad_token_id is None
    assert m.generate(np.array([[1, 5, 7]]), max_new_tokens=2).shape == (1, 5)
    edit(tmp_path / "config.json", {"pad_token_id": -2})
    expect(CheckpointError, lambda: load(tmp_path), "config.json", "'pad_token_id'")


@pytest.mark.parametrize("changes", [c[1] for c in GOOD_CONFIG], ids=[c[0] for c in GOOD_CONFIG])
def test_valid_config_values_still_load(tmp_path, changes):
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "config.json", changes)
    m = load(tmp_path)
    assert m.generate(np.array([[1, 5, 7]]), max_new_tokens=2).shape == (1, 5)


@pytest.mark.parametrize("layers", [10**6, 10**9, 10**18])
def test_huge_layer_count_fails_fast(tmp_path, layers):
    """Before: [0] * num_hidden_layers (and the tensor plan) were built before any limit. The refusal
    comes before anything of that size is built: Python's peak allocation stays small (no timing)."""
    import tracemalloc
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "config.json", {"num_hidden_layers": layers, "layer_types": DROP})
    tracemalloc.start()
    try:
        expect(CheckpointError, lambda: load(tmp_path), "config.json", "'num_hidden_layers'", "<= 1024")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"refusing {layers} layers allocated {peak} bytes first"


def test_unknown_layer_type_is_not_implemented(tmp_path):
    copy_fixture("qwen2", tmp_path)
    edit(tmp_path / "config.json", {"use_sliding_window": True, "sliding_window": 4,
                                    "layer_types": ["sliding_attention", "chunked_attention", "full_attention"]})
    expect(NotImplementedError, lambda: load(tmp_path), "config.json", "chunked_attention")


# ------------------------------------------------------------------------------------------------
# the JSON files themselves
# ------------------------------------------------------------------------------------------------
# (read by fastload/_files.py read_json, from the containment work; checked here for all three files
# the loader reads, next to the value checks that follow each read)

DEEP = '{"a": ' + "[" * 200000 + "]" * 200000 + "}"
BAD_JSON = [
    ("deep_nesting", DEEP, "nested too deeply"),
    ("huge_int_literal", '{"vocab_size": ' + "9" * 5000 + "}", "not valid JSON"),
    ("not_utf8", b'{"model_type": "\xff\xfe"}', "UTF-8"),
    ("top_level_list", "[1, 2, 3]", "JSON object"),
    ("top_level_number", "7", "JSON object"),
]


@pytest.mark.parametrize("fname", ["config.json", "generation_config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("content,extra", [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_json_file(tmp_path, fname, content, extra):
    copy_fixture("llama", tmp_path)
    p = tmp_path / fname
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect(CheckpointError, lambda: load(tmp_path), str(p) + ":", extra)


# ------------------------------------------------------------------------------------------------
# generation_config.json: checked at load, so generate() never meets a bad value from a file
# ------------------------------------------------------------------------------------------------

BAD_GENERATION = [
    ("temperature_str", {"temperature": "abc"}, "temperature", "'abc'"),
    ("temperature_negative", {"temperature": -1.0}, "temperature", ">= 0"),
    ("temperature_nan", {"temperature": float("nan")}, "temperature", "nan"),
    ("top_k_str", {"top_k": "5"}, "top_k", "integer"),
    ("top_k_float", {"top_k": 5.5}, "top_k", "integer"),
    ("top_p_over", {"top_p": 2}, "top_p", "<= 1"),
    ("top_p_zero", {"top_p": 0}, "top_p", "> 0"),
    ("rep_zero", {"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ("rep_inf", {"repetition_penalty": float("inf")}, "repetition_penalty", "inf"),
    ("max_length_negative", {"max_length": -1}, "max_length", ">= 0"),
    ("max_length_huge", {"max_length": 2**40}, "max_length", "2147483647"),
    ("max_new_float", {"max_new_tokens": 1.5}, "max_new_tokens", "integer"),
    ("min_new_str", {"min_new_tokens": "1"}, "min_new_tokens", "integer"),
    ("min_length_list", {"min_length": [1]}, "min_length", "integer"),
    ("do_sample_str", {"do_sample": "yes"}, "do_sample", "true or false"),
    ("num_beams_zero", {"num_beams": 0}, "num_beams", "positive integer"),
    ("nrs_str", {"num_return_sequences": "2"}, "num_return_sequences", "integer"),
    ("eos_str", {"eos_token_id": "2"}, "eos_token_id", "integer"),
    ("eos_list_negative", {"eos_token_id": [2, -7]}, "eos_token_id", "-7"),
    ("eos_empty_list", {"eos_token_id": []}, "eos_token_id", "non-empty"),
    ("pad_inf", {"pad_token_id": float("inf")}, "pad_token_id", "inf"),
    ("bos_dict", {"bos_token_id": {}}, "bos_token_id", "object"),
    ("sampling_at_temperature_zero", {"do_sample": True, "temperature": 0.0}, "temperature", "do_sample"),
    ("several_greedy_sequences", {"num_return_sequences": 3}, "num_return_sequences", "do_sample"),
    ("pad_list", {"pad_token_id": [0]}, "pad_token_id", "list"),
]


@pytest.mark.parametrize("changes,key,extra", [c[1:] for c in BAD_GENERATION], ids=[c[0] for c in BAD_GENERATION])
def test_bad_generation_config_value(tmp_path, changes, key, extra):
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "generation_config.json", changes)
    expect(CheckpointError, lambda: load(tmp_path), str(tmp_path / "generation_config.json") + ":", f"'{key}'", extra)


def test_valid_generation_config_values(tmp_path):
    copy_fixture("llama", tmp_path)
    edit(tmp_path / "generation_config.json", {"temperature": 1, "top_p": 1, "top_k": 0, "do_sample": False,
                                               "max_new_tokens": None, "eos_token_id": [2, 3]})
    assert load(tmp_path).generate(np.array([[1, 5]]), max_new_tokens=1).shape == (1, 3)


def test_generation_config_from_pretrained_checks(tmp_path):
    p = tmp_path / "generation_config.json"
    p.write_text(json.dumps({"temperature": "hot"}))
    expect(CheckpointError, lambda: fastload.GenerationConfig.from_pretrained(str(tmp_path)), str(p), "'temperature'")


# ------------------------------------------------------------------------------------------------
# GGUF metadata (values are typed by the file, so wrong types are possible there too)
# ------------------------------------------------------------------------------------------------

D, HEADS, KV, HD, FFN, VOCAB = 64, 4, 2, 16, 96, 32
GGUF_META = {
    "general.architecture": ("llama", T.STRING),
    "llama.block_count": (1, T.UINT32),
    "llama.embedding_length": (D, T.UINT32),
    "llama.attention.head_count": (HEADS, T.UINT32),
    "llama.attention.head_count_kv": (KV, T.UINT32),
    "llama.feed_forward_length": (FFN, T.UINT32),
    "llama.context_length": (128, T.UINT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
    "llama.rope.freq_base": (10000.0, T.FLOAT32),
    "tokenizer.ggml.eos_token_id": (2, T.UINT32),
    "tokenizer.ggml.bos_token_id": (1, T.UINT32),
}


def write_gguf(path, changes=None, extra=None):
    """A one-layer Llama GGUF (f32 weights) with metadata GGUF_META updated by changes
    ({key: (value, type)} or {key: DROP}); extra: {tensor name: float32 array} written too."""
    meta = dict(GGUF_META)
    for k, v in (changes or {}).items():
        if v is DROP:
            meta.pop(k, None)
        else:
            meta[k] = v
    w = GGUFWriter()
    for k, (v, t) in meta.items():
        if t == T.ARRAY:
            w.add(k, v[0], T.ARRAY, v[1])
        else:
            w.add(k, v, t)
    rng = np.random.default_rng(0)

    def t(name, *ne):
        w.add_tensor(name, (rng.standard_normal(int(np.prod(ne))) * 0.1).astype(np.float32), GGML.F32, list(ne))
    t("token_embd.weight", D, VOCAB)
    t("output_norm.weight", D)
    t("output.weight", D, VOCAB)
    for name, ne in (("attn_norm", (D,)), ("attn_q", (D, HEADS * HD)), ("attn_k", (D, KV * HD)),
                     ("attn_v", (D, KV * HD)), ("attn_output", (HEADS * HD, D)), ("ffn_norm", (D,)),
                     ("ffn_gate", (D, FFN)), ("ffn_up", (D, FFN)), ("ffn_down", (FFN, D))):
        t(f"blk.0.{name}.weight", *ne)
    for name, a in (extra or {}).items():
        a = np.asarray(a, np.float32)
        w.add_tensor(name, a.reshape(-1), GGML.F32, list(a.shape[::-1]))
    return w.write(str(path))


def test_gguf_baseline_loads(tmp_path):
    m = load(write_gguf(tmp_path / "m.gguf"))
    assert m.config["num_attention_heads"] == HEADS
    assert m.generate(np.array([[1, 5]]), max_new_tokens=2).shape == (1, 4)


BAD_GGUF = [
    # wrong type
    ("arch_uint", {"general.architecture": (5, T.UINT32)}, "general.architecture", "string"),
    ("arch_array", {"general.architecture": ((["llama"], T.STRING), T.ARRAY)}, "general.architecture", "string"),
    ("blocks_float", {"llama.block_count": (2.0, T.FLOAT32)}, "llama.block_count", "integer"),
    ("blocks_str", {"llama.block_count": ("1", T.STRING)}, "llama.block_count", "'1'"),
    ("blocks_bool", {"llama.block_count": (True, T.BOOL)}, "llama.block_count", "true"),
    ("heads_empty_array", {"llama.attention.head_count": (([], T.UINT32), T.ARRAY)}, "llama.attention.head_count",
     "list"),
    ("ffn_nan", {"llama.feed_forward_length": (float("nan"), T.FLOAT32)}, "llama.feed_forward_length", "integer"),
    ("eps_str", {"llama.attention.layer_norm_rms_epsilon": ("tiny", T.STRING)},
     "llama.attention.layer_norm_rms_epsilon", "finite number"),
    ("vocab_str", {"llama.vocab_size": ("x", T.STRING)}, "llama.vocab_size", "'x'"),
    ("tokens_not_array", {"tokenizer.ggml.tokens": ("abc", T.STRING)}, "tokenizer.ggml.tokens", "array"),
    ("sliding_str", {"llama.attention.sliding_window": ("x", T.STRING)}, "llama.attention.sliding_window", "integer"),
    ("rope_type_uint", {"llama.rope.scaling.type": (1, T.UINT32)}, "llama.rope.scaling.type", "string"),
    ("rope_factor_str", {"llama.rope.scaling.type": ("linear", T.STRING),
                         "llama.rope.scaling.factor": ("2", T.STRING)}, "llama.rope.scaling.factor", "finite"),
    ("eos_str", {"tokenizer.ggml.eos_token_id": ("x", T.STRING)}, "tokenizer.ggml.eos_token_id", "integer"),
    ("eos_float_inf", {"tokenizer.ggml.eos_token_id": (float("inf"), T.FLOAT32)}, "tokenizer.ggml.eos_token_id", "inf"),
    ("pad_negative", {"tokenizer.ggml.padding_token_id": (-1, T.INT32)}, "tokenizer.ggml.padding_token_id", "-1"),
    # out of range / over a limit
    ("blocks_zero", {"llama.block_count": (0, T.UINT32)}, "llama.block_count", "<= 1024"),
    ("blocks_huge", {"llama.block_count": (2**40, T.UINT64)}, "llama.block_count", "<= 1024"),
    ("heads_zero", {"llama.attention.head_count": (0, T.UINT32)}, "llama.attention.head_count", "<= 1024, got 0"),
    ("hidden_over", {"llama.embedding_length": (2**20, T.UINT32)}, "llama.embedding_length", "<= 131072"),
    ("ffn_over", {"llama.feed_forward_length": (2**21, T.UINT32)}, "llama.feed_forward_length", "<= 1048576"),
    ("context_over", {"llama.context_length": (2**40, T.UINT64)}, "llama.context_length", "<= 2147483647"),
    ("key_length_over", {"llama.attention.key_length": (4096, T.UINT32)}, "llama.attention.key_length", "<= 1024"),
    ("sliding_negative", {"llama.attention.sliding_window": (-5, T.INT32)}, "llama.attention.sliding_window", ">= 0"),
    ("vocab_rows_over", {"llama.vocab_size": (2**25, T.UINT32)}, "llama.vocab_size", "<= 16777216"),
    ("freq_base_negative", {"llama.rope.freq_base": (-1.0, T.FLOAT32)}, "llama.rope.freq_base", "> 0"),
    ("eps_zero", {"llama.attention.layer_norm_rms_epsilon": (0.0, T.FLOAT32)},
     "llama.attention.layer_norm_rms_epsilon", "(0, 1)"),
    # not finite
    ("eps_inf", {"llama.attention.layer_norm_rms_epsilon": (float("inf"), T.FLOAT32)},
     "llama.attention.layer_norm_rms_epsilon", "inf"),
    ("freq_base_nan", {"llama.rope.freq_base": (float("nan"), T.FLOAT64)}, "llama.rope.freq_base", "nan"),
    ("rope_factor_inf", {"llama.rope.scaling.type": ("linear", T.STRING),
                         "llama.rope.scaling.factor": (float("inf"), T.FLOAT32)}, "llama.rope.scaling.factor", "inf"),
    # relations
    ("kv_not_dividing", {"llama.attention.head_count_kv": (3, T.UINT32)}, "llama.attention.head_count_kv", "must divide"),
    ("heads_not_dividing_hidden", {"llama.attention.head_count": (3, T.UINT32), "llama.attention.head_count_kv":
                                   (1, T.UINT32)}, "llama.attention.head_count", "must divide 'llama.embedding_length'"),
    ("key_length_odd", {"llama.attention.key_length": (15, T.UINT32)}, "llama.attention.key_length", "even"),
    # missing
    ("blocks_missing", {"llama.block_count": DROP}, "llama.block_count", "missing"),
]


@pytest.mark.parametrize("changes,key,extra", [c[1:] for c in BAD_GGUF], ids=[c[0] for c in BAD_GGUF])
def test_bad_gguf_metadata(tmp_path, changes, key, extra):
    path = write_gguf(tmp_path / "m.gguf", changes)
    expect(CheckpointError, lambda: load(path), path + ":", f"'{key}'", extra)


def test_gguf_unsupported_rope_scaling_is_not_implemented(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"llama.rope.scaling.type": ("yarn", T.STRING)})
    expect(NotImplementedError, lambda: load(path), path, "'yarn'")


def _logits(path, ids=np.array([[1, 5, 9, 3, 7, 11, 2, 4, 8, 6, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])):
    return np.asarray(load(path)(ids).logits)


def test_gguf_rope_scaling_as_llama_cpp_reads_it(tmp_path):
    """llama.cpp's load_hparams: a missing rope.scaling.type is linear; the factor is rope.scaling.factor, else the old
    key rope.scale_linear; 0 or type "none" is no scaling. Both were ignored here when the type key was absent (bug hunt
    29 against llama.cpp: logits 1.4-3.6 std off, other greedy tokens)."""
    linear = _logits(write_gguf(tmp_path / "l.gguf", {"llama.rope.scaling.type": ("linear", T.STRING),
                                                      "llama.rope.scaling.factor": (4.0, T.FLOAT32)}))
    plain = _logits(write_gguf(tmp_path / "p.gguf"))
    assert not np.allclose(linear, plain, atol=1e-4)
    no_type = write_gguf(tmp_path / "n.gguf", {"llama.rope.scaling.factor": (4.0, T.FLOAT32)})
    assert load(no_type).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert np.array_equal(_logits(no_type), linear)
    assert np.array_equal(_logits(write_gguf(tmp_path / "o.gguf", {"llama.rope.scale_linear": (4.0, T.FLOAT32)})),
                          linear)
    for ch in ({"llama.rope.scaling.type": ("none", T.STRING), "llama.rope.scaling.factor": (4.0, T.FLOAT32)},
               {"llama.rope.scaling.factor": (0.0, T.FLOAT32)}):
        assert np.array_equal(_logits(write_gguf(tmp_path / "u.gguf", ch)), plain)
    both = write_gguf(tmp_path / "b.gguf", {"llama.rope.scaling.factor": (2.0, T.FLOAT32)},
                      extra={"rope_freqs.weight": _llama3_divisors(8.0, 1.0, 4.0, 16)})
    expect(NotImplementedError, lambda: load(both), both, "rope_freqs.weight", "linear rope scaling")


def test_gguf_keys_that_change_the_model_are_refused(tmp_path):
    """llama.cpp honours attention.causal = false (bidirectional attention) and rope.scaling.attn_factor (cos / sin
    scaled) on llama / qwen2 / qwen3; fastload ran such files as if the keys were absent (bug hunt 29)."""
    plain = _logits(write_gguf(tmp_path / "p.gguf"))
    p = write_gguf(tmp_path / "c.gguf", {"llama.attention.causal": (False, T.BOOL)})
    expect(NotImplementedError, lambda: load(p), p, "'llama.attention.causal'", "bidirectional")
    p = write_gguf(tmp_path / "a.gguf", {"llama.rope.scaling.attn_factor": (2.0, T.FLOAT32)})
    expect(NotImplementedError, lambda: load(p), p, "'llama.rope.scaling.attn_factor'", "1.0")
    for ch in ({"llama.attention.causal": (True, T.BOOL)}, {"llama.rope.scaling.attn_factor": (1.0, T.FLOAT32)}):
        assert np.array_equal(_logits(write_gguf(tmp_path / "ok.gguf", ch)), plain)
    fused = write_gguf(tmp_path / "f.gguf", extra={"blk.0.attn_qkv.weight": np.ones((HEADS * HD + 2 * KV * HD, D))})
    expect(NotImplementedError, lambda: load(fused), fused, "attn_qkv", "--fuse-qkv")


def test_gguf_per_layer_arrays(tmp_path):
    """head_count / head_count_kv / feed_forward_length may be one value a layer (llama.cpp's get_key_or_arr): equal
    values load as the one value; values that differ between layers are refused by name."""
    plain = _logits(write_gguf(tmp_path / "p.gguf"))
    arr = write_gguf(tmp_path / "a.gguf", {"llama.attention.head_count_kv": (([KV], T.UINT32), T.ARRAY),
                                           "llama.feed_forward_length": (([FFN], T.UINT32), T.ARRAY),
                                           "llama.attention.head_count": (([HEADS], T.UINT32), T.ARRAY)})
    assert load(arr).config["num_key_value_heads"] == KV
    assert np.array_equal(_logits(arr), plain)
    two = write_gguf(tmp_path / "t.gguf", {"llama.feed_forward_length": (([FFN, 2 * FFN], T.UINT32), T.ARRAY)})
    expect(NotImplementedError, lambda: load(two), two, "'llama.feed_forward_length'", "differs between layers")


def _llama3_divisors(factor, low, high, orig, theta=10000.0, hd=HD):
    """convert_hf_to_gguf's rope_freqs.weight for a llama3 rope_scaling (per-frequency divisors)."""
    wl = 2 * np.pi * theta ** (np.arange(0, hd, 2) / hd)
    smooth = (orig / wl - low) / (high - low)
    return np.where(wl < orig / high, 1.0, np.where(wl > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))


def test_gguf_rope_freqs_read_as_llama3_rope(tmp_path):
    """Llama 3.1 / 3.2 GGUFs carry their rope scaling as rope_freqs.weight, which was dropped silently (logits ~100%
    off at any length): read back as the llama3 rope_scaling that makes it, or refused."""
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
    path = write_gguf(tmp_path / "m.gguf", extra={"rope_freqs.weight": _llama3_divisors(8.0, 1.0, 4.0, 16)})
    m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="float32")
    assert m.config["rope_scaling"] == rs
    ids = np.array([[1, 5, 9, 3, 7, 11, 2, 4, 8, 6, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    plain = write_gguf(tmp_path / "p.gguf")
    want = fastload.AutoModelForCausalLM.from_pretrained(plain, device_map="cpu", torch_dtype="float32",
                                                         rope_scaling=rs)(ids).logits
    assert np.array_equal(np.asarray(m(ids).logits), np.asarray(want))
    unscaled = fastload.AutoModelForCausalLM.from_pretrained(plain, device_map="cpu", torch_dtype="float32")
    assert not np.allclose(np.asarray(unscaled(ids).logits), np.asarray(want), atol=1e-4)
    odd = write_gguf(tmp_path / "o.gguf", extra={"rope_freqs.weight": np.array([1, 1, 1, 1, 8, 8, 8, 8.0])})
    expect(NotImplementedError, lambda: load(odd), odd, "rope_freqs.weight")
    wrong = write_gguf(tmp_path / "w.gguf", extra={"rope_freqs.weight": np.ones(HD * 4)})  # refused before it is read
    expect(CheckpointError, lambda: load(wrong), wrong, "rope_freqs.weight", "head_dim / 2")
    flat = write_gguf(tmp_path / "f.gguf", {"llama.rope.freq_base": (1.0, T.FLOAT32)},  # equal wavelengths
                      extra={"rope_freqs.weight": np.array([1, 2, 3, 4, 5, 6, 7, 8.0])})
    expect(NotImplementedError, lambda: load(flat), flat, "rope_freqs.weight")


def test_gguf_tensors_it_would_drop_are_refused(tmp_path):
    """q/k/v biases on a llama GGUF (llama.cpp applies them), a partial rotary dimension count, any other tensor
    the model does not read: refused, naming it (they were dropped or ignored: another model than the file's)."""
    bias = write_gguf(tmp_path / "b.gguf", extra={"blk.0.attn_q.bias": np.zeros(HEADS * HD)})
    expect(NotImplementedError, lambda: load(bias), bias, "blk.0.attn_q.bias")
    rd = write_gguf(tmp_path / "r.gguf", {"llama.rope.dimension_count": (HD // 2, T.UINT32)})
    expect(NotImplementedError, lambda: load(rd), rd, "rope.dimension_count")
    assert load(write_gguf(tmp_path / "ok.gguf", {"llama.rope.dimension_count": (HD, T.UINT32)}))
    other = write_gguf(tmp_path / "x.gguf", extra={"blk.0.attn_sub_norm.weight": np.ones(D)})
    expect(NotImplementedError, lambda: load(other), other, "attn_sub_norm")


def test_gguf_unsupported_architecture_is_not_implemented(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": ("falcon", T.STRING)})
    expect(NotImplementedError, lambda: load(path), path, "'falcon'")


# ------------------------------------------------------------------------------------------------
# the schema itself
# ------------------------------------------------------------------------------------------------

def test_messages_name_key_and_limit():
    from fastload import checks
    with pytest.raises(CheckpointError) as ei:
        checks.check_config({"num_attention_heads": 0}, "/x/config.json")
    assert str(ei.value) == "/x/config.json: 'num_attention_heads' must be a positive integer <= 1024, got 0"


def test_message_does_not_echo_long_content():
    from fastload import checks
    with pytest.raises(CheckpointError) as ei:
        checks.check_config({"model_type": 0, "hidden_act": "x" * 10000}, "/x/config.json")
    assert len(str(ei.value)) < 200
    with pytest.raises(CheckpointError) as ei:
        checks.check_config({"architectures": "secret" * 1000}, "/x/config.json")
    assert "secret" not in str(ei.value) and "6000 characters" in str(ei.value)


# ------------------------------------------------------------------------------------------------
# from_pretrained's config arguments, and transformers' defaults for absent keys
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,key", [({"max_position_embeddings": -1}, "'max_position_embeddings'"),
                                    ({"rope_theta": "big"}, "'rope_theta'"),
                                    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "'rope_scaling.factor'")])
def test_bad_override_argument_is_the_callers_error(tmp_path, kw, key):
    """A bad config argument is a ValueError naming the argument: it used to be a CheckpointError blaming
    config.json (or, for a GGUF, a metadata key the caller never wrote)."""
    copy_fixture("llama", tmp_path)
    for p in (tmp_path, write_gguf(tmp_path / "m.gguf")):
        msg = expect(ValueError, lambda: fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map="cpu", **kw),
                     "from_pretrained", key, "argument")
        assert "config.json" not in msg and ".gguf" not in msg and "llama." not in msg, msg


def test_rope_theta_argument_reaches_rope_parameters(tmp_path):
    """rope_theta= over a transformers-5 config.json (the theta inside rope_parameters, read first) changes the
    model as it does over a top-level rope_theta; it was a silent no-op there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = copy_fixture("qwen2", tmp_path / "a"), copy_fixture("qwen2", tmp_path / "b")
    cfg = json.loads((b / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]  # the transformers-4 form of the same model
    (b / "config.json").write_text(json.dumps(cfg))
    ids = np.array([[3, 17, 230, 5, 9, 44, 61, 8]])
    la = np.asarray(load(a)(ids).logits)
    assert np.array_equal(la, np.asarray(load(b)(ids).logits))
    fa = fastload.AutoModelForCausalLM.from_pretrained(str(a), device_map="cpu", rope_theta=100.0)
    fb = fastload.AutoModelForCausalLM.from_pretrained(str(b), device_map="cpu", rope_theta=100.0)
    got = np.asarray(fa(ids).logits)
    assert np.array_equal(got, np.asarray(fb(ids).logits)) and not np.allclose(got, la, atol=1e-3)
    assert fa.config["rope_parameters"]["rope_theta"] == 100.0


def _core(cfg):
    from fastload import arch as archmod
    return archmod.core_config(cfg, archmod.arch_for(cfg, "config"), "config")


def test_absent_keys_take_transformers_class_defaults():
    """Keys a config.json leaves out mean what transformers' config classes default them to: Mixtral's
    rms_norm_eps 1e-5, Mistral's sliding_window 4096 (an explicit null: none), Qwen2 / Qwen3's max_window_layers 28;
    Qwen3-MoE slides every layer under use_sliding_window (its config class has no max_window_layers)."""
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 30,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    moe = {"num_local_experts": 4, "num_experts_per_tok": 2}
    assert _core({**base, **moe, "architectures": ["MixtralForCausalLM"]})["rms_eps"] == pytest.approx(1e-5)
    assert _core({**base, "architectures": ["LlamaForCausalLM"]})["rms_eps"] == pytest.approx(1e-6)
    assert _core({**base, "architectures": ["MistralForCausalLM"]})["window"] == [4096] * 30
    assert _core({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})["window"] == [0] * 30
    for a in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        w = _core({**base, "architectures": [a], "use_sliding_window": True, "sliding_window": 8})["window"]
        assert w == [0] * 28 + [8, 8], a
    q3 = {**base, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 16, "use_sliding_window": True, "sliding_window": 8}
    assert _core(q3)["window"] == [8] * 30
    assert _core({**q3, "max_window_layers": 1})["window"] == [8] * 30
    assert _core({**q3, "use_sliding_window": False})["window"] == [0] * 30
    expect(NotImplementedError, lambda: _core({**q3, "decoder_sparse_step": 40}), "decoder_sparse_step=40")
    # sliding_window absent under use_sliding_window: their config classes' 4096 (was no window at all)
    for a in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert _core({**base, "architectures": [a], "use_sliding_window": True})["window"] == [0] * 28 + [4096] * 2, a
        assert _core({**base, "architectures": [a]})["window"] == [0] * 30, a
    no_sw = {k: v for k, v in q3.items() if k != "sliding_window"}
    assert _core(no_sw)["window"] == [4096] * 30
    # Qwen3-MoE reads no layer_types (transformers' attention slides every layer), and has no head_dim default of
    # its own: hidden / heads, as its attention reads a config without the key (dense Qwen3: 128)
    assert _core({**q3, "layer_types": ["full_attention"] * 30})["window"] == [8] * 30
    assert _core(q3)["head_dim"] == 32 // 4
    assert _core({**base, "architectures": ["Qwen3ForCausalLM"]})["head_dim"] == 128


def test_llama3_rope_original_length_as_transformers_reads_it():
    """llama3 rope's original_max_position_embeddings: the config's top level first (transformers 5's
    standardize_rope_params), then the rope dict, then max_position_embeddings (it was the dict's or 8192)."""
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    orig = lambda c: _core(c)["rope_orig_max_pos"]
    assert orig({**base, "rope_scaling": rs}) == 2048
    assert orig({**base, "rope_scaling": {**rs, "original_max_position_embeddings": 1024}}) == 1024
    assert orig({**base, "original_max_position_embeddings": 512,
                 "rope_scaling": {**rs, "original_max_position_embeddings": 1024}}) == 512
    # neither: the config class's max_position_embeddings (was 8192 for every architecture)
    nomax = {k: v for k, v in base.items() if k != "max_position_embeddings"}
    assert orig({**nomax, "rope_scaling": rs}) == 2048
    assert orig({**nomax, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": rs}) == 32768
    assert orig({**nomax, "architectures": ["MistralForCausalLM"], "rope_scaling": rs}) == 131072
    # transformers raises on a dict without its factors (KeyError); fastload said factor 1 (linear: a no-op)
    for bad, key in (({"rope_type": "linear"}, "factor"), ({"rope_type": "dynamic"}, "factor"),
                     ({k: v for k, v in rs.items() if k != "factor"}, "factor"),
                     ({k: v for k, v in rs.items() if k != "low_freq_factor"}, "low_freq_factor")):
        expect(CheckpointError, lambda: _core({**base, "rope_scaling": bad}), f"needs '{key}'")


def test_more_class_defaults_and_rope_fields():
    """num_key_value_heads absent: the class's (Mistral / Mixtral 8, Qwen2 / Qwen3 32, Qwen3-MoE 4, Llama the heads),
    null: the heads; Mixtral's rope_theta 1e6; a mistral config with layer_types slides per layer (transformers builds
    it as Ministral); rope_parameters per layer type; partial_rotary_factor refused; a rope_scaling block without a
    theta takes config.json's top-level rope_theta before rope_parameters' (transformers' order)."""
    base = {"vocab_size": 64, "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 32}
    moe = {"num_local_experts": 4, "num_experts_per_tok": 2}
    q3m = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    for a, extra, kv in (("LlamaForCausalLM", {}, 32), ("MistralForCausalLM", {}, 8), ("MixtralForCausalLM", moe, 8),
                         ("Qwen2ForCausalLM", {}, 32), ("Qwen3ForCausalLM", {}, 32),
                         ("Qwen3MoeForCausalLM", q3m, 4)):
        c = {**base, **extra, "architectures": [a], "num_attention_heads": 16}
        assert _core(c)["n_kv_heads"] == (16 if a == "LlamaForCausalLM" else kv), a
        assert _core({**c, "num_key_value_heads": None})["n_kv_heads"] == 16, a
        assert _core({**c, "num_key_value_heads": 2})["n_kv_heads"] == 2, a
    assert _core({**base, **moe, "architectures": ["MixtralForCausalLM"]})["rope_theta"] == 1e6
    assert _core({**base, **moe, "architectures": ["MixtralForCausalLM"], "rope_theta": 5.0})["rope_theta"] == 5.0
    assert _core({**base, "architectures": ["MistralForCausalLM"]})["rope_theta"] == 10000.0
    m = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 7}
    assert _core({**m, "layer_types": ["full_attention", "sliding_attention"]})["window"] == [0, 7]
    assert _core({**m, "layer_types": ["full_attention"] * 2})["window"] == [0, 0]
    assert _core(m)["window"] == [7, 7]
    expect(NotImplementedError, lambda: _core({**m, "layer_types": ["full_attention", "chunked_attention"]}),
           "chunked_attention")
    lin = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    per = _core({**base, "architectures": ["LlamaForCausalLM"],
                 "rope_parameters": {"full_attention": lin, "sliding_attention": lin}})
    assert (per["rope_type"], per["rope_factor"], per["rope_theta"]) == (1, 2.0, 500.0)
    expect(NotImplementedError, lambda: _core({**base, "architectures": ["LlamaForCausalLM"], "rope_parameters": {
        "full_attention": lin, "sliding_attention": {**lin, "factor": 4.0}}}), "differ by layer type")
    for where in ({"partial_rotary_factor": 0.5}, {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}):
        expect(NotImplementedError, lambda: _core({**base, "architectures": ["LlamaForCausalLM"], **where}),
               "partial_rotary_factor=0.5")
    assert _core({**base, "architectures": ["LlamaForCausalLM"], "partial_rotary_factor": 1.0})["rope_type"] == 0
    th = _core({**base, "architectures": ["LlamaForCausalLM"], "rope_theta": 500.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (th["rope_theta"], th["rope_factor"]) == (500.0, 4.0)



def test_keys_a_transformers_class_does_not_read_are_not_refused():
    """Qwen2 / Mistral / Mixtral hard-code their biases and ignore attention_bias / mlp_bias; LlamaModel does not read
    layer_types; "attention" is transformers' legacy name of full_attention; yarn's beta_fast / mscale 0 read as unset.
    Each matched transformers 5.25's logits (hunt 27); Llama's and Qwen3's bias switches stay refused."""
    base = {"vocab_size": 64, "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1}
    for a in ("Qwen2ForCausalLM", "MistralForCausalLM"):
        assert _core({**base, "architectures": [a], "attention_bias": True, "mlp_bias": True}) == \
            _core({**base, "architectures": [a]}), a
    for a, k in (("LlamaForCausalLM", "attention_bias"), ("LlamaForCausalLM", "mlp_bias"),
                 ("Qwen3ForCausalLM", "attention_bias")):
        expect(NotImplementedError, lambda: _core({**base, "architectures": [a], k: True}), f"{k}=true")
    llama = {**base, "architectures": ["LlamaForCausalLM"]}
    assert _core({**llama, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8})["window"] == [0, 0]
    q2 = {**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 7}
    assert _core({**q2, "layer_types": ["attention", "sliding_attention"]})["window"] == [0, 7]
    y = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    ref = _core({**llama, "max_position_embeddings": 128, "rope_parameters": y})
    assert _core({**llama, "max_position_embeddings": 128, "rope_parameters": {**y, "beta_fast": 0}}) == ref
    assert _core({**llama, "max_position_embeddings": 128, "rope_parameters": {**y, "mscale": 1.0, "mscale_all_dim": 0}}) == ref
