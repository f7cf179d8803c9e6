/* py_gguf.c: fastload._C.GGUFFile, the Python face of gguf.c.
 *
 *   f = GGUFFile(path)              # mmap + header validation, GIL released
 *   f.path, f.version, f.alignment, f.data_offset, f.closed
 *   f.metadata                      # dict, built once on first use and cached
 *   f.tensors()                     # [(name, type_name, type_id, shape, nbytes)], file order
 *   f.dequantize(name, dtype="float32", threads=None)   # numpy array, Hugging Face shape
 *   f.raw(name)                     # read-only uint8 view of the tensor's bytes (base: f)
 *   f.close(); with GGUFFile(p) as f: ...
 *
 * Shapes are given in Hugging Face order (ggml's ne reversed: outermost first), so a ggml
 * tensor with ne = [576, 1536] is a (1536, 576) array.
 *
 * Strings (keys, values, tensor names) are decoded as UTF-8 with errors="surrogateescape":
 * lossless, since s.encode("utf-8", "surrogateescape") gives back the file's exact bytes, and
 * identical to a strict decode for the valid UTF-8 that every real vocabulary holds.
 *
 * Lifetime: raw() views keep the file object alive (their base) and so the mapping. close()
 * unmaps at once unless a raw() view is still alive or a dequantize() runs in another thread;
 * then the mapping goes when the last of those is gone (at the latest when the object is freed).
 * After close() every method raises ValueError. */
#include "py_common.h"
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    FlPyGGUF base;       /* base.g: the parsed file; NULL once unmapped */
    PyObject *path;      /* str */
    PyObject *meta;      /* cached metadata dict, or NULL */
    PyObject *views;     /* list of weakrefs to arrays handed out by raw() */
    int busy;            /* dequantize() calls running with the GIL released */
    int closed;
} GG;

/* ---- helpers ---- */

/* fl_py_raise with a message that is always valid UTF-8: bytes from the file or the path that
 * are not (or a multi-byte character cut by the message buffer) become \xNN escapes instead of
 * turning the error into a UnicodeDecodeError. */
static PyObject *raise_status(fl_status st) {
    const char *m = fl_err_msg();
    PyObject *u = PyUnicode_DecodeUTF8(m, (Py_ssize_t)strlen(m), "backslashreplace");
    if (u) {
        const char *clean = PyUnicode_AsUTF8(u);
        if (clean) fl_err(st, "%s", clean);
        Py_DECREF(u);
    }
    PyErr_Clear();
    return fl_py_raise(st);
}

static PyObject *decode_str(const char *s, uint64_t n) {
    if (n > (uint64_t)PY_SSIZE_T_MAX) { PyErr_SetString(PyExc_OverflowError, "string too long"); return NULL; }
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "surrogateescape");
}

/* 1 if the weak reference still points at a live object. */
static int weak_alive(PyObject *w) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *o = NULL;
    int r = PyWeakref_GetRef(w, &o);
    if (r < 0) PyErr_Clear();
    Py_XDECREF(o);
    return r > 0;
#else
    PyObject *o = PyWeakref_GetObject(w); /* borrowed */
    return o != NULL && o != Py_None;
#endif
}

static int views_alive(GG *self) {
    if (!self->views) return 0;
    Py_ssize_t n = PyList_GET_SIZE(self->views);
    for (Py_ssize_t i = 0; i < n; i++)
        if (weak_alive(PyList_GET_ITEM(self->views, i))) return 1;
    return 0;
}

/* Unmap if closed and nothing uses the mapping any more. */
static void maybe_release(GG *self) {
    if (self->closed && self->base.g && self->busy == 0 && !views_alive(self)) {
        fl_gguf_close(self->base.g);
        self->base.g = NULL;
        Py_CLEAR(self->views);
    }
}

static int check_open(GG *self) {
    if (self->closed || !self->base.g) {
        if (self->path) PyErr_Format(PyExc_ValueError, "%U: I/O operation on a closed GGUF file", self->path);
        else PyErr_SetString(PyExc_ValueError, "GGUFFile is closed or was never opened");
        return -1;
    }
    return 0;
}

