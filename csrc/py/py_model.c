/* py_model.c: fastload._C.Model: create from a config dict, load tensors from opened checkpoint
 * files, and the model's engine (csrc/engine.h), which runs every forward and generate. The GIL is released during
 * all core work; one lock per model serialises loading and engine creation, and the engine's driver is the only
 * thread that runs forward passes on the model's workspace. */
#include "py_common.h"
#include "py_exec.h"
#include "py_engine.h"
#include "pythread.h"
#include "../sampling.h"
#include <float.h>
#include <math.h>

typedef struct {
    PyObject_HEAD
    fl_model *m;
    fl_backend *be;
    PyThread_type_lock lock;
    unsigned long owner; /* thread holding `lock` (GIL held to read or write) */
    int depth;           /* calls of `owner` in progress: > 1 when a callback called this model again */
    int loading;         /* the outermost call is load */
    fl_engine *eng;      /* continuous batching (engine_start), or NULL */
    int eng_auto;        /* eng was started by forward() with the defaults and no pool (a direct _C caller) */
    int n_fwd;           /* calls using eng with the GIL released (forward, engine_pool; GIL held to change):
                          * engine_stop refuses while any is in flight (a forward's request lives in eng) */
} FlPyModel;

/* CPU models run their core calls on the process-wide compute thread (py_exec.c): one OpenMP
 * team, whichever Python thread calls. CUDA models run on the caller's thread. */
static int on_compute_thread(const FlPyModel *self) { return self->be->host_memory && !strcmp(self->be->name, "cpu"); }

static void model_dealloc(FlPyModel *self) {
    if (self->eng) { /* no Request holds this model any more: every request is released */
        fl_engine *e = self->eng;
        self->eng = NULL;
        Py_BEGIN_ALLOW_THREADS
        fl_engine_free(e);
        Py_END_ALLOW_THREADS
    }
    if (self->m) fl_model_free(self->m);
    if (self->be) self->be->destroy(self->be);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Config values arrive from config.json / GGUF metadata (through fastload/arch.py) or from any
 * caller of fastload._C.Model: a value of the wrong type, or one that does not fit a C int, is a
 * CheckpointError (a ValueError) naming the key, never a TypeError / OverflowError or a silent truncation. The
 * ranges themselves are checked by fl_model_create (check_config in model.c). */
/* The config.json spelling of a key of the dict fastload/arch.py builds, for messages. */
static const char *hf_key(const char *k) {
    static const char *const map[][2] = {
        {"vocab", "vocab_size"}, {"d", "hidden_size"}, {"n_layers", "num_hidden_layers"},
        {"n_heads", "num_attention_heads"}, {"n_kv_heads", "num_key_value_heads"}, {"head_dim", "head_dim"},
        {"ffn", "intermediate_size"}, {"max_pos", "max_position_embeddings"}, {"rms_eps", "rms_norm_eps"},
        {"rope_theta", "rope_theta"}, {"rope_factor", "rope_scaling.factor"},
        {"rope_low_freq_factor", "rope_scaling.low_freq_factor"},
        {"rope_high_freq_factor", "rope_scaling.high_freq_factor"},
        {"rope_orig_max_pos", "rope_scaling.original_max_position_embeddings"},
        {"rope_attn_factor", "rope_scaling.attention_factor"},
        {"tie_embeddings", "tie_word_embeddings"}, {"window", "sliding_window"},
        {"n_experts", "num_local_experts"}, {"top_k", "num_experts_per_tok"}, {"moe_norm_topk", "norm_topk_prob"},
        {"moe_ffn", "moe_intermediate_size"}, {"shared_ffn", "shared_expert_intermediate_size"},
    };
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (!strcmp(map[i][0], k)) return map[i][1];
    return k;
}

static int get_int(PyObject *d, const char *k, int *out, int required, int dflt) {
    PyObject *v = PyDict_GetItemString(d, k);
    if (!v || v == Py_None) {
        if (required) { PyErr_Format(FlCheckpointError, "model config is missing '%s' (%s)", k, hf_key(k)); return -1; }
        *out = dflt; return 0;
    }
    if (!PyLong_Check(v)) {
        PyErr_Format(FlCheckpointError, "model config '%s' (%s) must be an integer, not %.100s", k, hf_key(k), Py_TYPE(v)->tp_name);
        return -1;
    }
    int ovf = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &ovf);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (ovf || x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(FlCheckpointError, "model config '%s' (%s) is out of range (does not fit in a 32-bit int)", k, hf_key(k));
        return -1;
    }
    *out = (int)x;
    return 0;
}
static int get_float(PyObject *d, const char *k, float *out, float dflt) {
    PyObject *v = PyDict_GetItemString(d, k);
    if (!v || v == Py_None) { *out = dflt; return 0; }
    if (!PyFloat_Check(v) && !PyLong_Check(v)) {
        PyErr_Format(FlCheckpointError, "model config '%s' (%s) must be a number, not %.100s", k, hf_key(k), Py_TYPE(v)->tp_name);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        x = HUGE_VAL; /* an int too large for a double: rejected as not finite by check_config */
    }
    if (isfinite(x) && (x > FLT_MAX || x < -FLT_MAX)) x = x > 0 ? HUGE_VAL : -HUGE_VAL;
    *out = (float)x;
    return 0;
}

static fl_dtype parse_dtype(const char *s) {
    if (!strcmp(s, "float32")) return FL_F32;
    if (!strcmp(s, "float16")) return FL_F16;
    if (!strcmp(s, "bfloat16")) return FL_BF16;
    return FL_DTYPE_INVALID;
}

/* Model(quant=...): {"scheme": "int8"|"int4"|"nf4"|"none", "group_size": int (0: the scheme's default),
 * "lm_head": scheme (default: "int8" when scheme is int4 / nf4, else scheme), "lm_head_group": int,
 * "gguf": "keep"|"dequantize"}. None values mean the default. */
static int quant_scheme(PyObject *v, const char *key, int *out) {
    static const char *const names[] = {"none", "int8", "int4", "nf4"};
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (!s) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "quant['%s'] must be one of 'int8', 'int4', 'nf4', 'none', not %.100R", key, v);
        return -1;
    }
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, names[i])) { *out = i; return 0; } /* FL_QS_NONE, FL_QS_INT8, FL_QS_INT4, FL_QS_NF4 */
    PyErr_Format(PyExc_ValueError, "quant['%s'] = '%s' is not one of 'int8', 'int4', 'nf4', 'none'", key, s);
    return -1;
}
static int quant_int(PyObject *v, const char *key, int *out) {
    int ovf = 0;
    long long x = PyLong_Check(v) && !PyBool_Check(v) ? PyLong_AsLongLongAndOverflow(v, &ovf) : -1;
    if (x == -1 && PyErr_Occurred()) return -1;
    if (!PyLong_Check(v) || PyBool_Check(v) || ovf || x < 0 || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "quant['%s'] must be an integer >= 0 (0: the default), not %.100R", key, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}
static int parse_quant(PyObject *q, fl_quant_cfg *c) {
    memset(c, 0, sizeof *c);
    if (!q || q == Py_None) return 0;
    if (!PyDict_Check(q)) { PyErr_Format(PyExc_TypeError, "quant must be a dict or None, not %.100s", Py_TYPE(q)->tp_name); return -1; }
    static const char *const known[] = {"scheme", "group_size", "lm_head", "lm_head_group", "gguf"};
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(q, &pos, &k, &v)) {
        const char *ks = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        int ok = 0;
        for (size_t i = 0; ks && i < sizeof known / sizeof *known; i++) ok |= !strcmp(ks, known[i]);
        if (!ok) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "quant: unknown key %.100R (known: scheme, group_size, lm_head, lm_head_group, gguf)", k);
            return -1;
        }
    }
    PyObject *sc = PyDict_GetItemString(q, "scheme"), *g = PyDict_GetItemString(q, "group_size"),
             *lh = PyDict_GetItemString(q, "lm_head"), *lg = PyDict_GetItemString(q, "lm_head_group"),
             *gg = PyDict_GetItemString(q, "gguf");
    if (sc && sc != Py_None && quant_scheme(sc, "scheme", &c->scheme) < 0) return -1;
    if (g && g != Py_None && quant_int(g, "group_size", &c->group_size) < 0) return -1;
    c->lm_head = c->scheme == FL_QS_INT4 || c->scheme == FL_QS_NF4 ? FL_QS_INT8 : c->scheme;
    if (lh && lh != Py_None && quant_scheme(lh, "lm_head", &c->lm_head) < 0) return -1;
    if (lg && lg != Py_None && quant_int(lg, "lm_head_group", &c->lm_head_group) < 0) return -1;
    if (gg && gg != Py_None) {
        const char *s = PyUnicode_Check(gg) ? PyUnicode_AsUTF8(gg) : NULL;
        if (s && !strcmp(s, "keep")) c->gguf_dequantize = 0;
        else if (s && !strcmp(s, "dequantize")) c->gguf_dequantize = 1;
        else {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "quant['gguf'] must be 'keep' or 'dequantize', not %.100R", gg);
            return -1;
        }
    }
    return 0;
}

