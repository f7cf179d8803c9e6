/* py_module.c: the fastload._C module: exceptions, error translation, build info. */
#define FL_PY_MAIN
#include "py_common.h"
#include "sampling.h"
#ifdef _OPENMP
#include <omp.h>
#endif

PyObject *FlCheckpointError = NULL;
PyObject *FlEngineBusy = NULL;

PyObject *fl_py_raise(fl_status st) {
    const char *msg = fl_err_msg();
    if (!msg || !*msg) msg = "unknown error";
    PyObject *exc;
    switch (st) {
    case FL_E_IO: exc = PyExc_OSError; break;
    case FL_E_FORMAT: exc = FlCheckpointError; break;
    case FL_E_VALUE: exc = PyExc_ValueError; break;
    case FL_E_NOMEM: exc = PyExc_MemoryError; break;
    case FL_E_UNSUPPORTED: exc = PyExc_NotImplementedError; break;
    case FL_E_BUSY: exc = FlEngineBusy; break;
    case FL_E_INTERRUPTED:
        if (PyErr_Occurred()) return NULL; /* the callback's own exception */
        exc = PyExc_KeyboardInterrupt; break;
    default: exc = PyExc_RuntimeError; break;
    }
    /* Messages carry file paths and tensor names that need not be UTF-8: decode leniently so the
     * intended exception is raised, not a UnicodeDecodeError. */
    PyObject *text = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (text) {
        PyErr_SetObject(exc, text);
        Py_DECREF(text);
    }
    fl_err_clear();
    return NULL;
}

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    int ndev = 0;
    PyObject *cuda_err = Py_None;
    Py_INCREF(Py_None);
    if (fl_cuda_compiled()) {
        fl_status st = fl_cuda_device_count(&ndev);
        if (st != FL_OK) { Py_DECREF(cuda_err); cuda_err = PyUnicode_FromString(fl_err_msg()); fl_err_clear(); ndev = 0; }
    }
    int omp = 0;
#ifdef _OPENMP
    omp = _OPENMP;
#endif
    const char *simd =
#if defined(__AVX512F__)
        "avx512f"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        "avx2+fma+f16c"
#elif defined(__ARM_NEON)
        "neon"
#else
        "generic"
#endif
        ;
    return Py_BuildValue("{s:O,s:s,s:i,s:N,s:i,s:s,s:s}",
                         "cuda_compiled", fl_cuda_compiled() ? Py_True : Py_False, "cuda_archs", fl_cuda_archs(),
                         "cuda_devices", ndev, "cuda_error", cuda_err,
                         "openmp", omp, "simd", simd, "compiler",
#if defined(__clang__)
                         "clang " __clang_version__
#elif defined(__GNUC__)
                         "gcc " __VERSION__
#else
                         "unknown"
#endif
    );
}

static PyObject *py_cuda_memory(PyObject *self, PyObject *args) {
    (void)self;
    int dev = 0, reset = 0;
    if (!PyArg_ParseTuple(args, "i|p", &dev, &reset)) return NULL;
    uint64_t a = 0, p = 0, f = 0, t = 0;
    fl_status st = reset ? fl_cuda_reset_peak(dev) : fl_cuda_memory(dev, &a, &p);
    if (st != FL_OK) return fl_py_raise(st);
    if (fl_cuda_compiled() && fl_cuda_mem_info(dev, &f, &t) != FL_OK) { fl_err_clear(); f = t = 0; }
    return Py_BuildValue("{s:K,s:K,s:K,s:K}", "allocated", (unsigned long long)a, "peak", (unsigned long long)p,
                         "free", (unsigned long long)f, "total", (unsigned long long)t);
}

