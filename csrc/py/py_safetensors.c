/* py_safetensors.c: fastload._C.SafetensorsFile, a read-only view of one .safetensors file.
 *
 *   f = SafetensorsFile(path)       # header validated, file mapped (GIL released meanwhile)
 *   f = SafetensorsFile(path, table=[(name, dtype, shape, offset, nbytes), ...])
 *                                   # any file whose tensors lie at the given absolute offsets (a torch
 *                                   # zip checkpoint located by fastload/torchbin.py); ranges checked
 *   f.keys(); f.info(name); f.metadata; f.get(name) -> read-only numpy view of the mapping
 *
 * Lifetime: arrays from get() hold a reference to the SafetensorsFile (their base), so the
 * mapping outlives the file object. close() makes the object unusable at once; the mapping itself
 * is released then only if no array was ever handed out, otherwise when the object is deallocated
 * (which cannot happen before every such array is gone). */
#include "py_common.h"

typedef struct {
    FlPySt base;       /* base.f: the open file, NULL once closed (other bindings read this) */
    fl_st_file *held;  /* a closed file whose mapping may still be viewed by arrays */
    PyObject *path;    /* str, kept after close for messages */
    int exported;      /* get() has handed out a view */
} StObj;

static int st_check_open(StObj *s) {
    if (s->base.f) return 0;
    PyErr_Format(PyExc_ValueError, "I/O operation on closed SafetensorsFile %R", s->path ? s->path : Py_None);
    return -1;
}

/* One table entry (name, dtype, shape, offset, nbytes) into *t. Malformed entries are the caller's
 * mistake (fastload/torchbin.py builds them): TypeError / ValueError naming the entry. Whether the
 * ranges fit the file is checked by fl_st_open_table (CheckpointError naming file and tensor). */
static int table_entry(PyObject *item, Py_ssize_t i, fl_st_tensor *t) {
    PyObject *name, *dtype, *shape, *off, *nbytes;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
        PyErr_Format(PyExc_TypeError, "table[%zd] must be a tuple (name, dtype, shape, offset, nbytes)", i);
        return -1;
    }
    name = PyTuple_GET_ITEM(item, 0); dtype = PyTuple_GET_ITEM(item, 1); shape = PyTuple_GET_ITEM(item, 2);
    off = PyTuple_GET_ITEM(item, 3); nbytes = PyTuple_GET_ITEM(item, 4);
    if (!PyUnicode_Check(name) || !PyUnicode_Check(dtype) || !PyTuple_Check(shape) || !PyLong_Check(off) ||
        !PyLong_Check(nbytes)) {
        PyErr_Format(PyExc_TypeError, "table[%zd] must be (str, str, tuple, int, int)", i);
        return -1;
    }
    Py_ssize_t nlen, dlen;
    const char *u = PyUnicode_AsUTF8AndSize(name, &nlen), *d = u ? PyUnicode_AsUTF8AndSize(dtype, &dlen) : NULL;
    if (!d) return -1;
    if (nlen == 0 || strlen(u) != (size_t)nlen) {
        PyErr_Format(PyExc_ValueError, "table[%zd]: tensor name %R is empty or contains NUL", i, name);
        return -1;
    }
    t->dtype = strlen(d) == (size_t)dlen ? fl_dtype_from_st_name(d, (size_t)dlen) : FL_DTYPE_INVALID;
    if (t->dtype == FL_DTYPE_INVALID) {
        PyErr_Format(PyExc_ValueError, "table[%zd] (%R): unknown dtype %R", i, name, dtype);
        return -1;
    }
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd > FL_ST_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "table[%zd] (%R): %zd dimensions (at most %d)", i, name, nd, FL_ST_MAX_DIMS);
        return -1;
    }
    t->ndim = (int)nd;
    for (Py_ssize_t k = 0; k < nd; k++) {
        PyObject *v = PyTuple_GET_ITEM(shape, k);
        long long x = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
        if (x == -1 && PyErr_Occurred()) return -1;
        if (x < 0) {
            PyErr_Format(PyExc_ValueError, "table[%zd] (%R): shape must hold non-negative ints", i, name);
            return -1;
        }
        t->shape[k] = (int64_t)x;
    }
    unsigned long long b = PyLong_AsUnsignedLongLong(off); /* negative: OverflowError */
    if (b == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    unsigned long long n = PyLong_AsUnsignedLongLong(nbytes);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (n > UINT64_MAX - b) {
        PyErr_Format(PyExc_ValueError, "table[%zd] (%R): offset + nbytes overflows 64 bits", i, name);
        return -1;
    }
    t->begin = b;
    t->end = b + n;
    if (!(t->name = strdup(u))) { PyErr_NoMemory(); return -1; }
    return 0;
}