/* Model(config: dict, dtype: str, device: str, threads: int, quant: dict | None) */
static int model_init(FlPyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "dtype", "device", "threads", "quant", NULL};
    PyObject *cfgd, *quant = Py_None;
    const char *dtype = "float32", *device = "cpu";
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|ssiO", kwlist, &PyDict_Type, &cfgd, &dtype, &device, &threads, &quant)) return -1;
    if (threads < 0 || threads > 4096) { /* libgomp exits the process when it cannot create the threads asked for */
        PyErr_Format(PyExc_ValueError, "Model: threads=%d is out of range (0: all cores, else 1 .. 4096)", threads);
        return -1;
    }
    fl_quant_cfg qc;
    if (parse_quant(quant, &qc) < 0) return -1;
    fl_config c;
    memset(&c, 0, sizeof c);
    if (get_int(cfgd, "vocab", &c.vocab, 1, 0) || get_int(cfgd, "d", &c.d, 1, 0) ||
        get_int(cfgd, "n_layers", &c.n_layers, 1, 0) || get_int(cfgd, "n_heads", &c.n_heads, 1, 0) ||
        get_int(cfgd, "n_kv_heads", &c.n_kv_heads, 1, 0) || get_int(cfgd, "head_dim", &c.head_dim, 1, 0) ||
        get_int(cfgd, "ffn", &c.ffn, 1, 0) || get_int(cfgd, "max_pos", &c.max_pos, 0, 0) ||
        get_float(cfgd, "rms_eps", &c.rms_eps, 1e-6f) || get_float(cfgd, "rope_theta", &c.rope_theta, 10000.f) ||
        get_int(cfgd, "rope_type", &c.rope_type, 0, FL_ROPE_DEFAULT) || get_float(cfgd, "rope_factor", &c.rope_factor, 1.f) ||
        get_float(cfgd, "rope_low_freq_factor", &c.rope_low_freq_factor, 1.f) ||
        get_float(cfgd, "rope_high_freq_factor", &c.rope_high_freq_factor, 4.f) ||
        get_int(cfgd, "rope_orig_max_pos", &c.rope_orig_max_pos, 0, 8192) ||
        get_float(cfgd, "rope_attn_factor", &c.rope_attn_factor, 1.f) ||
        get_int(cfgd, "rope_dims", &c.rope_dims, 0, 0) || get_int(cfgd, "rope_interleaved", &c.rope_interleaved, 0, 0) ||
        get_int(cfgd, "rope_round", &c.rope_round, 0, 0) ||
        get_int(cfgd, "qkv_bias", &c.qkv_bias, 0, 0) || get_int(cfgd, "qk_norm", &c.qk_norm, 0, 0) ||
        get_int(cfgd, "tie_embeddings", &c.tie_embeddings, 0, 0) || get_int(cfgd, "n_experts", &c.n_experts, 0, 0) ||
        get_int(cfgd, "top_k", &c.top_k, 0, 0) || get_int(cfgd, "moe_norm_topk", &c.moe_norm_topk, 0, 0) ||
        get_int(cfgd, "moe_ffn", &c.moe_ffn, 0, 0) || get_int(cfgd, "shared_ffn", &c.shared_ffn, 0, 0))
        return -1;
    if (c.n_layers <= 0 || c.n_layers > FL_MAX_LAYERS) { PyErr_Format(FlCheckpointError, "config: num_hidden_layers=%d must be in [1, %d]", c.n_layers, FL_MAX_LAYERS); return -1; }
    PyObject *win = PyDict_GetItemString(cfgd, "window");
    if (win && win != Py_None) {
        PyObject *seq = PySequence_Fast(win, "model config 'window' must be a sequence of ints");
        if (!seq) return -1;
        if (PySequence_Fast_GET_SIZE(seq) != c.n_layers) {
            Py_DECREF(seq);
            PyErr_Format(FlCheckpointError, "model config 'window' has %zd entries for %d layers", PySequence_Fast_GET_SIZE(seq), c.n_layers);
            return -1;
        }
        for (int l = 0; l < c.n_layers; l++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, l);
            int ovf = 0;
            long long w = PyLong_Check(item) ? PyLong_AsLongLongAndOverflow(item, &ovf) : 0;
            if (w == -1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
            if (!PyLong_Check(item) || ovf || w > INT32_MAX) {
                Py_DECREF(seq);
                PyErr_Format(FlCheckpointError, "model config 'window'[%d] must be an integer in [0, 2^31-1]", l);
                return -1;
            }
            c.window[l] = w < 0 ? 0 : (int)w; /* negative: full attention, as before */
        }
        Py_DECREF(seq);
    }
    if (c.rope_type < FL_ROPE_DEFAULT || c.rope_type > FL_ROPE_DYNAMIC) { PyErr_SetString(FlCheckpointError, "config: unknown rope_type"); return -1; }
    fl_dtype wd = parse_dtype(dtype);
    if (wd == FL_DTYPE_INVALID) { PyErr_Format(PyExc_ValueError, "dtype '%s' is not one of float32, float16, bfloat16", dtype); return -1; }
    fl_status st;
    if (!strcmp(device, "cpu")) st = fl_backend_cpu_create(threads, &self->be);
    else if (!strncmp(device, "cuda", 4)) {
        int dev = 0;
        if (device[4] == ':') dev = atoi(device + 5);
        st = fl_backend_cuda_create(dev, wd, &self->be); /* activations in the weight dtype */
    } else { PyErr_Format(PyExc_ValueError, "device '%s' is not 'cpu' or 'cuda[:N]'", device); return -1; }
    if (st != FL_OK) { fl_py_raise(st); return -1; }
    Py_BEGIN_ALLOW_THREADS
    st = fl_model_create(&c, wd, self->be, &self->m);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) { fl_py_raise(st); return -1; }
    if ((st = fl_model_set_quant(self->m, &qc)) != FL_OK) { fl_py_raise(st); return -1; }
    self->lock = PyThread_allocate_lock();
    if (!self->lock) { PyErr_NoMemory(); return -1; }
    return 0;
}

/* The plain model lock, for short calls that neither run core work nor call back (no re-entry). */
static inline void lock_model(FlPyModel *self) {
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

/* Take the model for one load / forward / generate (GIL held). The thread that holds it can only be running Python
 * code inside a callback of its own call (a streamer calling forward on the same model): a CPU
 * model lets that nested call run (between decode steps the model holds no state a forward
 * breaks: each call has its own KV cache and rereads the workspace); loading, and a CUDA model
 * (graphs, streams), refuse it instead of waiting for themselves forever. Returns -1 with an exception. */
static int enter_model(FlPyModel *self, int loading) {
    const unsigned long me = PyThread_get_thread_ident();
    if (self->depth > 0 && self->owner == me) {
        if (loading || self->loading || !on_compute_thread(self)) {
            PyErr_SetString(PyExc_RuntimeError, self->loading || loading
                            ? "a model cannot be used from a callback of its own load"
                            : "a CUDA model cannot be called from a callback of its own forward/generate");
            return -1;
        }
        self->depth++;
        return 0;
    }
    lock_model(self);
    self->owner = me;
    self->depth = 1;
    self->loading = loading;
    return 0;
}
static void leave_model(FlPyModel *self) {
    if (--self->depth > 0) return;
    self->owner = 0;
    self->loading = 0;
    PyThread_release_lock(self->lock);
}

/* Run fn on the compute thread (CPU model) or here with the GIL released (CUDA model).
 * Returns 0 with *st, or -1 with a Python exception (a callback's, or KeyboardInterrupt). */
static int run_core(FlPyModel *self, fl_exec_fn fn, void *arg, fl_status *st) {
    if (on_compute_thread(self)) return fl_exec_run(fn, arg, st);
    Py_BEGIN_ALLOW_THREADS
    *st = fn(NULL, arg);
    Py_END_ALLOW_THREADS
    return 0;
}

/* A tensor in memory (fastload/from_hf.py): {"ptr": int, "nbytes": int, "dtype": "F32"|"F16"|"BF16"|"F64",
 * "shape": (rows[, cols]) or (experts, rows, cols) (a Mixture of Experts' fused tensors), "device": bool (backend memory of the model's device), "label": str (messages)}. The
 * caller keeps the memory alive and unchanged until load() returns. */
static int src_from_memory(PyObject *d, const char *name, fl_src_tensor *src) {
    PyObject *ptr = PyDict_GetItemString(d, "ptr"), *nb = PyDict_GetItemString(d, "nbytes"),
             *dt = PyDict_GetItemString(d, "dtype"), *shape = PyDict_GetItemString(d, "shape"),
             *dev = PyDict_GetItemString(d, "device"), *label = PyDict_GetItemString(d, "label");
    if (!ptr || !PyLong_Check(ptr) || !nb || !PyLong_Check(nb) || !dt || !PyUnicode_Check(dt) || !shape ||
        !PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) < 1 || PyTuple_GET_SIZE(shape) > 3 ||
        (label && !PyUnicode_Check(label))) {
        PyErr_Format(PyExc_TypeError, "tensor '%s': a memory source needs ptr, nbytes, dtype, shape (1 to 3 dims)", name);
        return -1;
    }
    Py_ssize_t dl = 0;
    const char *ds = PyUnicode_AsUTF8AndSize(dt, &dl);
    const char *lb = label ? PyUnicode_AsUTF8(label) : "memory";
    if (!ds || !lb) return -1;
    const fl_dtype t = fl_dtype_from_st_name(ds, (size_t)dl);
    if (t != FL_F32 && t != FL_F16 && t != FL_BF16 && t != FL_F64) {
        PyErr_Format(PyExc_NotImplementedError, "%s: tensor '%s' is %s, not a float tensor", lb, name, ds);
        return -1;
    }
    void *p = PyLong_AsVoidPtr(ptr);
    unsigned long long n = PyLong_AsUnsignedLongLong(nb);
    if (PyErr_Occurred()) return -1;
    *src = (fl_src_tensor){.file = lb, .name = name, .data = p, .nbytes = n, .kind = FL_SRC_PLAIN, .type = t,
                           .ndim = (int)PyTuple_GET_SIZE(shape),
                           .where = dev && PyObject_IsTrue(dev) ? FL_SRC_BACKEND : FL_SRC_HOST};
    for (int k = 0; k < src->ndim; k++) {
        long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, k));
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 0) { PyErr_Format(PyExc_ValueError, "%s: tensor '%s' has a negative dimension", lb, name); return -1; }
        src->shape[k] = v;
    }
    if (!p && n) { PyErr_Format(PyExc_ValueError, "%s: tensor '%s' has a null data pointer", lb, name); return -1; }
    return 0;
}

