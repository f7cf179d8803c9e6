"""An independent float64 numpy reference of the ChatGLM2 / ChatGLM3 forward, written from the published
architecture (THUDM's modeling_chatglm.py read for the facts, none of its code):

  x = word_embeddings[ids]
  per layer:  h = rmsnorm(x) * input_layernorm;  [q | k | v] = h @ query_key_value.T + bias
              q: heads x kv_channels, k / v: multi_query_group_num x kv_channels (head j uses group j // (heads/groups))
              rotary on the first kv_channels/2 dims of each q / k head, pairs (2i, 2i+1), frequency
              1 / (10000 rope_ratio)^(2i / (kv_channels/2)), angle = position x frequency in float32, cos / sin of it
              (rounded to float16 / bfloat16 when `rope_dtype` says: ChatGLM's rope cache in the model dtype);
              the rest of the head passes through
              causal softmax(q k / sqrt(kv_channels)) v;  x += ctx @ dense.T
              h = rmsnorm(x) * post_attention_layernorm;  [g | u] = h @ dense_h_to_4h.T;  x += (silu(g) u) @ dense_4h_to_h.T
  logits = (rmsnorm(x) * final_layernorm) @ output_layer.T;  rmsnorm(x) = x / sqrt(mean(x^2) + layernorm_epsilon)
"""
import numpy as np

P = "transformer.encoder.layers.{i}."


def dims(cfg):
    nh, hd = cfg["num_attention_heads"], cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]
    ng = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else nh
    return nh, ng, hd


def random_weights(cfg, rng, scale=0.3):
    nh, ng, hd = dims(cfg)
    d, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    w = {"transformer.embedding.word_embeddings.weight": rng.normal(0, 1, (v, d)),
         "transformer.encoder.final_layernorm.weight": 1 + 0.1 * rng.normal(size=d),
         "transformer.output_layer.weight": rng.normal(0, scale, (v, d))}
    for i in range(cfg["num_layers"]):
        p = P.format(i=i)
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        w[p + "self_attention.query_key_value.weight"] = rng.normal(0, scale, ((nh + 2 * ng) * hd, d))
        if cfg.get("add_qkv_bias"):
            w[p + "self_attention.query_key_value.bias"] = rng.normal(0, 0.5, (nh + 2 * ng) * hd)
        w[p + "self_attention.dense.weight"] = rng.normal(0, scale, (d, nh * hd))
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        w[p + "mlp.dense_h_to_4h.weight"] = rng.normal(0, scale, (2 * f, d))
        w[p + "mlp.dense_4h_to_h.weight"] = rng.normal(0, scale, (d, f))
    return w


def rope_cache(cfg, positions, rope_dtype=None):
    """cos, sin: [T, kv_channels/4] (float64 holding float32 values, or float16 / bfloat16 ones)."""
    _, _, hd = dims(cfg)
    rd = hd // 2
    base = np.float32(10000.0 * float(cfg.get("rope_ratio", 1.0)))
    theta = (np.float32(1.0) / base ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))).astype(np.float32)
    ang = np.outer(np.asarray(positions, np.float32), theta).astype(np.float32)
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    if rope_dtype == "float16":
        c, s = c.astype(np.float16), s.astype(np.float16)
    elif rope_dtype == "bfloat16":  # round to nearest even on the float32 bits
        def bf(x):
            u = x.view(np.uint32).astype(np.uint64)
            return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
        c, s = bf(c), bf(s)
    return c.astype(np.float64), s.astype(np.float64)


def rotate(x, c, s):
    """x: [T, heads, hd]; the first hd/2 dims turned in pairs (2i, 2i+1)."""
    hd = x.shape[-1]
    rd = hd // 2
    out = x.copy()
    a, b = x[..., 0:rd:2], x[..., 1:rd:2]
    c, s = c[:, None, :], s[:, None, :]
    out[..., 0:rd:2] = a * c - b * s
    out[..., 1:rd:2] = b * c + a * s
    return out


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(w, cfg, ids, rope_dtype=None):
    """Logits [T, padded_vocab] (float64) of one sequence, positions 0..T-1."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    nh, ng, hd = dims(cfg)
    eps, f = cfg.get("layernorm_epsilon", 1e-5), cfg["ffn_hidden_size"]
    ids = list(ids)
    T = len(ids)
    c, s = rope_cache(cfg, range(T), rope_dtype)
    x = w["transformer.embedding.word_embeddings.weight"][ids]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg["num_layers"]):
        p = P.format(i=i)
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T
        if p + "self_attention.query_key_value.bias" in w:
            qkv = qkv + w[p + "self_attention.query_key_value.bias"]
        q = qkv[:, :nh * hd].reshape(T, nh, hd)
        k = qkv[:, nh * hd:(nh + ng) * hd].reshape(T, ng, hd)
        v = qkv[:, (nh + ng) * hd:].reshape(T, ng, hd)
        q, k = rotate(q, c, s), rotate(k, c, s)
        k, v = np.repeat(k, nh // ng, axis=1), np.repeat(v, nh // ng, axis=1)
        sc = np.einsum("thd,jhd->htj", q, k) / np.sqrt(hd)
        sc = np.where(causal[None], sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = np.einsum("htj,jhd->thd", pr, v).reshape(T, nh * hd)
        x = x + ctx @ w[p + "self_attention.dense.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        gu = h @ w[p + "mlp.dense_h_to_4h.weight"].T
        g, u = gu[:, :f], gu[:, f:]
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, w["transformer.encoder.final_layernorm.weight"], eps)
    return x @ w["transformer.output_layer.weight"].T


def greedy(w, cfg, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(forward(w, cfg, ids)[-1]))
        out.append(t)
        ids.append(t)
    return out