/* The table argument as a malloc'd array (names malloc'd), or -1 with an exception set. */
static int table_from(PyObject *table, fl_st_tensor **out, int *n_out) {
    *out = NULL; *n_out = 0;
    PyObject *seq = PySequence_Fast(table, "table must be a list of (name, dtype, shape, offset, nbytes)");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT32_MAX / 2) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "table is too long"); return -1; }
    fl_st_tensor *t = calloc(n ? (size_t)n : 1, sizeof *t);
    if (!t) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++)
        if (table_entry(PySequence_Fast_GET_ITEM(seq, i), i, &t[i]) < 0) {
            for (Py_ssize_t k = 0; k <= i; k++) free(t[k].name);
            free(t);
            Py_DECREF(seq);
            return -1;
        }
    Py_DECREF(seq);
    *out = t; *n_out = (int)n;
    return 0;
}

static PyObject *st_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "table", NULL};
    PyObject *pathb = NULL; /* bytes, from str / bytes / os.PathLike */
    PyObject *table = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|$O:SafetensorsFile", kwlist, PyUnicode_FSConverter, &pathb, &table))
        return NULL;
    fl_st_tensor *tab = NULL;
    int ntab = 0;
    if (table != Py_None && table_from(table, &tab, &ntab) < 0) { Py_DECREF(pathb); return NULL; }
    StObj *s = (StObj *)type->tp_alloc(type, 0);
    if (!s) { Py_DECREF(pathb); goto free_tab; }
    s->path = PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(pathb), PyBytes_GET_SIZE(pathb));
    if (!s->path) { Py_DECREF(pathb); Py_DECREF(s); goto free_tab; }
    const char *cpath = PyBytes_AS_STRING(pathb);
    fl_st_file *f = NULL;
    fl_status st;
    const int from_table = table != Py_None;
    Py_BEGIN_ALLOW_THREADS
    st = from_table ? fl_st_open_table(cpath, tab, ntab, &f) : fl_st_open(cpath, &f); /* the table is f's now */
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (st != FL_OK) { Py_DECREF(s); return fl_py_raise(st); }
    s->base.f = f;
    return (PyObject *)s;
free_tab:
    for (int i = 0; i < ntab; i++) free(tab[i].name);
    free(tab);
    return NULL;
}

static void st_release(StObj *s) {
    if (s->base.f) { fl_st_close(s->base.f); s->base.f = NULL; }
    if (s->held) { fl_st_close(s->held); s->held = NULL; }
}