/* Fill `src` from an opened SafetensorsFile or GGUFFile (or a memory source, see above) and a tensor name. */
static int src_from(PyObject *file, PyObject *name_obj, fl_src_tensor *src) {
    const char *name = PyUnicode_AsUTF8(name_obj);
    if (!name) return -1;
    memset(src, 0, sizeof *src);
    if (PyDict_Check(file)) return src_from_memory(file, name, src);
    if (PyObject_TypeCheck(file, &FlPySt_Type)) {
        fl_st_file *f = ((FlPySt *)file)->f;
        if (!f) { PyErr_SetString(PyExc_ValueError, "safetensors file is closed"); return -1; }
        int i = fl_st_find(f, name);
        if (i < 0) { PyErr_Format(PyExc_KeyError, "%s: no tensor '%s'", f->path, name); return -1; }
        const fl_st_tensor *t = &f->t[i];
        if (t->ndim > 4) { PyErr_Format(FlCheckpointError, "%s: tensor '%s' has %d dimensions", f->path, name, t->ndim); return -1; }
        *src = (fl_src_tensor){.file = f->path, .name = t->name, .data = t->data, .nbytes = t->end - t->begin,
                               .file_offset = f->data_off + t->begin,
                               .kind = FL_SRC_PLAIN, .type = t->dtype, .ndim = t->ndim};
        for (int k = 0; k < t->ndim; k++) src->shape[k] = t->shape[k];
        return 0;
    }
    if (PyObject_TypeCheck(file, &FlPyGGUF_Type)) {
        fl_gguf *g = ((FlPyGGUF *)file)->g;
        if (!g) { PyErr_SetString(PyExc_ValueError, "GGUF file is closed"); return -1; }
        int64_t i = fl_gguf_find_tensor(g, name);
        if (i < 0) { PyErr_Format(PyExc_KeyError, "%s: no tensor '%s'", g->path, name); return -1; }
        const fl_gguf_tensor *t = &g->tensors[i];
        *src = (fl_src_tensor){.file = g->path, .name = t->name, .data = t->data, .nbytes = t->nbytes,
                               .file_offset = g->data_offset + t->offset,
                               .kind = FL_SRC_GGML, .type = t->type, .ndim = t->ndim};
        for (int k = 0; k < t->ndim; k++) src->shape[k] = t->ne[t->ndim - 1 - k]; /* ggml order -> HF order */
        return 0;
    }
    PyErr_SetString(PyExc_TypeError, "load items need a SafetensorsFile or GGUFFile");
    return -1;
}

/* The 6th element of a load item: {"packing": "gptq"|"awq", "bits": 4|8, "group_size": int (-1: whole row),
 * "zero_offset": 1|0 (GPTQ v1 / v2; default 1 for GPTQ), "qzeros": (file, name), "scales": (file, name),
 * "g_idx": (file, name) or None}; the item's own tensor is qweight. */
static int packed_companion(PyObject *d, const char *key, Py_ssize_t i, int required, fl_src_tensor *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) {
        if (!required) return 0;
        PyErr_Format(PyExc_ValueError, "load item %zd: packed['%s'] is missing", i, key);
        return -1;
    }
    if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(v, 1))) {
        PyErr_Format(PyExc_TypeError, "load item %zd: packed['%s'] must be a tuple (file, tensor name)", i, key);
        return -1;
    }
    return src_from(PyTuple_GET_ITEM(v, 0), PyTuple_GET_ITEM(v, 1), out);
}
static int packed_int(PyObject *d, const char *key, Py_ssize_t i, int dflt, int *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) {
        if (dflt == INT32_MIN) { PyErr_Format(PyExc_ValueError, "load item %zd: packed['%s'] is missing", i, key); return -1; }
        *out = dflt;
        return 0;
    }
    int ovf = 0;
    long long x = PyLong_Check(v) ? PyLong_AsLongLongAndOverflow(v, &ovf) : 0;
    if (x == -1 && PyErr_Occurred()) return -1;
    if (!PyLong_Check(v) || ovf || x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "load item %zd: packed['%s'] must be an integer, not %.100R", i, key, v);
        return -1;
    }
    *out = (int)x;
    return 0;
}
static int packed_from(PyObject *d, Py_ssize_t i, fl_load_item *it) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "load item %zd: the 6th element must be a dict describing the GPTQ / AWQ packing", i);
        return -1;
    }
    PyObject *pk = PyDict_GetItemString(d, "packing");
    const char *ps = pk && PyUnicode_Check(pk) ? PyUnicode_AsUTF8(pk) : NULL;
    if (ps && !strcmp(ps, "gptq")) it->packing = FL_PACK_GPTQ;
    else if (ps && !strcmp(ps, "awq")) it->packing = FL_PACK_AWQ;
    else {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "load item %zd: packed['packing'] must be 'gptq' or 'awq', not %.100R", i, pk ? pk : Py_None);
        return -1;
    }
    if (packed_int(d, "bits", i, INT32_MIN, &it->qbits) < 0 || packed_int(d, "group_size", i, INT32_MIN, &it->qgroup) < 0 ||
        packed_int(d, "zero_offset", i, it->packing == FL_PACK_GPTQ ? 1 : 0, &it->qzero_offset) < 0)
        return -1;
    return packed_companion(d, "qzeros", i, 1, &it->qzeros) < 0 || packed_companion(d, "scales", i, 1, &it->scales) < 0 ||
                   packed_companion(d, "g_idx", i, 0, &it->g_idx) < 0
               ? -1
               : 0;
}

/* The 7th element of a load item: {"A": (file, name), "B": (file, name), "scale": float} (fastload/lora.py), or
 * None. The item's rows become W + scale * B @ A, merged at load (fl_load_item.lora_*). */
static int lora_from(PyObject *d, Py_ssize_t i, fl_load_item *it) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "load item %zd: the 7th element must be a dict describing a LoRA adapter", i);
        return -1;
    }
    PyObject *sc = PyDict_GetItemString(d, "scale");
    const double scale = sc ? PyFloat_AsDouble(sc) : -1.0;
    if (!sc || (scale == -1.0 && PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "load item %zd: lora['scale'] must be a number", i);
        return -1;
    }
    it->lora_scale = (float)scale;
    return packed_companion(d, "A", i, 1, &it->lora_a) < 0 || packed_companion(d, "B", i, 1, &it->lora_b) < 0 ? -1 : 0;
}

typedef struct { PyObject *cb; int failed; fl_exec_job *job; uint64_t done, total; } progress_ud;
static int progress_py(void *ud) { /* GIL held, in the calling thread */
    progress_ud *p = ud;
    PyObject *r = PyObject_CallFunction(p->cb, "KK", (unsigned long long)p->done, (unsigned long long)p->total);
    if (!r) p->failed = 1;
    Py_XDECREF(r);
    if (!p->failed && PyErr_CheckSignals() < 0) p->failed = 1;
    return p->failed;
}
/* Called by the loader (under its critical section) after each tensor. */
static int progress_cb(void *ud, uint64_t done, uint64_t total) {
    progress_ud *p = ud;
    if (p->job && fl_exec_cancelled(p->job)) return 1; /* Ctrl-C seen by the waiting caller */
    if (!p->cb || p->failed) return p->failed;
    p->done = done;
    p->total = total;
    if (p->job) return fl_exec_callback(p->job, progress_py, p);
    PyGILState_STATE g = PyGILState_Ensure();
    progress_py(p);
    PyGILState_Release(g);
    return p->failed;
}

