/* py_ops.c: fastload._C.run_op(device, op, inputs, params) -> dict of numpy arrays.
 *
 * Test binding: creates a backend ("cpu" or "cuda[:N]" with params["act"] in float16 / bfloat16 /
 * float32), uploads float32 numpy inputs converted to the backend's activation dtype (weights
 * too: weights are stored in the activation dtype), poisons every output buffer (all bytes 0xFF,
 * a NaN in every float dtype), runs ONE backend op, synchronises, and returns the outputs widened
 * to float32. Tests run the same op on both backends and compare. After freeing its buffers it
 * checks that the backend's memory counter is back to zero.
 *
 * Ops, inputs (float32 unless noted) -> outputs; params in brackets:
 *   embed        tokens:int32[n], emb[V, d]                        -> x[n, d]
 *   rmsnorm      x[n, d], w[d]                                      -> out[n, d]               [eps]
 *   add_rmsnorm  resid[n, d], delta[n, d], w[d]                     -> out[n, d], resid[n, d]  [eps]
 *   matmul       x[n, C], W[R, C], bias[R] (optional)               -> y[n, R]
 *   rope_store   qkv[B*T, (nh+2nkv)*hd], pos:int32[B*T], inv_freq:float32[hd/2],
 *                k_cache, v_cache[B, max_len, nkv, hd] (optional; else poisoned),
 *                qk_norm[2*hd] (optional: Qwen3's q_norm | k_norm, applied per head before rope)
 *                                                                   -> qkv, k_cache, v_cache
 *                [B, T, start, n_heads, n_kv_heads, start_on_device, eps (q/k norm), head_dim (default
 *                 2 x inv_freq's length), rope_dims (0: head_dim; inv_freq then has rope_dims/2 entries),
 *                 rope_interleaved, rope_round (fl_rope_style)]
 *   attention    qkv, k_cache, v_cache, kmask:uint8[B, stride] (optional) -> out[B*T, nh*hd]
 *                [B, T, start, n_heads, n_kv_heads, window, scale, start_on_device]
 *   swiglu       gu[n, 2f]                                          -> out[n, f]
 *   matmul_swiglu x[n, C], W[2f, C] ([gate | up])                   -> out[n, f]   (the backend's matmul_swiglu
 *                where it has one, else matmul then swiglu)
 *   gather_rows  src[m, d], rows:int32[n] (host)                    -> dst[n, d]
 *   moe          logits[n, E], x[n, d], w13[E*2f, d], w2[E*d, f]    -> out[n, d], ids:int32[n, k], wts[n, k]
 *                [k, norm (default 1), may_sync (default 0: the grouped GEMV; 1: per-expert GEMMs when many slots)]
 *   logits_to_host src[n, vocab]                                    -> out[n, vocab]
 *   argmax_rows  logits[n, vocab]                                   -> ids:int32[n] (the backend's device argmax:
 *                the first maximum of each row's activation-dtype values; backends without one raise)
 *   qmatmul      x[n, C], q:uint8[R, C*bits/8], scales[R, C/g], zeros[R, C/g] (optional), perm:int32[C]
 *                (optional), bias[R] (optional)                     -> y[n, R]
 *                [bits (default from q's shape), group_size (default C / scales' columns),
 *                 sdtype "float16" (default) | "float32", code 0 (int, default) | 1 (nf4)]
 *   qembed       tokens:int32[n], q:uint8[V, d*bits/8], scales, zeros (optional), perm (optional) -> x[n, d]
 *                [bits (required), group_size, sdtype, code as qmatmul]
 *   quantize     src[R, C] (converted to src_dtype)                 -> q:uint8, scales, zeros (min form only)
 *                [scheme "int8" | "int4" | "nf4" (required), group_size (0: the scheme's default),
 *                 src_dtype "float32" (default) | "float16" | "bfloat16", row0, rows (default all rows;
 *                 codes and scales of the rows outside stay poisoned: 0xFF bytes)]
 * Scales and offsets go up as float32 converted to sdtype and come back widened to float32; codes and
 * perm are uploaded as they are (perm values are checked on the host first).
 * (head_dim and max_len are read off the cache / inv_freq shapes.) */
#include "py_common.h"
#include "../quant.h"

#define MAX_BUFS 24

typedef struct {
    fl_backend *be;
    void *bufs[MAX_BUFS];
    int nb;
    PyObject *inputs, *params, *out;
    const char *op;
} op_ctx;

static fl_dtype dtype_from_name(const char *s) {
    if (!strcmp(s, "float32")) return FL_F32;
    if (!strcmp(s, "float16")) return FL_F16;
    if (!strcmp(s, "bfloat16")) return FL_BF16;
    return FL_DTYPE_INVALID;
}

static int raise_st(op_ctx *c, fl_status st) {
    fl_err_prefix(st, "run_op(%s on %s)", c->op, c->be ? c->be->name : "?");
    fl_py_raise(st);
    return -1;
}

static int param_int(op_ctx *c, const char *k, long dflt, long *out) {
    PyObject *v = PyDict_GetItemString(c->params, k);
    if (!v) { *out = dflt; return 0; }
    *out = PyLong_AsLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}