static void st_dealloc(StObj *s) {
    st_release(s);
    Py_CLEAR(s->path);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *st_close(StObj *s, PyObject *noargs) {
    (void)noargs;
    if (s->base.f) {
        if (s->exported) s->held = s->base.f; /* views may be alive: unmap at dealloc */
        else fl_st_close(s->base.f);
        s->base.f = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *st_enter(StObj *s, PyObject *noargs) {
    (void)noargs;
    if (st_check_open(s) < 0) return NULL;
    Py_INCREF(s);
    return (PyObject *)s;
}

static PyObject *st_exit(StObj *s, PyObject *args) {
    (void)args;
    PyObject *r = st_close(s, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

/* The tensor called `name` (a str), or -1 with KeyError / TypeError set. */
static int st_lookup(StObj *s, PyObject *name) {
    if (st_check_open(s) < 0) return -1;
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "tensor name must be str, not %.100s", Py_TYPE(name)->tp_name);
        return -1;
    }
    Py_ssize_t len;
    const char *u = PyUnicode_AsUTF8AndSize(name, &len);
    if (!u) return -1;
    int i = (strlen(u) == (size_t)len) ? fl_st_find(s->base.f, u) : -1;
    if (i < 0) {
        PyObject *msg = PyUnicode_FromFormat("%U: no tensor named %R", s->path, name);
        if (msg) { PyErr_SetObject(PyExc_KeyError, msg); Py_DECREF(msg); }
    }
    return i;
}

static PyObject *st_keys(StObj *s, PyObject *noargs) {
    (void)noargs;
    if (st_check_open(s) < 0) return NULL;
    const fl_st_file *f = s->base.f;
    PyObject *l = PyList_New(f->n);
    if (!l) return NULL;
    for (int i = 0; i < f->n; i++) {
        PyObject *k = PyUnicode_FromString(f->t[i].name);
        if (!k) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, i, k);
    }
    return l;
}

static PyObject *shape_tuple(const fl_st_tensor *t) {
    PyObject *tup = PyTuple_New(t->ndim);
    if (!tup) return NULL;
    for (int d = 0; d < t->ndim; d++) {
        PyObject *v = PyLong_FromLongLong((long long)t->shape[d]);
        if (!v) { Py_DECREF(tup); return NULL; }
        PyTuple_SET_ITEM(tup, d, v);
    }
    return tup;
}

static PyObject *st_info(StObj *s, PyObject *name) {
    int i = st_lookup(s, name);
    if (i < 0) return NULL;
    const fl_st_tensor *t = &s->base.f->t[i];
    PyObject *shape = shape_tuple(t);
    if (!shape) return NULL;
    return Py_BuildValue("(sNKK)", fl_dtype_table[t->dtype].st_name, shape, (unsigned long long)t->begin,
                         (unsigned long long)t->end);
}

static int np_type(fl_dtype d) {
    switch (d) {
    case FL_F32: return NPY_FLOAT32;
    case FL_F16: return NPY_FLOAT16;
    case FL_BF16: return NPY_UINT16; /* numpy has no bfloat16: the raw bits */
    case FL_F64: return NPY_FLOAT64;
    case FL_I8: return NPY_INT8;
    case FL_U8: return NPY_UINT8;
    case FL_I16: return NPY_INT16;
    case FL_U16: return NPY_UINT16;
    case FL_I32: return NPY_INT32;
    case FL_U32: return NPY_UINT32;
    case FL_I64: return NPY_INT64;
    case FL_U64: return NPY_UINT64;
    case FL_BOOL: return NPY_BOOL;
    case FL_F8_E4M3: case FL_F8_E5M2: return NPY_UINT8; /* raw bits */
    default: return -1;
    }
}

static PyObject *st_get(StObj *s, PyObject *name) {
    int i = st_lookup(s, name);
    if (i < 0) return NULL;
    const fl_st_tensor *t = &s->base.f->t[i];
    int tn = np_type(t->dtype);
    if (tn < 0) return PyErr_Format(PyExc_NotImplementedError, "%U: tensor %R: dtype %s has no numpy view", s->path,
                                    name, fl_dtype_table[t->dtype].st_name);
    PyArray_Descr *descr = PyArray_DescrFromType(tn);
    if (!descr) return NULL;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    { /* safetensors data is little-endian */
        PyArray_Descr *le = PyArray_DescrNewByteorder(descr, NPY_LITTLE);
        Py_DECREF(descr);
        if (!le) return NULL;
        descr = le;
    }
#endif
    npy_intp dims[FL_ST_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) dims[d] = (npy_intp)t->shape[d];
    /* flags 0: C-contiguous, not writeable (the mapping is PROT_READ); alignment is computed */
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, t->ndim, dims, NULL, (void *)t->data, 0, NULL);
    if (!arr) return NULL;
    Py_INCREF(s);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)s) < 0) { Py_DECREF(arr); return NULL; }
    s->exported = 1;
    return arr;
}