typedef struct { fl_model *m; fl_load_item *arr; int n; progress_ud *ud; } load_args;
static fl_status load_job(fl_exec_job *job, void *arg) {
    load_args *a = arg;
    a->ud->job = job;
    return fl_model_load(a->m, a->arr, a->n, progress_cb, a->ud);
}

/* load(items: list[(slot, layer, unpermute_heads, file, name[, packed[, lora[, expert]]])], progress=None) -> None;
 * file: an opened SafetensorsFile / GGUFFile, or a memory source dict (src_from_memory); packed: None for a float
 * tensor; lora: None or the item's LoRA factors (lora_from); expert: the expert index of a per-expert
 * Mixture-of-Experts slot */
static PyObject *model_load(FlPyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"items", "progress", NULL};
    PyObject *items, *progress = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|O", kwlist, &PyList_Type, &items, &progress)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    fl_load_item *arr = PyMem_Calloc((size_t)(n ? n : 1), sizeof *arr);
    if (!arr) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i), *file, *name, *packed = Py_None, *lora = Py_None;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) < 5 || PyTuple_GET_SIZE(it) > 8) {
            PyErr_Format(PyExc_TypeError, "load item %zd must be a tuple (slot, layer, heads, file, name[, packed[, lora[, expert]]])", i);
            PyMem_Free(arr);
            return NULL;
        }
        if (!PyArg_ParseTuple(it, "iiiOU|OOi", &arr[i].slot, &arr[i].layer, &arr[i].unpermute_heads, &file, &name, &packed,
                              &lora, &arr[i].expert) ||
            src_from(file, name, &arr[i].src) < 0 || (packed != Py_None && packed_from(packed, i, &arr[i]) < 0) ||
            (lora != Py_None && lora_from(lora, i, &arr[i]) < 0)) {
            PyMem_Free(arr);
            return NULL;
        }
    }
    progress_ud ud = {progress == Py_None ? NULL : progress, 0, NULL, 0, 0};
    if (self->eng) {
        PyMem_Free(arr);
        PyErr_SetString(PyExc_RuntimeError, "load: the model's engine is running (engine_stop() first)");
        return NULL;
    }
    load_args la = {self->m, arr, (int)n, &ud};
    fl_status st = FL_OK;
    if (enter_model(self, 1) < 0) { PyMem_Free(arr); return NULL; }
    if (self->eng) { /* started while this call waited for the model (a forward's default engine, engine_start) */
        leave_model(self);
        PyMem_Free(arr);
        PyErr_SetString(PyExc_RuntimeError, "load: the model's engine is running (engine_stop() first)");
        return NULL;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int rc = run_core(self, load_job, &la, &st);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    leave_model(self);
    PyMem_Free(arr);
    self->m->stats.seconds += (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    if (rc < 0) { fl_err_clear(); return NULL; } /* a callback's exception, or KeyboardInterrupt */
    if (ud.failed) { fl_err_clear(); return NULL; } /* the callback's exception (CUDA: raised in this thread) */
    if (st != FL_OK) return fl_py_raise(st);
    Py_RETURN_NONE;
}

static fl_status interleave_job(fl_exec_job *job, void *arg) {
    (void)job;
    return fl_model_interleave((fl_model *)arg);
}
/* check_complete(): every tensor the config asks for was loaded; then the weights are final: the backend may
 * interleave them into its own layout (fl_model_interleave, on the compute thread as a load is); no load is taken after. */
static PyObject *model_check_complete(FlPyModel *self, PyObject *noargs) {
    fl_status st = fl_model_check_complete(self->m);
    if (st != FL_OK) return fl_py_raise(st);
    if (enter_model(self, 1) < 0) return NULL;
    const int rc = run_core(self, interleave_job, self->m, &st);
    leave_model(self);
    if (rc < 0) { fl_err_clear(); return NULL; }
    if (st != FL_OK) return fl_py_raise(st);
    Py_RETURN_NONE;
}

/* Contiguous int32 [B, T] view of an array-like; NULL with exception. */
static PyArrayObject *as_2d(PyObject *o, int typenum, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, typenum, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!a) { PyErr_Clear(); PyErr_Format(PyExc_ValueError, "%s must be a 2-D array of integers [batch, seq_len]", what); }
    return a;
}

/* A pool-less engine with the default settings for a forward() on a model nobody started an engine for (fastload._C
 * used directly; the Python layer starts its own first, fastload/engine.py). Returns -1 with an exception. */
static int ensure_engine(FlPyModel *self) {
    if (self->eng) return 0;
    if (enter_model(self, 0) < 0) return -1; /* waits for a load in another thread; refused from the load's callback */
    fl_status st = FL_OK;
    if (!self->eng) {
        const int cpu = on_compute_thread(self);
        fl_engine_cfg cfg = {0};
        fl_engine *e = NULL;
        Py_BEGIN_ALLOW_THREADS
        st = fl_engine_create(self->m, &cfg, cpu ? fl_py_exec_kick : NULL, NULL, &e);
        Py_END_ALLOW_THREADS
        if (st == FL_OK) {
            self->eng = e;
            self->eng_auto = 1;
        }
    }
    leave_model(self);
    if (st != FL_OK) { fl_py_raise(st); return -1; }
    return 0;
}

/* forward(input_ids[B,T], attention_mask=None, position_ids=None) -> float32 logits [B, T, V]: a forward request to
 * the model's engine (run whole by its driver between steps, with a transient KV cache of B x T slots; see
 * engine.h), the caller waiting with the GIL released. */
static PyObject *model_forward(FlPyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input_ids", "attention_mask", "position_ids", NULL};
    PyObject *ids_o, *mask_o = Py_None, *pos_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO", kwlist, &ids_o, &mask_o, &pos_o)) return NULL;
    PyArrayObject *ids = as_2d(ids_o, NPY_INT32, "input_ids"), *mask = NULL, *pos = NULL;
    PyObject *res = NULL;
    int32_t *pbuf = NULL;
    if (!ids) return NULL;
    const npy_intp B = PyArray_DIM(ids, 0), T = PyArray_DIM(ids, 1);
    if (B <= 0 || T <= 0) { PyErr_SetString(PyExc_ValueError, "input_ids is empty"); goto out; }
    if (B > INT32_MAX / T) { PyErr_Format(PyExc_ValueError, "input_ids of %zd x %zd tokens is too large", (Py_ssize_t)B, (Py_ssize_t)T); goto out; }
    if (mask_o != Py_None) {
        if (!(mask = as_2d(mask_o, NPY_UINT8, "attention_mask"))) goto out;
        if (PyArray_DIM(mask, 0) != B || PyArray_DIM(mask, 1) != T) { PyErr_SetString(PyExc_ValueError, "attention_mask must have the shape of input_ids"); goto out; }
    }
    if (pos_o != Py_None) {
        if (!(pos = as_2d(pos_o, NPY_INT32, "position_ids"))) goto out;
        if (PyArray_DIM(pos, 0) != B || PyArray_DIM(pos, 1) != T) { PyErr_SetString(PyExc_ValueError, "position_ids must have the shape of input_ids"); goto out; }
    }
    npy_intp dims[3] = {B, T, self->m->cfg.vocab};
    if (!(pbuf = PyMem_Malloc((size_t)(B * T) * 4))) { PyErr_NoMemory(); goto out; }
    for (npy_intp i = 0; i < B * T; i++) pbuf[i] = pos ? ((int32_t *)PyArray_DATA(pos))[i] : (int32_t)(i % T); /* transformers' default: arange */
    if (!(res = PyArray_SimpleNew(3, dims, NPY_FLOAT32))) goto out;
    if (ensure_engine(self) < 0) { Py_CLEAR(res); goto out; }
    /* from here to the count, no Python code runs (nothing could stop the engine in between): engine_stop refuses
     * while the count is nonzero */
    self->n_fwd++;
    /* ids are checked against the vocabulary by the engine, at submission: a bad id is a ValueError here */
    const fl_forward_req f = {(int)B, (int)T, PyArray_DATA(ids), pbuf, mask ? PyArray_DATA(mask) : NULL,
                              PyArray_DATA((PyArrayObject *)res)};
    const int rc = fl_py_engine_forward(self->eng, &f, on_compute_thread(self));
    self->n_fwd--;
    if (rc < 0) Py_CLEAR(res);
out:
    PyMem_Free(pbuf);
    Py_XDECREF(ids); Py_XDECREF(mask); Py_XDECREF(pos);
    return res;
}