static const fl_gguf_tensor *get_tensor(GG *self, PyObject *name) {
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "tensor name must be str, not %.100s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    PyObject *b = PyUnicode_AsEncodedString(name, "utf-8", "surrogateescape");
    if (!b) return NULL;
    int64_t idx = -1;
    if (strlen(PyBytes_AS_STRING(b)) == (size_t)PyBytes_GET_SIZE(b))
        idx = fl_gguf_find_tensor(self->base.g, PyBytes_AS_STRING(b));
    Py_DECREF(b);
    if (idx < 0) {
        PyObject *msg = PyUnicode_FromFormat("%U: no tensor named '%U'", self->path, name);
        if (msg) { PyErr_SetObject(PyExc_KeyError, msg); Py_DECREF(msg); }
        return NULL;
    }
    return &self->base.g->tensors[idx];
}

/* ---- type slots ---- */

static int gg_init(GG *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"path", NULL};
    PyObject *pathb = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O&:GGUFFile", kwlist, PyUnicode_FSConverter, &pathb)) return -1;
    if (self->base.g) { fl_gguf_close(self->base.g); self->base.g = NULL; }
    Py_CLEAR(self->path); Py_CLEAR(self->meta); Py_CLEAR(self->views);
    self->closed = 0; self->busy = 0;
    const char *p = PyBytes_AS_STRING(pathb);
    if (strlen(p) != (size_t)PyBytes_GET_SIZE(pathb)) {
        Py_DECREF(pathb);
        PyErr_SetString(PyExc_ValueError, "GGUFFile: embedded NUL in path");
        return -1;
    }
    fl_gguf *g = NULL;
    fl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fl_gguf_open(p, &g);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) {
        raise_status(st);
        Py_DECREF(pathb);
        return -1;
    }
    self->path = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(pathb), PyBytes_GET_SIZE(pathb));
    Py_DECREF(pathb);
    self->views = PyList_New(0);
    self->base.g = g;
    if (!self->path || !self->views) return -1;
    return 0;
}

static void gg_dealloc(GG *self) {
    if (self->base.g) fl_gguf_close(self->base.g);
    self->base.g = NULL;
    Py_CLEAR(self->path);
    Py_CLEAR(self->meta);
    Py_CLEAR(self->views);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *gg_repr(GG *self) {
    if (self->closed || !self->base.g) return PyUnicode_FromFormat("<GGUFFile %R (closed)>", self->path ? self->path : Py_None);
    return PyUnicode_FromFormat("<GGUFFile %R v%u: %llu tensors, %llu metadata keys>", self->path,
                                (unsigned)self->base.g->version, (unsigned long long)self->base.g->n_tensors,
                                (unsigned long long)self->base.g->n_kv);
}

/* ---- metadata ---- */

static PyObject *scalar_value(int type, const uint8_t *p) {
    switch (type) {
    case GGUF_T_UINT8: return PyLong_FromUnsignedLong(p[0]);
    case GGUF_T_INT8: return PyLong_FromLong((int8_t)p[0]);
    case GGUF_T_UINT16: { uint16_t v; memcpy(&v, p, 2); return PyLong_FromUnsignedLong(v); }
    case GGUF_T_INT16: { int16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case GGUF_T_UINT32: { uint32_t v; memcpy(&v, p, 4); return PyLong_FromUnsignedLong(v); }
    case GGUF_T_INT32: { int32_t v; memcpy(&v, p, 4); return PyLong_FromLong(v); }
    case GGUF_T_UINT64: { uint64_t v; memcpy(&v, p, 8); return PyLong_FromUnsignedLongLong(v); }
    case GGUF_T_INT64: { int64_t v; memcpy(&v, p, 8); return PyLong_FromLongLong(v); }
    case GGUF_T_FLOAT32: { float v; memcpy(&v, p, 4); return PyFloat_FromDouble(v); }
    case GGUF_T_FLOAT64: { double v; memcpy(&v, p, 8); return PyFloat_FromDouble(v); }
    case GGUF_T_BOOL: return PyBool_FromLong(p[0] != 0);
    default: PyErr_Format(PyExc_RuntimeError, "unexpected GGUF value type %d", type); return NULL;
    }
}

static int scalar_size(int type) {
    switch (type) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    default: return 8;
    }
}

static PyObject *kv_value(const fl_gguf_kv *kv) {
    if (kv->type == GGUF_T_STRING) return decode_str(kv->str, kv->str_len);
    if (kv->type != GGUF_T_ARRAY) return scalar_value(kv->type, kv->raw);
    if (kv->n > (uint64_t)PY_SSIZE_T_MAX) { PyErr_NoMemory(); return NULL; }
    PyObject *list = PyList_New((Py_ssize_t)kv->n);
    if (!list) return NULL;
    if (kv->arr_type == GGUF_T_STRING) {
        for (uint64_t i = 0; i < kv->n; i++) {
            const char *s; uint64_t len;
            if (fl_gguf_arr_str(kv, i, &s, &len) != FL_OK) { Py_DECREF(list); return raise_status(FL_E_INTERNAL); }
            PyObject *v = decode_str(s, len);
            if (!v) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, (Py_ssize_t)i, v);
        }
    } else {
        const int es = scalar_size(kv->arr_type);
        for (uint64_t i = 0; i < kv->n; i++) {
            PyObject *v = scalar_value(kv->arr_type, kv->raw + i * (uint64_t)es);
            if (!v) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, (Py_ssize_t)i, v);
        }
    }
    return list;
}