static int param_float(op_ctx *c, const char *k, double dflt, float *out) {
    PyObject *v = PyDict_GetItemString(c->params, k);
    if (!v) { *out = (float)dflt; return 0; }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

/* inputs[name] as a C-contiguous array of `npy` type (a new reference), or NULL: with an
 * exception if required, without one if optional and absent. ndim checked. */
static PyArrayObject *get_arr(op_ctx *c, const char *name, int npy, int ndim, int required) {
    PyObject *v = PyDict_GetItemString(c->inputs, name);
    if (!v || v == Py_None) {
        if (required) PyErr_Format(PyExc_KeyError, "run_op(%s): input '%s' is required", c->op, name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_OTF(v, npy, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "run_op(%s): input '%s' must have %d dimensions, has %d", c->op, name, ndim,
                     PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static int track(op_ctx *c, void *p) {
    if (c->nb >= MAX_BUFS) { c->be->free(c->be, p); PyErr_SetString(PyExc_RuntimeError, "run_op: too many buffers"); return -1; }
    c->bufs[c->nb++] = p;
    return 0;
}

/* Backend buffer of `bytes`, every byte 0xFF (NaN in f32/f16/bf16). */
static void *alloc_poisoned(op_ctx *c, size_t bytes) {
    void *d = NULL;
    fl_status st = c->be->alloc(c->be, bytes, &d);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    if (track(c, d) < 0) return NULL;
    char *h = malloc(bytes ? bytes : 1);
    if (!h) { PyErr_NoMemory(); return NULL; }
    memset(h, 0xff, bytes);
    st = c->be->to_backend(c->be, d, h, bytes);
    free(h);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    return d;
}

/* Upload raw bytes (int32, uint8, or float32 kept float32). */
static void *upload_raw(op_ctx *c, PyArrayObject *a) {
    const size_t bytes = (size_t)PyArray_NBYTES(a);
    void *d = NULL;
    fl_status st = c->be->alloc(c->be, bytes, &d);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    if (track(c, d) < 0) return NULL;
    st = c->be->to_backend(c->be, d, PyArray_DATA(a), bytes);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    return d;
}

/* Upload a float32 array converted to dtype t. */
static void *upload_as(op_ctx *c, PyArrayObject *a, fl_dtype t) {
    const size_t n = (size_t)PyArray_SIZE(a), es = (size_t)fl_dtype_size(t);
    void *d = NULL;
    fl_status st = c->be->alloc(c->be, n * es, &d);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    if (track(c, d) < 0) return NULL;
    void *h = malloc(n * es + 1);
    if (!h) { PyErr_NoMemory(); return NULL; }
    st = fl_convert(h, t, PyArray_DATA(a), FL_F32, n);
    if (st == FL_OK) st = c->be->to_backend(c->be, d, h, n * es);
    free(h);
    if (st != FL_OK) { raise_st(c, st); return NULL; }
    return d;
}

/* Upload a float32 array converted to the activation dtype. */
static void *upload_act(op_ctx *c, PyArrayObject *a) { return upload_as(c, a, c->be->act); }

/* Download n = prod(shape) activation-dtype elements into out[name] as float32. */
static int download(op_ctx *c, const char *name, const void *d, int ndim, const npy_intp *shape) {
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(ndim, (npy_intp *)shape, NPY_FLOAT32);
    if (!a) return -1;
    const size_t n = (size_t)PyArray_SIZE(a), es = (size_t)fl_dtype_size(c->be->act);
    void *h = malloc(n * es + 1);
    if (!h) { Py_DECREF(a); PyErr_NoMemory(); return -1; }
    fl_status st = c->be->to_host(c->be, h, d, n * es);
    if (st == FL_OK) st = fl_convert(PyArray_DATA(a), FL_F32, h, c->be->act, n);
    free(h);
    if (st != FL_OK) { Py_DECREF(a); return raise_st(c, st); }
    int r = PyDict_SetItemString(c->out, name, (PyObject *)a);
    Py_DECREF(a);
    return r;
}

static fl_weight weight_of(op_ctx *c, void *d, int64_t rows, int64_t cols) {
    return (fl_weight){.dtype = c->be->act, .rows = rows, .cols = cols, .data_d = d};
}

#define DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))
#define BAD(...) do { PyErr_Format(PyExc_ValueError, __VA_ARGS__); goto done; } while (0)
#define RUN(call) do { fl_status st_ = (call); if (st_ == FL_OK) st_ = c->be->sync(c->be); if (st_ != FL_OK) { raise_st(c, st_); goto done; } } while (0)

static int op_embed(op_ctx *c) {
    int rc = -1;
    PyArrayObject *tok = get_arr(c, "tokens", NPY_INT32, 1, 1), *emb = tok ? get_arr(c, "emb", NPY_FLOAT32, 2, 1) : NULL;
    if (!emb) goto done;
    const int n = (int)DIM(tok, 0);
    const int64_t V = DIM(emb, 0), d = DIM(emb, 1);
    void *tok_d = upload_raw(c, tok), *emb_d = tok_d ? upload_act(c, emb) : NULL;
    void *x_d = emb_d ? alloc_poisoned(c, (size_t)n * d * fl_dtype_size(c->be->act)) : NULL;
    if (!x_d) goto done;
    const fl_weight w = weight_of(c, emb_d, V, d);
    RUN(c->be->embed(c->be, x_d, tok_d, n, &w));
    npy_intp sh[2] = {n, d};
    rc = download(c, "x", x_d, 2, sh);
done:
    Py_XDECREF(tok); Py_XDECREF(emb);
    return rc;
}

static int op_rmsnorm(op_ctx *c, int add) {
    int rc = -1;
    float eps;
    PyArrayObject *x = NULL, *delta = NULL, *w = NULL;
    if (param_float(c, "eps", 1e-6, &eps) < 0) goto done;
    x = get_arr(c, add ? "resid" : "x", NPY_FLOAT32, 2, 1);
    if (!x) goto done;
    if (add && !(delta = get_arr(c, "delta", NPY_FLOAT32, 2, 1))) goto done;
    if (!(w = get_arr(c, "w", NPY_FLOAT32, 1, 1))) goto done;
    const int64_t n = DIM(x, 0), d = DIM(x, 1);
    if (DIM(w, 0) != d || (delta && (DIM(delta, 0) != n || DIM(delta, 1) != d))) BAD("run_op(%s): shapes disagree", c->op);
    void *x_d = upload_act(c, x), *delta_d = NULL, *w_d = NULL, *out_d = NULL;
    if (!x_d) goto done;
    if (add && !(delta_d = upload_act(c, delta))) goto done;
    if (!(w_d = upload_act(c, w))) goto done;
    if (!(out_d = alloc_poisoned(c, (size_t)n * d * fl_dtype_size(c->be->act)))) goto done;
    const fl_weight wt = weight_of(c, w_d, d, 1);
    if (add) RUN(c->be->add_rmsnorm(c->be, out_d, x_d, delta_d, &wt, (int)n, eps, NULL));
    else RUN(c->be->rmsnorm(c->be, out_d, x_d, &wt, (int)n, eps, NULL));
    npy_intp sh[2] = {n, d};
    if (download(c, "out", out_d, 2, sh) < 0) goto done;
    if (add && download(c, "resid", x_d, 2, sh) < 0) goto done;
    rc = 0;
done:
    Py_XDECREF(x); Py_XDECREF(delta); Py_XDECREF(w);
    return rc;
}

static int op_matmul(op_ctx *c) {
    int rc = -1;
    PyArrayObject *x = get_arr(c, "x", NPY_FLOAT32, 2, 1), *W = x ? get_arr(c, "W", NPY_FLOAT32, 2, 1) : NULL, *b = NULL;
    if (!W) goto done;
    b = get_arr(c, "bias", NPY_FLOAT32, 1, 0);
    if (!b && PyErr_Occurred()) goto done;
    const int64_t n = DIM(x, 0), C = DIM(x, 1), R = DIM(W, 0);
    if (DIM(W, 1) != C || (b && DIM(b, 0) != R)) BAD("run_op(matmul): shapes disagree");
    void *x_d = upload_act(c, x), *W_d = x_d ? upload_act(c, W) : NULL, *b_d = NULL, *y_d = NULL;
    if (!W_d) goto done;
    if (b && !(b_d = upload_act(c, b))) goto done;
    if (!(y_d = alloc_poisoned(c, (size_t)n * R * fl_dtype_size(c->be->act)))) goto done;
    const fl_weight wt = weight_of(c, W_d, R, C), bt = weight_of(c, b_d, R, 1);
    RUN(c->be->matmul(c->be, y_d, x_d, (int)n, &wt, b ? &bt : NULL));
    npy_intp sh[2] = {n, R};
    rc = download(c, "y", y_d, 2, sh);
done:
    Py_XDECREF(x); Py_XDECREF(W); Py_XDECREF(b);
    return rc;
}

/* ---- quantised weights ---- */
static int param_str(op_ctx *c, const char *k, const char *dflt, const char **out) {
    PyObject *v = PyDict_GetItemString(c->params, k);
    if (!v) { *out = dflt; return 0; }
    if (!PyUnicode_Check(v)) { PyErr_Format(PyExc_TypeError, "run_op(%s): param '%s' must be a string", c->op, k); return -1; }
    return (*out = PyUnicode_AsUTF8(v)) ? 0 : -1;
}


/* Download into out[name]: uint8 bytes as they are (npy NPY_UINT8), or elements of dtype t widened to float32. */
static int download_as(op_ctx *c, const char *name, const void *d, int ndim, const npy_intp *shape, int npy, fl_dtype t) {
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(ndim, (npy_intp *)shape, npy);
    if (!a) return -1;
    const size_t n = (size_t)PyArray_SIZE(a), es = npy == NPY_UINT8 ? 1 : (size_t)fl_dtype_size(t);
    void *h = malloc(n * es + 1);
    if (!h) { Py_DECREF(a); PyErr_NoMemory(); return -1; }
    fl_status st = c->be->to_host(c->be, h, d, n * es);
    if (st == FL_OK) {
        if (npy == NPY_UINT8) memcpy(PyArray_DATA(a), h, n);
        else st = fl_convert(PyArray_DATA(a), FL_F32, h, t, n);
    }
    free(h);
    if (st != FL_OK) { Py_DECREF(a); return raise_st(c, st); }
    int r = PyDict_SetItemString(c->out, name, (PyObject *)a);
    Py_DECREF(a);
    return r;
}

typedef struct { PyArrayObject *q, *sc, *z, *perm; } qarrs;
static void qarrs_free(qarrs *a) { Py_XDECREF(a->q); Py_XDECREF(a->sc); Py_XDECREF(a->z); Py_XDECREF(a->perm); }

/* Reads q / scales / zeros / perm and the layout params, checks them against each other and against
 * cols C (C < 0: from q's shape and bits), uploads them and fills *w. */
static int q_weight(op_ctx *c, int64_t C, int bits_required, qarrs *a, fl_weight *w) {
    long bits, group, code;
    const char *sdt;
    if (!(a->q = get_arr(c, "q", NPY_UINT8, 2, 1)) || !(a->sc = get_arr(c, "scales", NPY_FLOAT32, 2, 1))) return -1;
    if (!(a->z = get_arr(c, "zeros", NPY_FLOAT32, 2, 0)) && PyErr_Occurred()) return -1;
    if (!(a->perm = get_arr(c, "perm", NPY_INT32, 1, 0)) && PyErr_Occurred()) return -1;
    const int64_t R = DIM(a->q, 0), qb = DIM(a->q, 1);
    if (bits_required && !PyDict_GetItemString(c->params, "bits"))
        return PyErr_Format(PyExc_KeyError, "run_op(%s): param 'bits' is required", c->op), -1;
    if (param_int(c, "bits", C > 0 && qb * 8 % C == 0 ? (long)(qb * 8 / C) : 0, &bits) < 0) return -1;
    if (C < 0) C = (bits == 4 || bits == 8) ? qb * 8 / bits : 0;
    if (param_int(c, "group_size", DIM(a->sc, 1) > 0 && C % DIM(a->sc, 1) == 0 ? (long)(C / DIM(a->sc, 1)) : 0, &group) < 0 ||
        param_int(c, "code", FL_QCODE_INT, &code) < 0 || param_str(c, "sdtype", "float16", &sdt) < 0)
        return -1;
    const fl_dtype sd = dtype_from_name(sdt);
    if (sd != FL_F16 && sd != FL_F32)
        return PyErr_Format(PyExc_ValueError, "run_op(%s): sdtype '%s' is not float16 or float32", c->op, sdt), -1;
    fl_qlayout L = {.bits = (int)bits, .group_size = (int)group, .sdtype = sd, .has_zeros = a->z != NULL,
                    .code = (int)code, .has_perm = a->perm != NULL};
    fl_status st = fl_q_check(&L, R, C);
    if (st != FL_OK) return raise_st(c, st);
    const int64_t ng = C / group;
    if (qb != C * bits / 8)
        return PyErr_Format(PyExc_ValueError, "run_op(%s): q must be [%lld, %lld] for %lld columns of %ld bits", c->op,
                            (long long)R, (long long)(C * bits / 8), (long long)C, bits), -1;
    if (DIM(a->sc, 0) != R || DIM(a->sc, 1) != ng)
        return PyErr_Format(PyExc_ValueError, "run_op(%s): scales must be [%lld, %lld]", c->op, (long long)R, (long long)ng), -1;
    if (a->z && (DIM(a->z, 0) != R || DIM(a->z, 1) != ng))
        return PyErr_Format(PyExc_ValueError, "run_op(%s): zeros must be [%lld, %lld]", c->op, (long long)R, (long long)ng), -1;
    if (a->perm) {
        if (DIM(a->perm, 0) != C)
            return PyErr_Format(PyExc_ValueError, "run_op(%s): perm must have %lld entries", c->op, (long long)C), -1;
        const int32_t *p = (const int32_t *)PyArray_DATA(a->perm);
        for (int64_t j = 0; j < C; j++)
            if (p[j] < 0 || p[j] >= C)
                return PyErr_Format(PyExc_ValueError, "run_op(%s): perm[%lld] = %d is outside [0, %lld)", c->op,
                                    (long long)j, (int)p[j], (long long)C), -1;
    }
    *w = (fl_weight){.dtype = FL_QUANT, .rows = R, .cols = C, .group_size = (int)group, .bits = (int)bits, .sdtype = sd,
                     .code = (int)code};
    if (!(w->data_d = upload_raw(c, a->q)) || !(w->scales_d = upload_as(c, a->sc, sd))) return -1;
    if (a->z && !(w->zeros_d = upload_as(c, a->z, sd))) return -1;
    if (a->perm && !(w->perm_d = upload_raw(c, a->perm))) return -1;
    return 0;
}

static int op_qmatmul(op_ctx *c) {
    int rc = -1;
    qarrs a = {0};
    fl_weight w;
    PyArrayObject *x = get_arr(c, "x", NPY_FLOAT32, 2, 1), *b = NULL;
    if (!x) goto done;
    const int64_t n = DIM(x, 0), C = DIM(x, 1);
    if (q_weight(c, C, 0, &a, &w) < 0) goto done;
    const int64_t R = w.rows;
    if (!(b = get_arr(c, "bias", NPY_FLOAT32, 1, 0)) && PyErr_Occurred()) goto done;
    if (b && DIM(b, 0) != R) BAD("run_op(qmatmul): bias must have %lld entries", (long long)R);
    void *x_d = upload_act(c, x), *b_d = NULL, *y_d = NULL;
    if (!x_d) goto done;
    if (b && !(b_d = upload_act(c, b))) goto done;
    if (!(y_d = alloc_poisoned(c, (size_t)n * R * fl_dtype_size(c->be->act)))) goto done;
    const fl_weight bt = weight_of(c, b_d, R, 1);
    /* param interleave=1: hand the weight to the backend's interleave_weight first (the layout fl_model_interleave
     * gives a loaded model's weights); out "interleaved": whether it took it */
    long il = 0;
    if (param_int(c, "interleave", 0, &il) < 0) goto done;
    int done_il = 0;
    if (il && c->be->interleave_weight) RUN(c->be->interleave_weight(c->be, &w, &done_il));
    RUN(c->be->matmul(c->be, y_d, x_d, (int)n, &w, b ? &bt : NULL));
    npy_intp sh[2] = {n, R};
    rc = download(c, "y", y_d, 2, sh);
    if (rc == 0) {
        PyObject *v = PyLong_FromLong(done_il);
        if (!v || PyDict_SetItemString(c->out, "interleaved", v) < 0) rc = -1;
        Py_XDECREF(v);
    }
done:
    Py_XDECREF(x); Py_XDECREF(b); qarrs_free(&a);
    return rc;
}

static int op_qembed(op_ctx *c) {
    int rc = -1;
    qarrs a = {0};
    fl_weight w;
    PyArrayObject *tok = get_arr(c, "tokens", NPY_INT32, 1, 1);
    if (!tok || q_weight(c, -1, 1, &a, &w) < 0) goto done;
    const int n = (int)DIM(tok, 0);
    const int64_t d = w.cols;
    void *tok_d = upload_raw(c, tok), *x_d = tok_d ? alloc_poisoned(c, (size_t)n * d * fl_dtype_size(c->be->act)) : NULL;
    if (!x_d) goto done;
    RUN(c->be->embed(c->be, x_d, tok_d, n, &w));
    npy_intp sh[2] = {n, d};
    rc = download(c, "x", x_d, 2, sh);
done:
    Py_XDECREF(tok); qarrs_free(&a);
    return rc;
}

static int op_quantize(op_ctx *c) {
    int rc = -1;
    long group, row0, rows;
    const char *scheme_s, *src_s;
    PyArrayObject *src = get_arr(c, "src", NPY_FLOAT32, 2, 1);
    if (!src) goto done;
    const int64_t R = DIM(src, 0), C = DIM(src, 1);
    if (!PyDict_GetItemString(c->params, "scheme")) {
        PyErr_Format(PyExc_KeyError, "run_op(quantize): param 'scheme' is required");
        goto done;
    }
    if (param_str(c, "scheme", "", &scheme_s) < 0 || param_str(c, "src_dtype", "float32", &src_s) < 0 ||
        param_int(c, "group_size", 0, &group) < 0 || param_int(c, "row0", 0, &row0) < 0 ||
        param_int(c, "rows", (long)R - row0, &rows) < 0)
        goto done;
    const int scheme = !strcmp(scheme_s, "int8") ? FL_QS_INT8 : !strcmp(scheme_s, "int4") ? FL_QS_INT4
                     : !strcmp(scheme_s, "nf4") ? FL_QS_NF4 : -1;
    if (scheme < 0) BAD("run_op(quantize): scheme '%s' is not int8, int4 or nf4", scheme_s);
    const fl_dtype sdt = dtype_from_name(src_s);
    if (sdt == FL_DTYPE_INVALID) BAD("run_op(quantize): src_dtype '%s' is not float32, float16 or bfloat16", src_s);
    if (group < 0 || group > INT32_MAX) BAD("run_op(quantize): group_size %ld is not valid", group);
    if (row0 < 0 || rows < 0 || row0 + rows > R) BAD("run_op(quantize): rows [%ld, %ld) outside [0, %lld)", row0, row0 + rows, (long long)R);
    fl_qlayout L;
    size_t db, sb, zb;
    fl_status st = fl_q_layout_for_scheme(scheme, (int)group, C, &L);
    if (st == FL_OK) st = fl_q_sizes(&L, R, C, &db, &sb, &zb, NULL);
    if (st != FL_OK) { raise_st(c, st); goto done; }
    if (!c->be->quantize) {
        PyErr_Format(PyExc_NotImplementedError, "run_op(quantize): the %s backend has no quantize op", c->be->name);
        goto done;
    }
    fl_weight w = {.dtype = FL_QUANT, .rows = R, .cols = C, .group_size = L.group_size, .bits = L.bits, .sdtype = L.sdtype,
                   .code = L.code};
    if (!(w.data_d = alloc_poisoned(c, db)) || !(w.scales_d = alloc_poisoned(c, sb))) goto done;
    if (L.has_zeros && !(w.zeros_d = alloc_poisoned(c, zb))) goto done;
    void *src_d = upload_as(c, src, sdt);
    if (!src_d) goto done;
    const size_t srow = (size_t)C * (size_t)fl_dtype_size(sdt);
    RUN(c->be->quantize(c->be, &w, scheme, row0, rows, (const char *)src_d + (size_t)row0 * srow, sdt));
    npy_intp shq[2] = {R, C * L.bits / 8}, shs[2] = {R, C / L.group_size};
    if (download_as(c, "q", w.data_d, 2, shq, NPY_UINT8, FL_U8) < 0 ||
        download_as(c, "scales", w.scales_d, 2, shs, NPY_FLOAT32, L.sdtype) < 0 ||
        (w.zeros_d && download_as(c, "zeros", w.zeros_d, 2, shs, NPY_FLOAT32, L.sdtype) < 0))
        goto done;
    rc = 0;
done:
    Py_XDECREF(src);
    return rc;
}

/* Shared by rope_store and attention: the step, the cache (inputs or poisoned), qkv. */
typedef struct {
    long B, T, start, nh, nkv, hd, max_len, on_dev, kv_f16;
    void *qkv_d, *k_d, *v_d;
    fl_step step;
    fl_kvcache kv;
    void *kp[1], *vp[1];
} step_ctx;

static int setup_step(op_ctx *c, step_ctx *s, PyArrayObject *qkv, int need_cache, int with_inv_freq) {
    PyArrayObject *kc = NULL, *vc = NULL, *pos = NULL, *km = NULL, *bt = NULL, *sts = NULL;
    long page_shift = 0;
    int rc = -1;
    if (param_int(c, "B", 1, &s->B) < 0 || param_int(c, "T", 1, &s->T) < 0 || param_int(c, "start", 0, &s->start) < 0 ||
        param_int(c, "n_heads", 0, &s->nh) < 0 || param_int(c, "n_kv_heads", 0, &s->nkv) < 0 ||
        param_int(c, "head_dim", 0, &s->hd) < 0 || param_int(c, "max_len", 0, &s->max_len) < 0 ||
        param_int(c, "start_on_device", 0, &s->on_dev) < 0 || param_int(c, "kv_f16", 0, &s->kv_f16) < 0)
        goto done;
    /* kv_f16: the caches held as float16 (kv_cache_dtype="float16"): given and returned as float32 values, rounded to
     * float16 on the way in */
    const fl_dtype kvt = s->kv_f16 ? FL_F16 : c->be->act;
    const fl_status kst = fl_kv_dtype_ok(c->be, kvt);
    if (kst != FL_OK) { raise_st(c, kst); goto done; }
    /* paged (fl_kv_paging): block_table [B, nb] int32 and page_shift; the caches are then pools [n_pages, page, nkv,
     * hd] (page = 1 << page_shift) and max_len is nb * page. starts [B] int32: per-row starts (paged or not). */
    if (!(bt = get_arr(c, "block_table", NPY_INT32, 2, 0)) && PyErr_Occurred()) goto done;
    if (!(sts = get_arr(c, "starts", NPY_INT32, 1, 0)) && PyErr_Occurred()) goto done;
    if (param_int(c, "page_shift", 0, &page_shift) < 0) goto done;
    if (bt && (page_shift < 0 || page_shift > 12)) BAD("run_op(%s): page_shift must be in [0, 12]", c->op);
    kc = get_arr(c, "k_cache", NPY_FLOAT32, 4, need_cache || bt);
    if (!kc && PyErr_Occurred()) goto done;
    vc = get_arr(c, "v_cache", NPY_FLOAT32, 4, need_cache);
    if (!vc && PyErr_Occurred()) goto done;
    if ((kc == NULL) != (vc == NULL)) BAD("run_op(%s): give both k_cache and v_cache or neither", c->op);
    if (kc) { s->max_len = (long)DIM(kc, 1); s->hd = (long)DIM(kc, 3); }
    long n_pages = 0;
    if (bt) {
        if (DIM(kc, 1) != (1L << page_shift)) BAD("run_op(%s): paged caches must be [n_pages, 1 << page_shift, nkv, hd]", c->op);
        n_pages = (long)DIM(kc, 0);
        if (DIM(bt, 0) != s->B) BAD("run_op(%s): block_table must have B rows", c->op);
        s->max_len = (long)DIM(bt, 1) << page_shift;
        for (npy_intp i = 0; i < PyArray_SIZE(bt); i++) {
            const int32_t id = ((const int32_t *)PyArray_DATA(bt))[i];
            if (id < 0 || id >= n_pages) BAD("run_op(%s): block_table entry %d is not a page of %ld", c->op, (int)id, n_pages);
        }
    }
    if (sts) {
        if (DIM(sts, 0) != s->B) BAD("run_op(%s): starts must have B entries", c->op);
        for (long b = 0; b < s->B; b++) {
            const int32_t v = ((const int32_t *)PyArray_DATA(sts))[b];
            if (v < 0 || v + s->T > s->max_len) BAD("run_op(%s): starts[%ld] = %d does not fit max_len %ld", c->op, b, (int)v, s->max_len);
        }
    }
    const int64_t N = (int64_t)s->B * s->T, width = (int64_t)(s->nh + 2 * s->nkv) * s->hd;
    if (s->B <= 0 || s->T <= 0 || s->nh <= 0 || s->nkv <= 0 || s->hd <= 0 || s->nh % s->nkv || s->max_len <= 0 ||
        s->start < 0 || s->start + s->T > s->max_len)
        BAD("run_op(%s): bad B/T/start/n_heads/n_kv_heads/head_dim/max_len", c->op);
    if (DIM(qkv, 0) != N || DIM(qkv, 1) != width) BAD("run_op(%s): qkv must be [%lld, %lld]", c->op, (long long)N, (long long)width);
    if (kc && !bt && (DIM(kc, 0) != s->B || DIM(kc, 2) != s->nkv || DIM(vc, 0) != s->B || DIM(vc, 1) != s->max_len ||
                      DIM(vc, 2) != s->nkv || DIM(vc, 3) != s->hd))
        BAD("run_op(%s): caches must be [B, max_len, n_kv_heads, head_dim]", c->op);
    if (bt && (DIM(kc, 2) != s->nkv || DIM(vc, 0) != DIM(kc, 0) || DIM(vc, 1) != DIM(kc, 1) || DIM(vc, 2) != s->nkv ||
               DIM(vc, 3) != s->hd))
        BAD("run_op(%s): paged caches must both be [n_pages, page, n_kv_heads, head_dim]", c->op);
    const size_t cache_bytes = (size_t)s->B * s->max_len * s->nkv * s->hd * fl_dtype_size(kvt);
    if (!(s->qkv_d = upload_act(c, qkv))) goto done;
    s->k_d = kc ? upload_as(c, kc, kvt) : alloc_poisoned(c, cache_bytes);
    if (!s->k_d) goto done;
    s->v_d = vc ? upload_as(c, vc, kvt) : alloc_poisoned(c, cache_bytes);
    if (!s->v_d) goto done;
    s->step = (fl_step){.batch = (int)s->B, .n_new = (int)s->T, .start = (int)s->start};
    if (s->on_dev) {
        /* the device start is the truth; poison the host one to prove it is not read (not on
         * the CPU backend, which reads the host value only) */
        int32_t st32 = (int32_t)s->start;
        void *sd = NULL;
        fl_status st = c->be->alloc(c->be, 4, &sd);
        if (st != FL_OK) { raise_st(c, st); goto done; }
        if (track(c, sd) < 0) goto done;
        if ((st = c->be->to_backend(c->be, sd, &st32, 4)) != FL_OK) { raise_st(c, st); goto done; }
        s->step.start_d = sd;
        if (strcmp(c->be->name, "cpu") != 0) s->step.start = -12345;
    }
    if (with_inv_freq) {
        if (!(pos = get_arr(c, "pos", NPY_INT32, 1, 1))) goto done;
        if (DIM(pos, 0) != N) BAD("run_op(%s): pos must have B*T entries", c->op);
        if (!(s->step.pos_d = upload_raw(c, pos))) goto done;
    } else {
        if (!(km = get_arr(c, "kmask", NPY_UINT8, 2, 0)) && PyErr_Occurred()) goto done;
        if (km) {
            if (DIM(km, 0) != s->B || DIM(km, 1) < s->start + s->T) BAD("run_op(%s): kmask must be [B, >= start+T]", c->op);
            if (!(s->step.kmask_d = upload_raw(c, km))) goto done;
            s->step.kmask_stride = (int)DIM(km, 1);
        }
    }
    s->kp[0] = s->k_d; s->vp[0] = s->v_d;
    s->kv = (fl_kvcache){.n_layers = 1, .batch = (int)s->B, .max_len = (int)s->max_len, .n_kv_heads = (int)s->nkv,
                         .head_dim = (int)s->hd, .dtype = kvt, .k_d = s->kp, .v_d = s->vp};
    if (bt) {
        s->kv.batch = 0;
        s->kv.n_pages = (int)n_pages;
        s->kv.page_shift = (int)page_shift;
        if (!(s->step.pg.btab_d = upload_raw(c, bt))) goto done;
        s->step.pg.btab_stride = (int)DIM(bt, 1);
        s->step.pg.page_shift = (int)page_shift;
    }
    if (sts && !(s->step.pg.starts_d = upload_raw(c, sts))) goto done;
    rc = 0;
done:
    Py_XDECREF(kc); Py_XDECREF(vc); Py_XDECREF(pos); Py_XDECREF(km); Py_XDECREF(bt); Py_XDECREF(sts);
    return rc;
}

/* rope_store, or with `att` rope_attention: the same rotation, then attention (params window, scale) through the
 * backend's fused op. That op only fuses where a forward's layer 0 has written the cos / sin table, so it runs
 * twice: as layer 0 on copies of q|k|v and the caches (discarded), then as layer 1 on the inputs; out, k_cache and
 * v_cache are layer 1's (q|k|v is not returned: a fused op may leave it unrotated). */
static int op_rope(op_ctx *c, int att) {
    int rc = -1;
    step_ctx s;
    memset(&s, 0, sizeof s);
    PyArrayObject *qkv = get_arr(c, "qkv", NPY_FLOAT32, 2, 1), *inv = qkv ? get_arr(c, "inv_freq", NPY_FLOAT32, 1, 1) : NULL;
    PyArrayObject *qkn = NULL;
    float eps;
    if (!inv) goto done;
    if (!(qkn = get_arr(c, "qk_norm", NPY_FLOAT32, 1, 0)) && PyErr_Occurred()) goto done;
    if (param_float(c, "eps", 1e-6, &eps) < 0) goto done;
    long rdims, rinter, rround;
    if (param_int(c, "rope_dims", 0, &rdims) < 0 || param_int(c, "rope_interleaved", 0, &rinter) < 0 ||
        param_int(c, "rope_round", 0, &rround) < 0)
        goto done;
    if (rdims < 0 || rdims > 1024) BAD("run_op(%s): rope_dims must be in [0, 1024]", c->op);
    const fl_rope_style style = {.dims = (int)rdims, .interleaved = rinter != 0, .round_cs = rround != 0};
    if (!PyDict_GetItemString(c->params, "head_dim")) {
        PyObject *hd = PyLong_FromLong((long)(2 * DIM(inv, 0)));  /* head_dim from inv_freq */
        if (!hd || PyDict_SetItemString(c->params, "head_dim", hd) < 0) { Py_XDECREF(hd); goto done; }
        Py_DECREF(hd);
    }
    if (setup_step(c, &s, qkv, 0, 1) < 0) goto done;
    if (DIM(inv, 0) * 2 != (rdims ? rdims : s.hd)) BAD("run_op(%s): inv_freq must have rope_dims/2 entries", c->op);
    void *inv_d = upload_raw(c, inv), *qkn_d = NULL;
    if (!inv_d) goto done;
    if (qkn && DIM(qkn, 0) != 2 * s.hd) BAD("run_op(%s): qk_norm must have 2 * head_dim entries", c->op);
    if (qkn && !(qkn_d = upload_act(c, qkn))) goto done;
    const fl_weight qkw = weight_of(c, qkn_d, 2 * s.hd, 1);
    npy_intp shc[4] = {(npy_intp)s.B, (npy_intp)s.max_len, (npy_intp)s.nkv, (npy_intp)s.hd};
    if (s.kv.n_pages) { shc[0] = s.kv.n_pages; shc[1] = (npy_intp)1 << s.kv.page_shift; }
    if (att) {
        long window;
        float scale;
        if (param_int(c, "window", 0, &window) < 0 || param_float(c, "scale", 1.0 / sqrt((double)s.hd), &scale) < 0)
            goto done;
        PyArrayObject *kc = get_arr(c, "k_cache", NPY_FLOAT32, 4, 1), *vc = kc ? get_arr(c, "v_cache", NPY_FLOAT32, 4, 1) : NULL;
        void *q0 = vc ? upload_act(c, qkv) : NULL, *k0 = q0 ? upload_as(c, kc, s.kv.dtype) : NULL;
        void *v0 = k0 ? upload_as(c, vc, s.kv.dtype) : NULL;
        Py_XDECREF(kc); Py_XDECREF(vc);
        const size_t ob = (size_t)s.B * s.T * s.nh * s.hd * fl_dtype_size(c->be->act);
        void *o0 = v0 ? alloc_poisoned(c, ob) : NULL, *out_d = o0 ? alloc_poisoned(c, ob) : NULL;
        if (!out_d) goto done;
        void *kp[2] = {k0, s.k_d}, *vp[2] = {v0, s.v_d};
        fl_kvcache kv2 = s.kv;
        kv2.n_layers = 2; kv2.k_d = kp; kv2.v_d = vp;
        const fl_weight *qn = qkn ? &qkw : NULL;
        RUN(fl_rope_attention(c->be, o0, q0, &s.step, &kv2, 0, (int)s.nh, inv_d, &style, qn, eps, (int)window, scale, NULL));
        RUN(fl_rope_attention(c->be, out_d, s.qkv_d, &s.step, &kv2, 1, (int)s.nh, inv_d, &style, qn, eps, (int)window,
                              scale, NULL));
        npy_intp sho[2] = {(npy_intp)(s.B * s.T), (npy_intp)(s.nh * s.hd)};
        if (download(c, "out", out_d, 2, sho) < 0) goto done;
    } else {
        RUN(c->be->rope_store(c->be, s.qkv_d, &s.step, &s.kv, 0, (int)s.nh, inv_d, &style, qkn ? &qkw : NULL, eps));
        npy_intp shq[2] = {(npy_intp)(s.B * s.T), (npy_intp)((s.nh + 2 * s.nkv) * s.hd)};
        if (download(c, "qkv", s.qkv_d, 2, shq) < 0) goto done;
    }
    if (download_as(c, "k_cache", s.k_d, 4, shc, NPY_FLOAT32, s.kv.dtype) < 0 ||
        download_as(c, "v_cache", s.v_d, 4, shc, NPY_FLOAT32, s.kv.dtype) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(qkv); Py_XDECREF(inv); Py_XDECREF(qkn);
    return rc;
}

static int op_attention(op_ctx *c) {
    int rc = -1;
    step_ctx s;
    memset(&s, 0, sizeof s);
    long window;
    float scale;
    PyArrayObject *qkv = get_arr(c, "qkv", NPY_FLOAT32, 2, 1);
    if (!qkv) goto done;
    if (param_int(c, "window", 0, &window) < 0) goto done;
    if (setup_step(c, &s, qkv, 1, 0) < 0) goto done;
    if (param_float(c, "scale", 1.0 / sqrt((double)s.hd), &scale) < 0) goto done;
    void *out_d = alloc_poisoned(c, (size_t)s.B * s.T * s.nh * s.hd * fl_dtype_size(c->be->act));
    if (!out_d) goto done;
    RUN(c->be->attention(c->be, out_d, s.qkv_d, &s.step, &s.kv, 0, (int)s.nh, (int)window, scale, NULL));
    npy_intp sh[2] = {(npy_intp)(s.B * s.T), (npy_intp)(s.nh * s.hd)};
    rc = download(c, "out", out_d, 2, sh);
done:
    Py_XDECREF(qkv);
    return rc;
}

static int op_matmul_swiglu(op_ctx *c) {
    int rc = -1;
    PyArrayObject *x = get_arr(c, "x", NPY_FLOAT32, 2, 1), *W = x ? get_arr(c, "W", NPY_FLOAT32, 2, 1) : NULL;
    if (!W) goto done;
    const int64_t n = DIM(x, 0), C = DIM(x, 1), R = DIM(W, 0), f = R / 2;
    if (DIM(W, 1) != C || R % 2) BAD("run_op(matmul_swiglu): W must be [2f, C] for x [n, C]");
    void *x_d = upload_act(c, x), *W_d = x_d ? upload_act(c, W) : NULL, *gu_d = NULL, *out_d = NULL;
    if (!W_d || !(gu_d = alloc_poisoned(c, (size_t)n * R * fl_dtype_size(c->be->act))) ||
        !(out_d = alloc_poisoned(c, (size_t)n * f * fl_dtype_size(c->be->act))))
        goto done;
    const fl_weight wt = weight_of(c, W_d, R, C);
    if (c->be->matmul_swiglu) {
        RUN(c->be->matmul_swiglu(c->be, out_d, gu_d, x_d, (int)n, &wt, (int)f, NULL));
    } else {
        RUN(c->be->matmul(c->be, gu_d, x_d, (int)n, &wt, NULL));
        RUN(c->be->swiglu(c->be, out_d, gu_d, (int)n, (int)f, NULL));
    }
    npy_intp sh[2] = {n, f};
    rc = download(c, "out", out_d, 2, sh);
done:
    Py_XDECREF(x); Py_XDECREF(W);
    return rc;
}

static int op_swiglu(op_ctx *c) {
    int rc = -1;
    PyArrayObject *gu = get_arr(c, "gu", NPY_FLOAT32, 2, 1);
    if (!gu) goto done;
    const int64_t n = DIM(gu, 0), f = DIM(gu, 1) / 2;
    if (DIM(gu, 1) % 2) BAD("run_op(swiglu): gu must have an even number of columns");
    void *gu_d = upload_act(c, gu), *out_d = gu_d ? alloc_poisoned(c, (size_t)n * f * fl_dtype_size(c->be->act)) : NULL;
    if (!out_d) goto done;
    RUN(c->be->swiglu(c->be, out_d, gu_d, (int)n, (int)f, NULL));
    npy_intp sh[2] = {n, f};
    rc = download(c, "out", out_d, 2, sh);
done:
    Py_XDECREF(gu);
    return rc;
}

/* moe: router logits[n, E], x[n, d], w13[E*2f, d], w2[E*d, f] -> out[n, d], ids:int32[n, k], wts:float32[n, k]
 * [k, norm (1), may_sync (0)]: moe_route then moe_ffn, as model.c calls them */
static int op_moe(op_ctx *c) {
    int rc = -1;
    int32_t *offs_h = NULL;
    PyArrayObject *lg = get_arr(c, "logits", NPY_FLOAT32, 2, 1), *x = lg ? get_arr(c, "x", NPY_FLOAT32, 2, 1) : NULL;
    PyArrayObject *w13 = x ? get_arr(c, "w13", NPY_FLOAT32, 2, 1) : NULL, *w2 = w13 ? get_arr(c, "w2", NPY_FLOAT32, 2, 1) : NULL;
    if (!w2) goto done;
    long k = 0, norm = 1, may_sync = 0;
    if (param_int(c, "k", 2, &k) < 0 || param_int(c, "norm", 1, &norm) < 0 || param_int(c, "may_sync", 0, &may_sync) < 0)
        goto done;
    const int64_t n = DIM(x, 0), d = DIM(x, 1), E = DIM(lg, 1), f = DIM(w2, 1);
    if (DIM(lg, 0) != n || E < 1 || E > FL_MOE_MAX_EXPERTS || k < 1 || k > E || k > FL_MOE_MAX_K ||
        DIM(w13, 0) != E * 2 * f || DIM(w13, 1) != d || DIM(w2, 0) != E * d)
        BAD("run_op(moe): shapes disagree (logits [n, E], x [n, d], w13 [E*2f, d], w2 [E*d, f], 1 <= k <= E)");
    const int64_t nk = n * k;
    const size_t a = (size_t)fl_dtype_size(c->be->act);
    fl_moe_scratch ws = {0};
    void *lg_d = upload_act(c, lg), *x_d = lg_d ? upload_act(c, x) : NULL, *w13_d = x_d ? upload_act(c, w13) : NULL;
    void *w2_d = w13_d ? upload_act(c, w2) : NULL, *out_d = w2_d ? alloc_poisoned(c, (size_t)(n * d) * a) : NULL;
    int32_t *ids_d = out_d ? alloc_poisoned(c, (size_t)nk * 4) : NULL;
    float *wts_d = ids_d ? alloc_poisoned(c, (size_t)nk * 4) : NULL;
    if (!wts_d || !(ws.gu = alloc_poisoned(c, (size_t)(nk * 2 * f) * a)) || !(ws.ff = alloc_poisoned(c, (size_t)(nk * f) * a)) ||
        !(ws.y = alloc_poisoned(c, (size_t)(nk * d) * a)) || !(ws.xs = alloc_poisoned(c, (size_t)(nk * d) * a)) ||
        !(ws.perm = alloc_poisoned(c, (size_t)nk * 4)) || !(ws.inv = alloc_poisoned(c, (size_t)nk * 4)) ||
        !(ws.offs = alloc_poisoned(c, (size_t)(2 * E + 2) * 4)))
        goto done;
    if (!(offs_h = malloc((size_t)(E + 1) * 4))) { PyErr_NoMemory(); goto done; }
    ws.offs_h = offs_h;
    const fl_weight W13 = weight_of(c, w13_d, E * 2 * f, d), W2 = weight_of(c, w2_d, E * d, f);
    RUN(c->be->moe_route(c->be, ids_d, wts_d, lg_d, (int)n, (int)E, (int)k, (int)norm));
    RUN(c->be->moe_ffn(c->be, out_d, x_d, (int)n, ids_d, wts_d, (int)k, (int)E, &W13, &W2, &ws, (int)may_sync));
    npy_intp sh[2] = {n, d}, shk[2] = {n, k};
    if (download(c, "out", out_d, 2, sh) < 0 || download_as(c, "wts", wts_d, 2, shk, NPY_FLOAT32, FL_F32) < 0) goto done;
    PyArrayObject *ids = (PyArrayObject *)PyArray_SimpleNew(2, shk, NPY_INT32);
    if (!ids) goto done;
    fl_status st = c->be->to_host(c->be, PyArray_DATA(ids), ids_d, (size_t)nk * 4);
    if (st != FL_OK) { Py_DECREF(ids); raise_st(c, st); goto done; }
    rc = PyDict_SetItemString(c->out, "ids", (PyObject *)ids);
    Py_DECREF(ids);
done:
    free(offs_h);
    Py_XDECREF(lg); Py_XDECREF(x); Py_XDECREF(w13); Py_XDECREF(w2);
    return rc;
}

static int op_gather_rows(op_ctx *c) {
    int rc = -1;
    PyArrayObject *src = get_arr(c, "src", NPY_FLOAT32, 2, 1), *rows = src ? get_arr(c, "rows", NPY_INT32, 1, 1) : NULL;
    if (!rows) goto done;
    const int64_t m = DIM(src, 0), d = DIM(src, 1), n = DIM(rows, 0);
    const int32_t *r = (const int32_t *)PyArray_DATA(rows);
    for (int64_t i = 0; i < n; i++)
        if (r[i] < 0 || r[i] >= m) BAD("run_op(gather_rows): row %d outside [0, %lld)", (int)r[i], (long long)m);
    void *src_d = upload_act(c, src), *dst_d = src_d ? alloc_poisoned(c, (size_t)n * d * fl_dtype_size(c->be->act)) : NULL;
    if (!dst_d) goto done;
    RUN(c->be->gather_rows(c->be, dst_d, src_d, r, (int)n, (int)d));
    npy_intp sh[2] = {n, d};
    rc = download(c, "dst", dst_d, 2, sh);
done:
    Py_XDECREF(src); Py_XDECREF(rows);
    return rc;
}

static int op_logits_to_host(op_ctx *c) {
    int rc = -1;
    PyArrayObject *src = get_arr(c, "src", NPY_FLOAT32, 2, 1), *out = NULL;
    if (!src) goto done;
    npy_intp sh[2] = {PyArray_DIM(src, 0), PyArray_DIM(src, 1)};
    void *src_d = upload_act(c, src);
    if (!src_d) goto done;
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(2, sh, NPY_FLOAT32))) goto done;
    memset(PyArray_DATA(out), 0xff, (size_t)PyArray_NBYTES(out));
    RUN(c->be->logits_to_host(c->be, (float *)PyArray_DATA(out), src_d, (int)sh[0], (int)sh[1]));
    rc = PyDict_SetItemString(c->out, "out", (PyObject *)out);
done:
    Py_XDECREF(src); Py_XDECREF(out);
    return rc;
}

static int op_argmax_rows(op_ctx *c) {
    int rc = -1;
    PyArrayObject *src = get_arr(c, "logits", NPY_FLOAT32, 2, 1), *out = NULL;
    if (!src) goto done;
    if (!c->be->argmax_rows) {
        PyErr_Format(PyExc_NotImplementedError, "run_op(argmax_rows): the %s backend has no device argmax", c->be->name);
        goto done;
    }
    npy_intp sh[1] = {PyArray_DIM(src, 0)};
    void *src_d = upload_act(c, src);
    if (!src_d) goto done;
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, sh, NPY_INT32))) goto done;
    memset(PyArray_DATA(out), 0xff, (size_t)PyArray_NBYTES(out));
    RUN(c->be->argmax_rows(c->be, (int32_t *)PyArray_DATA(out), src_d, (int)sh[0], (int)PyArray_DIM(src, 1)));
    rc = PyDict_SetItemString(c->out, "ids", (PyObject *)out);
done:
    Py_XDECREF(src); Py_XDECREF(out);
    return rc;
}

static PyObject *py_run_op(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"device", "op", "inputs", "params", NULL};
    const char *device, *op;
    PyObject *inputs, *params = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ssO!|O!", kwlist, &device, &op, &PyDict_Type, &inputs, &PyDict_Type, &params))
        return NULL;
    op_ctx c;
    memset(&c, 0, sizeof c);
    c.op = op;
    c.inputs = inputs;
    c.params = params ? PyDict_Copy(params) : PyDict_New();  /* a copy: defaults may be added */
    if (!c.params) return NULL;
    const char *act_name = "float32";
    PyObject *a = PyDict_GetItemString(c.params, "act");
    if (a && !(act_name = PyUnicode_AsUTF8(a))) { Py_DECREF(c.params); return NULL; }
    const fl_dtype act = dtype_from_name(act_name);
    if (act == FL_DTYPE_INVALID) {
        Py_DECREF(c.params);
        return PyErr_Format(PyExc_ValueError, "run_op: act '%s' is not float32, float16 or bfloat16", act_name);
    }
    fl_status st;
    if (!strcmp(device, "cpu")) {
        if (act != FL_F32) { Py_DECREF(c.params); return PyErr_Format(PyExc_ValueError, "run_op: the CPU backend computes in float32"); }
        st = fl_backend_cpu_create(0, &c.be);
    } else if (!strncmp(device, "cuda", 4) && (device[4] == 0 || device[4] == ':')) {
        st = fl_backend_cuda_create(device[4] == ':' ? atoi(device + 5) : 0, act, &c.be);
    } else {
        Py_DECREF(c.params);
        return PyErr_Format(PyExc_ValueError, "run_op: device '%s' is not 'cpu' or 'cuda[:N]'", device);
    }
    if (st != FL_OK) { Py_DECREF(c.params); return fl_py_raise(st); }
    int rc = -1;
    c.out = PyDict_New();
    if (c.out) {
        if (!strcmp(op, "embed")) rc = op_embed(&c);
        else if (!strcmp(op, "rmsnorm")) rc = op_rmsnorm(&c, 0);
        else if (!strcmp(op, "add_rmsnorm")) rc = op_rmsnorm(&c, 1);
        else if (!strcmp(op, "matmul")) rc = op_matmul(&c);
        else if (!strcmp(op, "rope_store")) rc = op_rope(&c, 0);
        else if (!strcmp(op, "rope_attention")) rc = op_rope(&c, 1);
        else if (!strcmp(op, "attention")) rc = op_attention(&c);
        else if (!strcmp(op, "swiglu")) rc = op_swiglu(&c);
        else if (!strcmp(op, "matmul_swiglu")) rc = op_matmul_swiglu(&c);
        else if (!strcmp(op, "gather_rows")) rc = op_gather_rows(&c);
        else if (!strcmp(op, "moe")) rc = op_moe(&c);
        else if (!strcmp(op, "logits_to_host")) rc = op_logits_to_host(&c);
        else if (!strcmp(op, "argmax_rows")) rc = op_argmax_rows(&c);
        else if (!strcmp(op, "qmatmul")) rc = op_qmatmul(&c);
        else if (!strcmp(op, "qembed")) rc = op_qembed(&c);
        else if (!strcmp(op, "quantize")) rc = op_quantize(&c);
        else PyErr_Format(PyExc_ValueError, "run_op: unknown op '%s'", op);
    }
    for (int i = 0; i < c.nb; i++) c.be->free(c.be, c.bufs[i]);
    if (rc == 0 && c.be->mem_allocated != 0) {
        PyErr_Format(PyExc_RuntimeError, "run_op(%s on %s): the backend reports %llu bytes allocated after every buffer "
                     "was freed", op, c.be->name, (unsigned long long)c.be->mem_allocated);
        rc = -1;
    }
    c.be->destroy(c.be);
    Py_DECREF(c.params);
    if (rc < 0) { Py_XDECREF(c.out); return NULL; }
    return c.out;
}

static PyMethodDef methods[] = {
    {"run_op", (PyCFunction)(void (*)(void))py_run_op, METH_VARARGS | METH_KEYWORDS,
     "run_op(device, op, inputs, params) -> dict: one backend op on numpy inputs (tests)."},
    {NULL, NULL, 0, NULL},
};

int fl_py_init_ops(PyObject *m) { return PyModule_AddFunctions(m, methods); }