static PyObject *model_info(FlPyModel *self, void *closure) {
    fl_model *m = self->m;
    PyObject *d = Py_BuildValue("{s:s,s:s,s:K,s:d,s:K,s:i,s:i,s:i,s:K,s:K,s:O,s:K,s:K,s:O}", "device", self->be->name,
                         "dtype", fl_dtype_table[m->wdtype].np_name, "weight_bytes", (unsigned long long)m->arena_bytes,
                         "load_seconds", m->stats.seconds, "bytes_read", (unsigned long long)m->stats.bytes_read,
                         "threads", m->stats.threads, "cpu_threads", self->be->n_threads,
                         "cpu_threads_now", fl_backend_threads_now(self->be),
                         "mem_allocated", (unsigned long long)self->be->mem_allocated,
                         "mem_peak", (unsigned long long)self->be->mem_peak,
                         "direct_io", m->stats.direct_io ? Py_True : Py_False,
                         "kv_bytes_last", (unsigned long long)m->kv_bytes_last,
                         "fused_matmul_inputs", (unsigned long long)self->be->fused_inputs,
                         "huge_pages", m->arena_huge ? Py_True : Py_False);
    if (!d) return NULL;
    /* issue 9: how many weights are held quantised and the bytes of quantised / float weights */
    uint64_t fbytes = 0;
    char name[64];
    for (int i = 0, nw = fl_model_n_weights(m); i < nw; i++) {
        const fl_weight *w;
        uint64_t b;
        if (fl_model_weight_info(m, i, &w, name, sizeof name, &b) == FL_OK && w->dtype != FL_QUANT) fbytes += b;
    }
    PyObject *a = PyLong_FromLong(m->n_quant), *b = PyLong_FromUnsignedLongLong(m->bytes_quant),
             *c = PyLong_FromUnsignedLongLong(fbytes), *p = PyLong_FromLong(m->n_interleaved);
    if (!a || !b || !c || !p || PyDict_SetItemString(d, "quantized_weights", a) < 0 ||
        PyDict_SetItemString(d, "quantized_bytes", b) < 0 || PyDict_SetItemString(d, "float_bytes", c) < 0 ||
        PyDict_SetItemString(d, "interleaved_weights", p) < 0)
        Py_CLEAR(d);
    Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(c); Py_XDECREF(p);
    return d;
}

static const char *weight_dtype_name(const fl_weight *w) {
    if (w->dtype != FL_QUANT) return fl_dtype_table[w->dtype].np_name;
    if (w->code == FL_QCODE_NF4) return "nf4";
    return w->bits == 8 ? "int8" : w->bits == 6 ? "int6" : w->bits == 5 ? "int5" : "int4";
}

/* layouts() -> [{"name", "dtype", "bits", "group_size", "scale_dtype", "zeros", "perm", "bytes", "rows", "cols",
 * "interleaved"}]: one dict per weight in arena order (lm_head only when untied). Float weights: bits 16 / 32,
 * group_size 0, scale_dtype None; K scales (csrc/quant.h): "kscale"; interleaved: 8 for the CPU's rows-by-8 layout
 * (fl_model_interleave), else 0. */
static PyObject *model_layouts(FlPyModel *self, PyObject *noargs) {
    fl_model *m = self->m;
    const int nw = fl_model_n_weights(m);
    PyObject *out = PyList_New(nw);
    if (!out) return NULL;
    char name[64];
    for (int i = 0; i < nw; i++) {
        const fl_weight *w;
        uint64_t bytes;
        fl_status st = fl_model_weight_info(m, i, &w, name, sizeof name, &bytes);
        if (st != FL_OK) { Py_DECREF(out); return fl_py_raise(st); }
        const int q = w->dtype == FL_QUANT;
        PyObject *d = Py_BuildValue("{s:s,s:s,s:i,s:i,s:z,s:O,s:O,s:K,s:L,s:L,s:i}", "name", name, "dtype", weight_dtype_name(w),
                                    "bits", q ? w->bits : 8 * fl_dtype_size(w->dtype), "group_size", q ? w->group_size : 0,
                                    "scale_dtype", q ? (w->sdtype == FL_I8 ? "kscale" : fl_dtype_table[w->sdtype].np_name) : NULL,
                                    "zeros", q && w->zeros_d ? Py_True : Py_False, "perm", q && w->perm_d ? Py_True : Py_False,
                                    "bytes", (unsigned long long)bytes, "rows", (long long)w->rows, "cols", (long long)w->cols,
                                    "interleaved", q ? w->interleaved : 0);
        if (!d) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, d);
    }
    return out;
}

/* rope_freqs(): the rotary frequencies the kernels use (after rope scaling), and the softmax scale's multiplier
 * (YaRN's attention factor squared): (float32 array [rotated dims / 2], float). For tests against transformers' formulas. */
static PyObject *model_rope_freqs(FlPyModel *self, PyObject *noargs) {
    fl_model *m = self->m;
    if (!m->inv_freq_d) return PyErr_Format(PyExc_RuntimeError, "rope_freqs: the model's weights are not placed yet");
    npy_intp n = (m->cfg.rope_dims ? m->cfg.rope_dims : m->cfg.head_dim) / 2;
    PyObject *res = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (!res) return NULL;
    lock_model(self);
    if (self->eng) fl_engine_lock_model(self->eng); /* not in the middle of an engine step */
    fl_status st = m->be->to_host(m->be, PyArray_DATA((PyArrayObject *)res), m->inv_freq_d, (size_t)n * sizeof(float));
    if (self->eng) fl_engine_unlock_model(self->eng);
    PyThread_release_lock(self->lock);
    if (st != FL_OK) { Py_DECREF(res); return fl_py_raise(st); }
    const double a = m->cfg.rope_attn_factor;
    return Py_BuildValue("(Nd)", res, a * a);
}

/* export of a quantised weight: its rows dequantised to float32 (fl_q_dequant_rows on a host copy of the codes,
 * scales, offsets and perm), in the checkpoint's column order (an act-order perm undone). save_pretrained
 * therefore writes a quantised model as a float32 checkpoint: the values the model computes with, not its packing. */
typedef struct { const fl_weight *w; int64_t row0, rows; float *out; fl_backend *be; } export_args;
static fl_status export_quant_core(export_args *a) {
    const fl_weight *w = a->w;
    if (w->interleaved && (a->row0 % 8 || a->rows % 8)) {
        /* rows of an interleaved weight move in groups of 8: export the groups that hold them, keep the rows asked for */
        const int64_t g0 = a->row0 / 8 * 8, g1 = (a->row0 + a->rows + 7) / 8 * 8;
        float *all = fl_malloc((size_t)(g1 - g0) * (size_t)w->cols * sizeof(float));
        if (!all) return fl_err(FL_E_NOMEM, "export: cannot allocate a host copy of the weight");
        export_args b = *a;
        b.row0 = g0;
        b.rows = g1 - g0;
        b.out = all;
        const fl_status st = export_quant_core(&b);
        if (st == FL_OK)
            memcpy(a->out, all + (size_t)(a->row0 - g0) * (size_t)w->cols, (size_t)a->rows * (size_t)w->cols * sizeof(float));
        fl_free(all);
        return st;
    }
    const int64_t C = w->cols, R = a->rows;
    const size_t cb = (size_t)C * (size_t)w->bits / 8, sb = fl_q_srow_bytes(C, w->group_size, w->sdtype);
    const size_t nc = cb * (size_t)R, ns = sb * (size_t)R, np = w->perm_d ? (size_t)C * 4 : 0;
    char *h = fl_malloc(nc + 2 * ns + np + (size_t)C * 4 + 64);
    if (!h) return fl_err(FL_E_NOMEM, "export: cannot allocate a host copy of the weight");
    fl_weight hw = *w;
    hw.rows = R;
    hw.data_d = h;
    hw.scales_d = h + nc;
    hw.zeros_d = w->zeros_d ? h + nc + ns : NULL;
    hw.perm_d = w->perm_d ? (int32_t *)(h + nc + 2 * ns) : NULL;
    float *tmp = (float *)(h + nc + 2 * ns + np);
    fl_backend *be = a->be;
    fl_status st = be->to_host(be, hw.data_d, (const char *)w->data_d + (size_t)a->row0 * cb, nc);
    if (st == FL_OK) st = be->to_host(be, hw.scales_d, (const char *)w->scales_d + (size_t)a->row0 * sb, ns);
    if (st == FL_OK && w->zeros_d) st = be->to_host(be, hw.zeros_d, (const char *)w->zeros_d + (size_t)a->row0 * sb, ns);
    if (st == FL_OK && w->perm_d) st = be->to_host(be, hw.perm_d, w->perm_d, np);
    if (st == FL_OK) st = be->sync(be);
    if (st == FL_OK) st = fl_q_dequant_rows(&hw, 0, R, a->out);
    if (st == FL_OK && hw.perm_d) /* column c multiplies x[perm[c]]: it is the checkpoint's column perm[c] */
        for (int64_t r = 0; r < R; r++) {
            float *row = a->out + (size_t)r * (size_t)C;
            memcpy(tmp, row, (size_t)C * 4);
            for (int64_t c = 0; c < C; c++) row[hw.perm_d[c]] = tmp[c];
        }
    fl_free(h);
    return st;
}
static PyObject *export_quant(FlPyModel *self, const fl_weight *w, int64_t row0, int64_t rows) {
    npy_intp dims[2] = {(npy_intp)rows, (npy_intp)w->cols};
    PyObject *arr = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!arr) return NULL;
    export_args a = {w, row0, rows, PyArray_DATA((PyArrayObject *)arr), self->be};
    fl_status st;
    lock_model(self);
    Py_BEGIN_ALLOW_THREADS
    st = export_quant_core(&a);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (st != FL_OK) { Py_DECREF(arr); return fl_py_raise(st); }
    return Py_BuildValue("(sN)", "float32", arr);
}