static PyObject *gg_metadata(GG *self, void *closure) {
    (void)closure;
    if (self->meta) return Py_NewRef(self->meta);
    if (check_open(self) < 0) return NULL;
    const fl_gguf *g = self->base.g;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        PyObject *k = PyUnicode_DecodeUTF8(g->kv[i].key, (Py_ssize_t)strlen(g->kv[i].key), "surrogateescape");
        PyObject *v = k ? kv_value(&g->kv[i]) : NULL;
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k); Py_DECREF(v);
    }
    self->meta = d;
    return Py_NewRef(d);
}

/* ---- tensors ---- */

static PyObject *shape_tuple(const fl_gguf_tensor *t) {
    PyObject *shape = PyTuple_New(t->ndim);
    if (!shape) return NULL;
    for (int d = 0; d < t->ndim; d++) {
        PyObject *v = PyLong_FromLongLong(t->ne[t->ndim - 1 - d]);
        if (!v) { Py_DECREF(shape); return NULL; }
        PyTuple_SET_ITEM(shape, d, v);
    }
    return shape;
}

static PyObject *gg_tensors(GG *self, PyObject *noargs) {
    (void)noargs;
    if (check_open(self) < 0) return NULL;
    const fl_gguf *g = self->base.g;
    PyObject *list = PyList_New((Py_ssize_t)g->n_tensors);
    if (!list) return NULL;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const fl_gguf_tensor *t = &g->tensors[i];
        PyObject *shape = shape_tuple(t);
        PyObject *item = shape ? Py_BuildValue("(NsiNK)", PyUnicode_DecodeUTF8(t->name, (Py_ssize_t)strlen(t->name), "surrogateescape"),
                                               fl_ggml_type_name(t->type), t->type, shape,
                                               (unsigned long long)t->nbytes) : NULL;
        if (!item) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

/* dtype argument: "float32" | "float16" | "bfloat16" (and short spellings, numpy dtypes) */
static int parse_dtype(PyObject *o, fl_dtype *dt) {
    if (o == NULL || o == Py_None) { *dt = FL_F32; return 0; }
    if (PyUnicode_Check(o)) {
        const char *s = PyUnicode_AsUTF8(o);
        if (!s) return -1;
        if (!strcmp(s, "float32") || !strcmp(s, "f32") || !strcmp(s, "float")) { *dt = FL_F32; return 0; }
        if (!strcmp(s, "float16") || !strcmp(s, "f16") || !strcmp(s, "half")) { *dt = FL_F16; return 0; }
        if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16")) { *dt = FL_BF16; return 0; }
    } else {
        PyArray_Descr *descr = NULL;
        if (PyArray_DescrConverter2(o, &descr) && descr) {
            int tn = descr->type_num;
            Py_DECREF(descr);
            if (tn == NPY_FLOAT32) { *dt = FL_F32; return 0; }
            if (tn == NPY_FLOAT16) { *dt = FL_F16; return 0; }
        }
        PyErr_Clear();
    }
    PyErr_Format(PyExc_ValueError, "dtype must be 'float32', 'float16' or 'bfloat16' (returned as uint16), not %R", o);
    return -1;
}

typedef struct {
    const fl_gguf_tensor *t;
    void *dst;
    fl_dtype dt;
    int threads;
    fl_status st;
    char msg[FL_ERR_MAX];
} dq_job;

/* Runs without the GIL. Splits the tensor into runs of whole blocks over OpenMP threads. */
static void run_dequant(dq_job *job) {
    const fl_gguf_tensor *t = job->t;
    const uint64_t blck = (uint64_t)fl_ggml_block_elems(t->type), bbytes = (uint64_t)fl_ggml_block_bytes(t->type);
    const uint64_t nel = t->nbytes / bbytes * blck, nb = nel / blck;
    const uint64_t esz = (uint64_t)fl_dtype_size(job->dt);
    const uint64_t min_chunk_el = 1u << 16; /* below this, threads cost more than they save */
    uint64_t chunk_b = (min_chunk_el + blck - 1) / blck;
    int nthr = 1;
#ifdef _OPENMP
    nthr = job->threads > 0 ? job->threads : omp_get_max_threads();
#endif
    if (nb <= chunk_b || nthr <= 1) {
        job->st = fl_ggml_dequant(t->type, t->data, nel, job->dst, job->dt);
        if (job->st != FL_OK) snprintf(job->msg, sizeof job->msg, "%s", fl_err_msg());
        return;
    }
    uint64_t per_thread = (nb + (uint64_t)nthr * 4 - 1) / ((uint64_t)nthr * 4);
    if (per_thread > chunk_b) chunk_b = per_thread;
    const int64_t nchunks = (int64_t)((nb + chunk_b - 1) / chunk_b);
    fl_status st_all = FL_OK;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthr)
    for (int64_t c = 0; c < nchunks; c++) {
        const uint64_t b0 = (uint64_t)c * chunk_b;
        const uint64_t cnt = nb - b0 < chunk_b ? nb - b0 : chunk_b;
        fl_status st = fl_ggml_dequant(t->type, (const uint8_t *)t->data + b0 * bbytes, cnt * blck,
                                       (uint8_t *)job->dst + b0 * blck * esz, job->dt);
        if (st != FL_OK) {
            #pragma omp critical(fl_gguf_dq_err)
            {
                if (st_all == FL_OK) { st_all = st; snprintf(job->msg, sizeof job->msg, "%s", fl_err_msg()); }
            }
        }
    }
    job->st = st_all;
}