static PyObject *py_cuda_device_props(PyObject *self, PyObject *args) {
    (void)self;
    int dev = 0;
    if (!PyArg_ParseTuple(args, "i", &dev)) return NULL;
    fl_cuda_props p;
    fl_status st = fl_cuda_device_props(dev, &p);
    if (st != FL_OK) return fl_py_raise(st);
    PyObject *name = PyUnicode_DecodeUTF8(p.name, (Py_ssize_t)strlen(p.name), "replace");
    if (!name) return NULL;
    return Py_BuildValue("{s:N,s:K,s:i,s:i,s:i}", "name", name, "total_memory", (unsigned long long)p.total_memory,
                         "major", p.major, "minor", p.minor, "multi_processor_count", p.multi_processor_count);
}

static PyObject *py_cuda_kernel_check(PyObject *self, PyObject *args) {
    (void)self;
    int dev = 0, binary = 0, ptx = 0;
    if (!PyArg_ParseTuple(args, "i", &dev)) return NULL;
    fl_status st;
    Py_BEGIN_ALLOW_THREADS  /* creates the device's context: a few hundred ms on a first call */
    st = fl_cuda_kernel_check(dev, &binary, &ptx);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) return fl_py_raise(st);
    return Py_BuildValue("{s:i,s:i}", "binary", binary, "ptx", ptx);
}

static PyObject *py_cuda_synchronize(PyObject *self, PyObject *args) {
    (void)self;
    int dev = 0;
    if (!PyArg_ParseTuple(args, "i", &dev)) return NULL;
    fl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fl_cuda_synchronize(dev);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) return fl_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_cuda_empty_cache(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    Py_BEGIN_ALLOW_THREADS
    fl_cuda_empty_cache();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_cuda_h2d_bandwidth(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"device", "bytes", "repeats", NULL};
    int dev = 0, repeats = 5;
    unsigned long long bytes = 256ull << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iKi:cuda_h2d_bandwidth", names, &dev, &bytes, &repeats)) return NULL;
    double gbps = 0;
    fl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fl_cuda_h2d_bandwidth(dev, (uint64_t)bytes, repeats, &gbps);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) return fl_py_raise(st);
    return PyFloat_FromDouble(gbps);
}

/* target_logprobs(logits [N, V] float32, rows [M] int64, targets [M] int64) -> float64 [M]: log softmax of row
 * rows[i] at targets[i] (sampling.c's fl_target_logprobs), the GIL released, on the cores OpenMP has. Loss and perplexity
 * from a forward's logits without the float64 copy of all of them numpy would make (17.8 s and ~7 GB for 2048 positions
 * of a 152k vocabulary on a 2-core machine; this: a pass over the float32 logits). */
static PyObject *py_target_logprobs(PyObject *self, PyObject *args) {
    PyObject *lo, *ro, *to;
    if (!PyArg_ParseTuple(args, "OOO", &lo, &ro, &to)) return NULL;
    PyArrayObject *lg = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 2, 2, NPY_ARRAY_CARRAY_RO);
    PyArrayObject *rw = lg ? (PyArrayObject *)PyArray_FROMANY(ro, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO) : NULL;
    PyArrayObject *tg = rw ? (PyArrayObject *)PyArray_FROMANY(to, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO) : NULL;
    PyObject *res = NULL;
    if (!tg) goto done;
    const npy_intp N = PyArray_DIM(lg, 0), V = PyArray_DIM(lg, 1), M = PyArray_DIM(rw, 0);
    if (PyArray_DIM(tg, 0) != M) {
        PyErr_Format(PyExc_ValueError, "target_logprobs: %zd rows but %zd targets", (Py_ssize_t)M, (Py_ssize_t)PyArray_DIM(tg, 0));
        goto done;
    }
    if (V < 1 || V > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "target_logprobs: logits of %zd columns", (Py_ssize_t)V);
        goto done;
    }
    const int64_t *r = (const int64_t *)PyArray_DATA(rw), *t = (const int64_t *)PyArray_DATA(tg);
    for (npy_intp i = 0; i < M; i++) {
        if (r[i] < 0 || r[i] >= N) {
            PyErr_Format(PyExc_ValueError, "target_logprobs: rows[%zd] = %lld is outside [0, %zd)", (Py_ssize_t)i,
                         (long long)r[i], (Py_ssize_t)N);
            goto done;
        }
        if (t[i] < 0 || t[i] >= V) {
            PyErr_Format(PyExc_ValueError, "target_logprobs: targets[%zd] = %lld is outside the vocabulary [0, %zd)",
                         (Py_ssize_t)i, (long long)t[i], (Py_ssize_t)V);
            goto done;
        }
    }
    res = PyArray_SimpleNew(1, (npy_intp[]){M}, NPY_FLOAT64);
    if (!res) goto done;
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    Py_BEGIN_ALLOW_THREADS
    fl_target_logprobs((const float *)PyArray_DATA(lg), (int)V, r, t, (int64_t)M,
                       (double *)PyArray_DATA((PyArrayObject *)res), threads);
    Py_END_ALLOW_THREADS