/* export(slot, layer[, expert]) -> (dtype name, ndarray): a copy of what the model holds for one slot (the rows of
 * wqkv / w_gate_up / bqkv it filled), float32, or the uint16 bit pattern for float16 / bfloat16; shape
 * [rows, cols], or [rows] for a vector. Read with be->to_host under the model lock (for save_pretrained). */
static PyObject *model_export(FlPyModel *self, PyObject *args) {
    int slot, layer, expert = 0;
    if (!PyArg_ParseTuple(args, "ii|i", &slot, &layer, &expert)) return NULL;
    if (slot < 0 || slot >= FL_SLOT_COUNT) return PyErr_Format(PyExc_ValueError, "export: unknown slot %d", slot);
    fl_model *m = self->m;
    if (!m->arena_d) return PyErr_Format(PyExc_ValueError, "export: the model holds no weights (not loaded)");
    const fl_weight *w = NULL;
    int64_t row0 = 0, rows = 0, cols = 0;
    int is_vec = 0;
    fl_status st = fl_model_slot_rows(m, slot, layer, expert, &w, &row0, &rows, &cols, &is_vec);
    if (st != FL_OK) return fl_py_raise(st);
    if (!w->data_d) return PyErr_Format(PyExc_ValueError, "export: slot %s holds no data", fl_slot_names[slot]);
    if (w->dtype == FL_QUANT) return export_quant(self, w, row0, rows);
    const size_t es = (size_t)fl_dtype_size(w->dtype);
    npy_intp dims[2] = {(npy_intp)rows, (npy_intp)cols};
    PyObject *arr = PyArray_SimpleNew(is_vec ? 1 : 2, dims, w->dtype == FL_F32 ? NPY_FLOAT32 : NPY_UINT16);
    if (!arr) return NULL;
    /* rows, cols and row0 come from the config the arena was sized with: the range lies inside the arena */
    const char *src = (const char *)w->data_d + (size_t)row0 * (size_t)cols * es;
    const size_t nbytes = (size_t)rows * (size_t)cols * es;
    lock_model(self);
    Py_BEGIN_ALLOW_THREADS
    st = self->be->to_host(self->be, PyArray_DATA((PyArrayObject *)arr), src, nbytes);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (st != FL_OK) { Py_DECREF(arr); return fl_py_raise(st); }
    return Py_BuildValue("(sN)", fl_dtype_table[w->dtype].np_name, arr);
}

/* ---- the engine (csrc/engine.h): many callers, continuous batching, paged KV cache ---------------------------- */
/* engine_start(kv_bytes, page_tokens=16, max_batch=64, prefill_chunk=512, max_waiting=0, max_context=0,
 * prefix_caching=True, kv_f16=False, preempt_recompute=False): kv_bytes 0 starts it without a KV pool (forwards only,
 * until engine_pool); kv_f16: keys and values kept as float16 (CPU backend); preempt_recompute: a preempted request
 * is read again as one prompt (else its generated tokens are replayed through decode steps: fl_engine_cfg) */
static PyObject *model_engine_start(FlPyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"kv_bytes", "page_tokens", "max_batch", "prefill_chunk", "max_waiting", "max_context",
                             "prefix_caching", "kv_f16", "preempt_recompute", NULL};
    fl_engine_cfg cfg = {0};
    unsigned long long kvb = 0;
    int prefix = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|iiiiippp", kwlist, &kvb, &cfg.page_tokens, &cfg.max_batch,
                                     &cfg.prefill_chunk, &cfg.max_waiting, &cfg.max_context, &prefix, &cfg.kv_f16,
                                     &cfg.preempt_recompute))
        return NULL;
    cfg.no_prefix_cache = !prefix;
    cfg.kv_bytes = kvb;
    if (self->eng && self->eng_auto && !self->n_fwd) { /* forward()'s default engine: replaced by this configured one */
        fl_engine *old = self->eng;
        self->eng = NULL;
        self->eng_auto = 0;
        Py_BEGIN_ALLOW_THREADS
        fl_engine_free(old);
        Py_END_ALLOW_THREADS
    }
    if (self->eng) { PyErr_SetString(PyExc_RuntimeError, "the engine is already running"); return NULL; }
    if (cfg.page_tokens < 0 || cfg.max_batch < 0 || cfg.prefill_chunk < 0 || cfg.max_waiting < 0 || cfg.max_context < 0) {
        PyErr_SetString(PyExc_ValueError, "engine_start: sizes must be >= 0 (0: the default)");
        return NULL;
    }
    fl_status st;
    fl_engine *e = NULL;
    if (enter_model(self, 0) < 0) return NULL;
    const int cpu = on_compute_thread(self);
    Py_BEGIN_ALLOW_THREADS
    st = fl_engine_create(self->m, &cfg, cpu ? fl_py_exec_kick : NULL, NULL, &e);
    Py_END_ALLOW_THREADS
    leave_model(self);
    if (st != FL_OK) return fl_py_raise(st);
    self->eng = e;
    self->eng_auto = 0;
    Py_RETURN_NONE;
}

/* engine_pool(kv_bytes): give an engine started with kv_bytes 0 its KV page pool (generate needs it, forward does
 * not). */
static PyObject *model_engine_pool(FlPyModel *self, PyObject *args) {
    unsigned long long kvb = 0;
    if (!PyArg_ParseTuple(args, "K", &kvb)) return NULL;
    if (!self->eng) { PyErr_SetString(PyExc_RuntimeError, "the engine is not running (engine_start first)"); return NULL; }
    if (!kvb) { PyErr_SetString(PyExc_ValueError, "engine_pool: kv_bytes must be positive"); return NULL; }
    fl_engine *e = self->eng;
    self->n_fwd++; /* keeps engine_stop off e while the GIL is released */
    fl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fl_engine_add_pool(e, kvb);
    Py_END_ALLOW_THREADS
    self->n_fwd--;
    if (st != FL_OK) return fl_py_raise(st);
    Py_RETURN_NONE;
}