static PyObject *gg_dequantize(GG *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"name", "dtype", "threads", NULL};
    PyObject *name, *dtype_o = NULL;
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|Oi:dequantize", kwlist, &name, &dtype_o, &threads)) return NULL;
    if (check_open(self) < 0) return NULL;
    fl_dtype dt;
    if (parse_dtype(dtype_o, &dt) < 0) return NULL;
    const fl_gguf_tensor *t = get_tensor(self, name);
    if (!t) return NULL;
    if (!fl_ggml_can_dequant(t->type))
        return PyErr_Format(PyExc_NotImplementedError, "%U: tensor '%U': dequantisation of ggml type %s (id %d) is not supported",
                            self->path, name, fl_ggml_type_name(t->type), t->type);
    npy_intp dims[4];
    for (int d = 0; d < t->ndim; d++) dims[d] = (npy_intp)t->ne[t->ndim - 1 - d];
    int typenum = dt == FL_F32 ? NPY_FLOAT32 : dt == FL_F16 ? NPY_FLOAT16 : NPY_UINT16;
    PyArrayObject *arr = (PyArrayObject *)PyArray_SimpleNew(t->ndim, dims, typenum);
    if (!arr) return NULL;
    dq_job job = {t, PyArray_DATA(arr), dt, threads, FL_OK, {0}};
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    run_dequant(&job);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (job.st != FL_OK) {
        Py_DECREF(arr);
        fl_err(job.st, "%s: tensor '%s': %s", self->base.g->path, t->name, job.msg);
        maybe_release(self);
        return raise_status(job.st);
    }
    maybe_release(self); /* t is not used past this point: close() may have been waiting for us */
    return (PyObject *)arr;
}