done:
    Py_XDECREF(lg);
    Py_XDECREF(rw);
    Py_XDECREF(tg);
    return res;
}

static PyMethodDef methods[] = {
    {"target_logprobs", py_target_logprobs, METH_VARARGS,
     "target_logprobs(logits [N, V] float32, rows [M] int64, targets [M] int64) -> float64 [M]: "
     "log softmax(logits[rows[i]])[targets[i]], computed in float64 without copying the logits"},
    {"cuda_h2d_bandwidth", (PyCFunction)(void (*)(void))py_cuda_h2d_bandwidth, METH_VARARGS | METH_KEYWORDS,
     "cuda_h2d_bandwidth(device=0, bytes=256 MiB, repeats=5) -> GB/s (1e9 bytes/s) of host-to-device copies from "
     "pinned memory (the PCIe ceiling of a load); NotImplementedError without CUDA, ValueError for a device that "
     "is not visible"},
    {"cuda_device_props", py_cuda_device_props, METH_VARARGS,
     "cuda_device_props(device) -> dict(name, total_memory, major, minor, multi_processor_count)"},
    {"cuda_synchronize", py_cuda_synchronize, METH_VARARGS, "cuda_synchronize(device): wait for the device's work"},
    {"cuda_empty_cache", py_cuda_empty_cache, METH_NOARGS, "Free the loader's kept pinned host buffers."},
    {"cuda_memory", py_cuda_memory, METH_VARARGS, "cuda_memory(device, reset_peak=False) -> dict of bytes"},
    {"cuda_kernel_check", py_cuda_kernel_check, METH_VARARGS,
     "cuda_kernel_check(device) -> dict(binary, ptx): the SM version of the kernel image the driver runs there (ptx: "
     "its PTX version when JIT-compiled, else 0); NotImplementedError naming the build's architectures when none can"},
    {"build_info", py_build_info, METH_NOARGS, "Build and device facts for fastload.info()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "fastload._C", "fastload C/CUDA core", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    FlCheckpointError = PyErr_NewExceptionWithDoc("fastload.CheckpointError",
        "A checkpoint file is malformed (the message names the file and tensor).", PyExc_ValueError, NULL);
    if (!FlCheckpointError || PyModule_AddObjectRef(m, "CheckpointError", FlCheckpointError) < 0) goto fail;
    FlEngineBusy = PyErr_NewExceptionWithDoc("fastload.EngineBusy",
                                             "The model's queue of waiting requests is full (max_waiting): try again later.",
                                             PyExc_RuntimeError, NULL);
    if (!FlEngineBusy || PyModule_AddObjectRef(m, "EngineBusy", FlEngineBusy) < 0) goto fail;
    if (fl_py_init_safetensors(m) < 0 || fl_py_init_gguf(m) < 0 || fl_py_init_model(m) < 0 || fl_py_init_ops(m) < 0 ||
        fl_py_init_engine(m) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