/* engine_stop(): cancel every request and free the pool (requests still held by callers end cancelled). */
static PyObject *model_engine_stop(FlPyModel *self, PyObject *noargs) {
    (void)noargs;
    fl_engine *e = self->eng;
    if (!e) Py_RETURN_NONE;
    self->eng = NULL;
    /* Refused while requests wait or run. Finished ones Python still holds (a streamer's, a kept traceback's) keep
     * the engine's struct and mutex alive until they are released (fl_engine_free retires it); the rest goes now. */
    fl_engine_stats s;
    fl_engine_get_stats(e, &s);
    if (s.waiting || s.running || s.forwards_waiting || self->n_fwd) {
        self->eng = e;
        PyErr_SetString(PyExc_RuntimeError, self->n_fwd ? "engine_stop: forward calls are still running on the engine (wait for them first)"
                                                        : "engine_stop: requests are still running (cancel them and wait first)");
        return NULL;
    }
    self->eng_auto = 0;
    Py_BEGIN_ALLOW_THREADS
    fl_engine_free(e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* engine_submit(ids, max_new_tokens, min_new_tokens=0, do_sample=False, temperature=1, top_k=0, top_p=1,
 *               repetition_penalty=1, seed=0, eos_token_ids=None, keep_scores=False, keep_logits=False, logprobs=-1,
 *               min_p=0, presence_penalty=0, frequency_penalty=0, no_repeat_ngram_size=0, bias_tokens=None,
 *               bias_offsets=None, bias_values=None, begin_suppress=None, forced_eos=None, typical_p=0,
 *               epsilon_cutoff=0, eta_cutoff=0, num_beams=1, num_return_sequences=1, length_penalty=1,
 *               early_stopping=0)
 *   -> Request, or a list of Requests (fl_gen_params says what each setting does). keep_* / logprobs (k >= 0: the
 *   token's log-probability and the k most likely): what is kept of each token, read back with Request.records()
 * ids: one prompt (1-D ints), or a list of prompts submitted as one group (fl_engine_submit_group), row b sampling
 * with seed[b] (seed: a list as long as ids, or one int for every row). */
static PyObject *fl_py_engine_submit(FlPyModel *self, PyObject *ids_o, PyObject *eos_o, PyObject *seed_o, fl_gen_params *pp,
                                     int logprobs);
static PyObject *model_engine_submit(FlPyModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input_ids", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                             "repetition_penalty", "seed", "eos_token_ids", "keep_scores", "keep_logits", "logprobs", "min_p",
                             "presence_penalty", "frequency_penalty", "no_repeat_ngram_size", "bias_tokens", "bias_offsets",
                             "bias_values", "begin_suppress", "forced_eos", "typical_p", "epsilon_cutoff", "eta_cutoff",
                             "num_beams", "num_return_sequences", "length_penalty", "early_stopping", NULL};
    PyObject *ids_o, *eos_o = Py_None, *seed_o = NULL, *o[5] = {Py_None, Py_None, Py_None, Py_None, Py_None};
    fl_gen_params p = {.max_new_tokens = 20, .temperature = 1.f, .top_p = 1.f, .repetition_penalty = 1.f,
                       .num_beams = 1, .num_return = 1, .length_penalty = 1.f};
    int logprobs = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iipfiffOOppifffiOOOOOfffiifi", kwlist, &ids_o, &p.max_new_tokens,
                                     &p.min_new_tokens, &p.do_sample, &p.temperature, &p.top_k, &p.top_p,
                                     &p.repetition_penalty, &seed_o, &eos_o, &p.keep_scores, &p.keep_logits, &logprobs,
                                     &p.min_p, &p.presence_penalty, &p.frequency_penalty, &p.no_repeat_ngram_size, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &p.typical_p, &p.epsilon_cutoff, &p.eta_cutoff,
                                     &p.num_beams, &p.num_return, &p.length_penalty, &p.early_stopping))
        return NULL;
    /* the arrays of fl_gen_params: bias_tokens / bias_offsets (n + 1) / bias_values (n) (token sequences and what is
     * added to their last token's logit), begin_suppress, forced_eos (token ids) */
    static const char *names[5] = {"bias_tokens", "bias_offsets", "bias_values", "begin_suppress", "forced_eos"};
    PyArrayObject *a[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *res = NULL;
    for (int i = 0; i < 5; i++) {
        if (o[i] == Py_None) continue;
        a[i] = (PyArrayObject *)PyArray_FROMANY(o[i], i == 2 ? NPY_FLOAT32 : NPY_INT32, 1, 1,
                                                NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST);
        if (!a[i] || PyArray_DIM(a[i], 0) > INT32_MAX / 2) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s is too long", names[i]);
            goto done;
        }
    }
    if ((a[0] != NULL) != (a[1] != NULL) || (a[1] != NULL) != (a[2] != NULL) ||
        (a[1] && (PyArray_DIM(a[1], 0) != PyArray_DIM(a[2], 0) + 1 ||
                  ((const int32_t *)PyArray_DATA(a[1]))[PyArray_DIM(a[2], 0)] != PyArray_DIM(a[0], 0)))) {
        PyErr_SetString(PyExc_ValueError, "bias_tokens, bias_offsets (n + 1, ending at len(bias_tokens)) and "
                        "bias_values (n) go together");
        goto done;
    }
    if (a[2]) {
        p.bias_toks = PyArray_DATA(a[0]);
        p.bias_off = PyArray_DATA(a[1]);
        p.bias = PyArray_DATA(a[2]);
        p.n_bias = (int)PyArray_DIM(a[2], 0);
    }
    if (a[3]) { p.begin_ban = PyArray_DATA(a[3]); p.n_begin_ban = (int)PyArray_DIM(a[3], 0); }
    if (a[4]) { p.forced_eos = PyArray_DATA(a[4]); p.n_forced_eos = (int)PyArray_DIM(a[4], 0); }
    res = fl_py_engine_submit(self, ids_o, eos_o, seed_o, &p, logprobs);
done:
    for (int i = 0; i < 5; i++) Py_XDECREF(a[i]);
    return res;
}

/* engine_submit's body, once the keyword arguments are parsed (p's arrays are the caller's until it returns). */
static PyObject *fl_py_engine_submit(FlPyModel *self, PyObject *ids_o, PyObject *eos_o, PyObject *seed_o, fl_gen_params *pp,
                                     int logprobs) {
    fl_gen_params p = *pp;
    if (on_compute_thread(self) && fl_exec_in_callback()) {
        /* this thread runs a callback of a compute-thread job (a load's progress_callback): the CPU engine's steps
         * run on that paused compute thread, so the request would wait for the callback that waits for it (a forward
         * runs nested there instead, fl_py_engine_forward; a generation loop cannot) */
        PyErr_SetString(PyExc_RuntimeError, "generate on a CPU model cannot run inside a progress_callback of a load: "
                        "the CPU's compute thread is paused in that load until the callback returns (generate after "
                        "from_pretrained returns; a forward, model(input_ids), can run there)");
        return NULL;
    }
    if (!(p.min_p >= 0 && p.min_p <= 1)) {
        PyErr_Format(PyExc_ValueError, "min_p=%g must be in [0, 1]", (double)p.min_p);
        return NULL;
    }
    if (logprobs < -1 || logprobs > FL_MAX_TOP_LOGPROBS) {
        PyErr_Format(PyExc_ValueError, "logprobs=%d must be -1 (none) or the number of most likely tokens to keep "
                     "beside the chosen one, 0 to %d", logprobs, FL_MAX_TOP_LOGPROBS);
        return NULL;
    }
    p.keep_logprob = logprobs >= 0;
    p.top_logprobs = logprobs > 0 ? logprobs : 0;
    if (!self->eng) { PyErr_SetString(PyExc_RuntimeError, "the engine is not running (engine_start first)"); return NULL; }
    int32_t eos[64];
    if (eos_o != Py_None) {
        PyObject *seq = PySequence_Fast(eos_o, "eos_token_ids must be a sequence of ints");
        if (!seq) return NULL;
        const Py_ssize_t ne = PySequence_Fast_GET_SIZE(seq);
        if (ne > 64) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "at most 64 eos token ids"); return NULL; }
        for (Py_ssize_t i = 0; i < ne; i++) {
            const long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if ((v == -1 && PyErr_Occurred()) || v < INT32_MIN || v > INT32_MAX) {
                Py_DECREF(seq);
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "eos token id %ld is out of range", v);
                return NULL;
            }
            eos[i] = (int32_t)v;
        }
        p.n_eos = (int)ne;
        Py_DECREF(seq);
    }
    p.eos = eos;
    const int group = PyList_Check(ids_o) || PyTuple_Check(ids_o);
    const Py_ssize_t B = group ? PySequence_Size(ids_o) : 1;
    if (B > 1 << 16) { PyErr_SetString(PyExc_ValueError, "engine_submit: at most 65536 prompts in one group"); return NULL; }
    if (seed_o && seed_o != Py_None && (PyList_Check(seed_o) || PyTuple_Check(seed_o)) &&
        (!group || PySequence_Size(seed_o) != B)) {
        PyErr_SetString(PyExc_ValueError, "engine_submit: a list of seeds needs a list of prompts of the same length");
        return NULL;
    }
    PyObject *res = NULL;
    PyArrayObject **arr = calloc((size_t)(B ? B : 1), sizeof *arr);
    const int32_t **rows = calloc((size_t)(B ? B : 1), sizeof *rows);
    int *lens = calloc((size_t)(B ? B : 1), sizeof *lens);
    fl_gen_params *ps = calloc((size_t)(B ? B : 1), sizeof *ps);
    fl_request **rq = calloc((size_t)(B ? B : 1), sizeof *rq);
    if (!arr || !rows || !lens || !ps || !rq) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t b = 0; b < B; b++) {
        PyObject *o = group ? PySequence_GetItem(ids_o, b) : (Py_INCREF(ids_o), ids_o);
        if (!o) goto done;
        arr[b] = (PyArrayObject *)PyArray_FROMANY(o, NPY_INT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
        Py_DECREF(o);
        if (!arr[b]) {
            PyErr_Clear();
            if (group) PyErr_Format(PyExc_ValueError, "input_ids[%zd] must be a 1-D array of integers", b);
            else PyErr_SetString(PyExc_ValueError, "input_ids must be a 1-D array of integers");
            goto done;
        }
        if (PyArray_DIM(arr[b], 0) > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "input_ids is too long"); goto done; }
        rows[b] = PyArray_DATA(arr[b]);
        lens[b] = (int)PyArray_DIM(arr[b], 0);
        ps[b] = p;
        unsigned long long sd = 0;
        if (seed_o && seed_o != Py_None) {
            PyObject *so = (PyList_Check(seed_o) || PyTuple_Check(seed_o)) ? PySequence_GetItem(seed_o, b) : (Py_INCREF(seed_o), seed_o);
            if (!so) goto done;
            sd = PyLong_AsUnsignedLongLongMask(so);
            Py_DECREF(so);
            if (PyErr_Occurred()) goto done;
        }
        ps[b].seed = sd;
    }
    fl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fl_engine_submit_group(self->eng, (int)B, rows, lens, ps, rq);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) { fl_py_raise(st); goto done; }
    if (!group) {
        res = fl_py_request_wrap((PyObject *)self, rq[0], lens[0]);
        rq[0] = NULL;
        goto done;
    }
    res = PyList_New(B);
    for (Py_ssize_t b = 0; b < B; b++) {
        PyObject *w = res ? fl_py_request_wrap((PyObject *)self, rq[b], lens[b]) : NULL; /* wrap releases on failure */
        if (!res) { fl_request_cancel(rq[b]); fl_request_release(rq[b]); }
        rq[b] = NULL;
        if (!w) { Py_CLEAR(res); continue; } /* the rest are cancelled and released; the list drops those made */
        PyList_SET_ITEM(res, b, w);
    }