static PyObject *st_get_metadata(StObj *s, void *closure) {
    (void)closure;
    if (st_check_open(s) < 0) return NULL;
    const fl_st_file *f = s->base.f;
    if (!f->metadata) Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < f->n_meta; i++) {
        PyObject *v = PyUnicode_FromString(f->meta_vals[i]);
        if (!v || PyDict_SetItemString(d, f->meta_keys[i], v) < 0) { Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *st_get_path(StObj *s, void *closure) {
    (void)closure;
    Py_INCREF(s->path);
    return s->path;
}

static PyObject *st_get_closed(StObj *s, void *closure) {
    (void)closure;
    return PyBool_FromLong(s->base.f == NULL);
}

static Py_ssize_t st_len(StObj *s) {
    if (st_check_open(s) < 0) return -1;
    return s->base.f->n;
}

static int st_contains(StObj *s, PyObject *name) {
    if (st_check_open(s) < 0) return -1;
    if (!PyUnicode_Check(name)) return 0;
    Py_ssize_t len;
    const char *u = PyUnicode_AsUTF8AndSize(name, &len);
    if (!u) return -1;
    return strlen(u) == (size_t)len && fl_st_find(s->base.f, u) >= 0;
}

static PyObject *st_repr(StObj *s) {
    if (!s->base.f) return PyUnicode_FromFormat("<SafetensorsFile %R (closed)>", s->path);
    return PyUnicode_FromFormat("<SafetensorsFile %R: %d tensors>", s->path, s->base.f->n);
}

static PyMethodDef st_methods[] = {
    {"keys", (PyCFunction)st_keys, METH_NOARGS, "Tensor names, in the order of their data in the file."},
    {"info", (PyCFunction)st_info, METH_O, "info(name) -> (dtype, shape, begin, end); offsets within the data region "
     "(absolute file offsets for a file opened with a table)."},
    {"get", (PyCFunction)st_get, METH_O,
     "get(name) -> read-only numpy array viewing the mapped file (BF16 as uint16 bits, F8 as uint8)."},
    {"close", (PyCFunction)st_close, METH_NOARGS, "Close the file (views already handed out stay valid)."},
    {"__enter__", (PyCFunction)st_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)st_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef st_getset[] = {
    {"path", (getter)st_get_path, NULL, "The path the file was opened with.", NULL},
    {"metadata", (getter)st_get_metadata, NULL, "The header's __metadata__ as a dict of str, or None.", NULL},
    {"closed", (getter)st_get_closed, NULL, "True once close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods st_as_sequence = {
    .sq_length = (lenfunc)st_len,
    .sq_contains = (objobjproc)st_contains,
};

PyTypeObject FlPySt_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastload._C.SafetensorsFile",
    .tp_basicsize = sizeof(StObj),
    .tp_dealloc = (destructor)st_dealloc,
    .tp_repr = (reprfunc)st_repr,
    .tp_as_sequence = &st_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SafetensorsFile(path, *, table=None): a validated, memory-mapped .safetensors file.\n\n"
              "With table=[(name, dtype, shape, offset, nbytes), ...] the file has no safetensors header: each tensor\n"
              "lies at the given absolute offset (checked against the file; entries may overlap).\n\n"
              "Raises fastload.CheckpointError (a ValueError) naming the file and tensor if the file is malformed,\n"
              "OSError if it cannot be read.",
    .tp_methods = st_methods,
    .tp_getset = st_getset,
    .tp_new = st_new,
};

int fl_py_init_safetensors(PyObject *m) {
    if (PyType_Ready(&FlPySt_Type) < 0) return -1;
    return PyModule_AddObjectRef(m, "SafetensorsFile", (PyObject *)&FlPySt_Type);
}