static PyObject *gg_raw(GG *self, PyObject *name) {
    if (check_open(self) < 0) return NULL;
    const fl_gguf_tensor *t = get_tensor(self, name);
    if (!t) return NULL;
    npy_intp dims[1] = {(npy_intp)t->nbytes};
    PyObject *arr = PyArray_New(&PyArray_Type, 1, dims, NPY_UINT8, NULL, (void *)t->data, 0,
                                NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    if (!arr) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef((PyObject *)self)) < 0) { Py_DECREF(arr); return NULL; }
    PyObject *wr = PyWeakref_NewRef(arr, NULL);
    if (!wr || PyList_Append(self->views, wr) < 0) { Py_XDECREF(wr); Py_DECREF(arr); return NULL; }
    Py_DECREF(wr);
    /* forget views that died, so the list does not grow without bound */
    if (PyList_GET_SIZE(self->views) > 64) {
        PyObject *keep = PyList_New(0);
        if (!keep) { Py_DECREF(arr); return NULL; }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->views); i++) {
            PyObject *w = PyList_GET_ITEM(self->views, i);
            if (weak_alive(w)) {
                if (PyList_Append(keep, w) < 0) { Py_DECREF(keep); Py_DECREF(arr); return NULL; }
            }
        }
        Py_SETREF(self->views, keep);
    }
    return arr;
}

static PyObject *gg_close(GG *self, PyObject *noargs) {
    (void)noargs;
    self->closed = 1;
    maybe_release(self);
    Py_RETURN_NONE;
}

static PyObject *gg_enter(GG *self, PyObject *noargs) {
    (void)noargs;
    if (check_open(self) < 0) return NULL;
    return Py_NewRef((PyObject *)self);
}

static PyObject *gg_exit(GG *self, PyObject *args) {
    (void)args;
    self->closed = 1;
    maybe_release(self);
    Py_RETURN_FALSE;
}

/* ---- getters ---- */

static PyObject *gg_get_path(GG *self, void *c) { (void)c; return Py_NewRef(self->path ? self->path : Py_None); }
static PyObject *gg_get_closed(GG *self, void *c) { (void)c; return PyBool_FromLong(self->closed || !self->base.g); }
static PyObject *gg_get_version(GG *self, void *c) {
    (void)c;
    if (check_open(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(self->base.g->version);
}
static PyObject *gg_get_alignment(GG *self, void *c) {
    (void)c;
    if (check_open(self) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->base.g->alignment);
}
static PyObject *gg_get_data_offset(GG *self, void *c) {
    (void)c;
    if (check_open(self) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->base.g->data_offset);
}

static PyGetSetDef gg_getset[] = {
    {"path", (getter)gg_get_path, NULL, "The path the file was opened with.", NULL},
    {"version", (getter)gg_get_version, NULL, "GGUF version (2 or 3).", NULL},
    {"alignment", (getter)gg_get_alignment, NULL, "general.alignment (default 32).", NULL},
    {"data_offset", (getter)gg_get_data_offset, NULL, "File offset of the tensor data section.", NULL},
    {"closed", (getter)gg_get_closed, NULL, "True after close().", NULL},
    {"metadata", (getter)gg_metadata, NULL,
     "dict key -> value (int, float, bool, str, or list of those for arrays); built once and cached. "
     "Strings are decoded as UTF-8 with errors='surrogateescape' (lossless).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef gg_methods[] = {
    {"tensors", (PyCFunction)gg_tensors, METH_NOARGS,
     "tensors() -> [(name, type_name, type_id, shape, nbytes)] in file order; shape in Hugging Face order."},
    {"dequantize", (PyCFunction)(void (*)(void))gg_dequantize, METH_VARARGS | METH_KEYWORDS,
     "dequantize(name, dtype='float32', threads=0) -> numpy array of the Hugging Face shape.\n"
     "dtype: 'float32', 'float16' or 'bfloat16' (bfloat16 bits in a uint16 array). threads: 0 = OpenMP default."},
    {"raw", (PyCFunction)gg_raw, METH_O, "raw(name) -> read-only uint8 view of the tensor's bytes in the mapping."},
    {"close", (PyCFunction)gg_close, METH_NOARGS, "Release the mapping (deferred while raw() views live)."},
    {"__enter__", (PyCFunction)gg_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)gg_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject FlPyGGUF_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastload._C.GGUFFile",
    .tp_doc = "GGUFFile(path): a validated, memory-mapped GGUF (v2/v3) file.",
    .tp_basicsize = sizeof(GG),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gg_init,
    .tp_dealloc = (destructor)gg_dealloc,
    .tp_repr = (reprfunc)gg_repr,
    .tp_methods = gg_methods,
    .tp_getset = gg_getset,
};

int fl_py_init_gguf(PyObject *m) {
    if (PyType_Ready(&FlPyGGUF_Type) < 0) return -1;
    return PyModule_AddObjectRef(m, "GGUFFile", (PyObject *)&FlPyGGUF_Type);
}