done:
    if (arr) for (Py_ssize_t b = 0; b < B; b++) Py_XDECREF(arr[b]);
    free(arr); free(rows); free(lens); free(ps); free(rq);
    return res;
}

static PyObject *model_engine_stats(FlPyModel *self, PyObject *noargs) {
    (void)noargs;
    if (!self->eng) Py_RETURN_NONE;
    fl_engine_stats s;
    fl_engine_get_stats(self->eng, &s);
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:K,s:i,s:i,s:K,s:K,s:K,s:K,s:K,s:i,s:i,s:i,s:i,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:O}", "n_pages", s.n_pages,
                         "page_tokens", s.page_tokens, "pages_used", s.pages_used, "pages_cached", s.pages_cached,
                         "pool_bytes", (unsigned long long)s.pool_bytes, "waiting", s.waiting, "running", s.running,
                         "steps", (unsigned long long)s.steps, "decode_rows", (unsigned long long)s.decode_rows,
                         "prefill_tokens", (unsigned long long)s.prefill_tokens,
                         "prefix_hit_tokens", (unsigned long long)s.prefix_hit_tokens,
                         "preemptions", (unsigned long long)s.preemptions, "peak_pages_used", s.peak_pages_used,
                         "peak_running", s.peak_running, "forwards_waiting", s.forwards_waiting, "forwards_running", s.forwards_running,
                         "forwards", (unsigned long long)s.forwards, "forward_tokens", (unsigned long long)s.forward_tokens,
                         "forward_chunks", (unsigned long long)s.forward_chunks,
                         "forward_kv_peak", (unsigned long long)s.forward_kv_peak,
                         "pipelined_steps", (unsigned long long)s.pipelined_steps,
                         "wasted_rows", (unsigned long long)s.wasted_rows,
                         "replayed_tokens", (unsigned long long)s.replayed_tokens, "pool_huge_pages", s.pool_huge ? Py_True : Py_False);
}

static PyMethodDef model_methods[] = {
    {"load", (PyCFunction)(void (*)(void))model_load, METH_VARARGS | METH_KEYWORDS, "Load tensors: list of (slot, layer, unpermute_heads, file, name[, packed])."},
    {"check_complete", (PyCFunction)model_check_complete, METH_NOARGS, "Raise if a required weight was not loaded."},
    {"forward", (PyCFunction)(void (*)(void))model_forward, METH_VARARGS | METH_KEYWORDS,
     "Logits for every position: a forward request to the model's engine (started without a pool if none is)."},
    {"export", (PyCFunction)model_export, METH_VARARGS, "export(slot, layer) -> (dtype name, array): a copy of one slot's weights "
     "(a quantised weight dequantised to float32)."},
    {"rope_freqs", (PyCFunction)model_rope_freqs, METH_NOARGS, "rope_freqs() -> (inv_freq float32 [rotated dims / 2], softmax scale multiplier)."},
    {"layouts", (PyCFunction)model_layouts, METH_NOARGS, "layouts() -> list of dicts: each weight's dtype / quantised layout and bytes."},
    {"engine_start", (PyCFunction)(void (*)(void))model_engine_start, METH_VARARGS | METH_KEYWORDS,
     "engine_start(kv_bytes, page_tokens=16, max_batch=64, prefill_chunk=512, max_waiting=0, max_context=0)."},
    {"engine_stop", (PyCFunction)model_engine_stop, METH_NOARGS, "Free the engine (no request may be running)."},
    {"engine_pool", (PyCFunction)model_engine_pool, METH_VARARGS, "engine_pool(kv_bytes): the KV page pool of an engine started without one."},
    {"engine_submit", (PyCFunction)(void (*)(void))model_engine_submit, METH_VARARGS | METH_KEYWORDS,
     "engine_submit(input_ids[n], max_new_tokens, ...) -> Request."},
    {"engine_stats", (PyCFunction)model_engine_stats, METH_NOARGS, "The engine's pool and request counts, or None."},
    {NULL, NULL, 0, NULL},
};
static PyGetSetDef model_getset[] = {{"info", (getter)model_info, NULL, "device, dtype, bytes, load statistics", NULL}, {NULL}};

/* sample(logits[V] float32, n, do_sample, temperature, top_k, top_p, seed, repetition_penalty=1, seen=None,
 *        min_p=0, typical_p=0, epsilon_cutoff=0, eta_cutoff=0) -> int64[n]: n independent draws through the generation sampler (for tests). */
static PyObject *py_sample(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"logits", "n", "do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "seen",
                             "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", NULL};
    PyObject *lo, *seen_o = Py_None;
    int n = 1, do_sample = 1, top_k = 0;
    float temperature = 1.f, top_p = 1.f, rep = 1.f, min_p = 0.f, typical_p = 0.f, eps = 0.f, eta = 0.f;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ipfifKfOffff", kwlist, &lo, &n, &do_sample, &temperature, &top_k, &top_p,
                                     &seed, &rep, &seen_o, &min_p, &typical_p, &eps, &eta))
        return NULL;
    PyArrayObject *l = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST);
    if (!l) return NULL;
    PyArrayObject *seen = NULL;
    if (seen_o != Py_None && !(seen = (PyArrayObject *)PyArray_FROMANY(seen_o, NPY_INT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST))) { Py_DECREF(l); return NULL; }
    const int V = (int)PyArray_DIM(l, 0);
    npy_intp dims[1] = {n};
    PyObject *res = PyArray_SimpleNew(1, dims, NPY_INT64);
    float *buf = PyMem_Malloc((size_t)V * 4);
    int32_t *idx = PyMem_Malloc((size_t)V * 4);
    uint8_t *mark = PyMem_Malloc((size_t)V);
    if (!res || !buf || !idx || !mark || V <= 0 || n < 0) {
        Py_XDECREF(res); res = NULL;
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sample: bad arguments");
    } else {
        fl_gen_params p = {.do_sample = do_sample, .temperature = temperature, .top_k = top_k, .top_p = top_p, .min_p = min_p,
                           .typical_p = typical_p, .epsilon_cutoff = eps, .eta_cutoff = eta};
        fl_rng rng;
        fl_rng_seed(&rng, seed);
        for (int i = 0; i < n; i++) {
            memcpy(buf, PyArray_DATA(l), (size_t)V * 4);
            if (seen && rep != 1.f) fl_repetition_penalty(buf, V, PyArray_DATA(seen), (int)PyArray_DIM(seen, 0), rep, mark);
            int32_t t = fl_sample(buf, V, &p, &rng, idx, NULL);
            if (t < 0) { Py_CLEAR(res); PyErr_NoMemory(); break; }
            ((int64_t *)PyArray_DATA((PyArrayObject *)res))[i] = t;
        }
    }
    PyMem_Free(buf); PyMem_Free(idx); PyMem_Free(mark);
    Py_DECREF(l); Py_XDECREF(seen);
    return res;
}

static PyMethodDef module_methods[] = {
    {"sample", (PyCFunction)(void (*)(void))py_sample, METH_VARARGS | METH_KEYWORDS, "Draw tokens with the generation sampler (tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FlPyModel_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastload._C.Model",
    .tp_basicsize = sizeof(FlPyModel),
    .tp_dealloc = (destructor)model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A model in backend memory (C core).",
    .tp_methods = model_methods,
    .tp_getset = model_getset,
    .tp_init = (initproc)model_init,
    .tp_new = PyType_GenericNew,
};

int fl_py_init_model(PyObject *m) {
    if (PyType_Ready(&FlPyModel_Type) < 0) return -1;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&FlPyModel_Type) < 0) return -1;
    PyObject *slots = PyDict_New();
    if (!slots) return -1;
    for (int i = 0; i < FL_SLOT_COUNT; i++) {
        PyObject *v = PyLong_FromLong(i);
        if (!v || PyDict_SetItemString(slots, fl_slot_names[i], v) < 0) { Py_XDECREF(v); Py_DECREF(slots); return -1; }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, "SLOTS", slots) < 0) { Py_DECREF(slots); return -1; }
    return PyModule_AddFunctions(m, module_methods);
}
