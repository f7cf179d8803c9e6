/* py_engine.c: fastload._C.Request (one request of a model's engine, csrc/engine.h) and the
 * engine's driver for CPU models.
 *
 * A Request keeps its model object alive (the engine lives in it). wait() releases the GIL and
 * wakes every 50 ms to run signal handlers, so Ctrl-C in the main thread cancels the request and
 * raises KeyboardInterrupt; dropping the last reference cancels a request still running.
 *
 * CPU models drive their engine on the process's compute thread (py_exec.c), one step per job,
 * re-posted while requests remain: one OpenMP team, and other CPU work queued in between runs
 * between two steps instead of waiting for the engine to go idle. */
#include "py_common.h"
#include "py_engine.h"
#include "py_exec.h"
#include "../engine.h"
#include <errno.h>
#include <math.h>
#include <time.h>

#define FL_WAIT_SLICE_MS 50

static fl_status step_job(fl_exec_job *job, void *arg) {
    fl_engine *e = arg;
    if (fl_exec_cancelled(job)) { /* interpreter exit: finish every request so nothing waits for a driver */
        fl_engine_cancel_all(e);
        while (fl_engine_step(e)) {
        }
        return FL_OK;
    }
    if (fl_engine_step(e) && fl_exec_post(step_job, e) != 0)
        while (fl_engine_step(e)) { /* cannot queue: run the rest here */
        }
    return FL_OK;
}

int fl_py_exec_kick(void *ud, fl_engine *e) {
    (void)ud;
    return fl_exec_post(step_job, e);
}

/* A CPU model's forward called from a callback of a compute-thread job (a load progress callback calling another
 * model): the compute thread is paused in that job, so a queued forward would wait for the callback, which waits for
 * it. No step of any CPU engine can be under way then (they all run on the compute thread, and steps make no
 * callbacks), so the forward runs at once, nested into the paused job on the compute thread (one OpenMP team still),
 * under the engine's model lock (fl_engine_forward_now); Ctrl-C in the waiting caller stops it between layers. */
typedef struct { fl_engine *e; const fl_forward_req *f; } now_args;
static fl_status forward_now_job(fl_exec_job *job, void *arg) {
    (void)job;
    now_args *a = arg;
    return fl_engine_forward_now(a->e, a->f);
}

int fl_py_engine_forward(fl_engine *e, const fl_forward_req *f, int cpu) {
    fl_status st;
    if (cpu && fl_exec_in_callback()) {
        now_args a = {e, f};
        if (fl_exec_run(forward_now_job, &a, &st) < 0) { fl_err_clear(); return -1; } /* KeyboardInterrupt is set */
        if (st != FL_OK) { fl_py_raise(st); return -1; }
        return 0;
    }
    fl_request *r = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = fl_engine_submit_forward(e, f, &r);
    Py_END_ALLOW_THREADS
    if (st != FL_OK) { fl_py_raise(st); return -1; }
    int done = 0, interrupted = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        fl_request_wait(r, 0, interrupted ? -1 : FL_WAIT_SLICE_MS, &done);
        Py_END_ALLOW_THREADS
        if (done) break;
        if (!interrupted && PyErr_CheckSignals() < 0) { /* Ctrl-C: stop it, and wait until the driver has let go */
            interrupted = 1;
            fl_request_cancel(r);
        }
    }
    char msg[FL_ERR_MAX];
    st = fl_request_status(r, msg, sizeof msg);
    Py_BEGIN_ALLOW_THREADS
    fl_request_release(r);
    Py_END_ALLOW_THREADS
    if (interrupted) return -1; /* the exception is set */
    if (st == FL_OK) return 0;
    if (st == FL_E_INTERRUPTED) PyErr_SetString(PyExc_RuntimeError, msg); /* not this caller's Ctrl-C: the engine closed */
    else {
        fl_err(st, "%s", msg);
        fl_py_raise(st);
    }
    return -1;
}

typedef struct {
    PyObject_HEAD
    PyObject *owner;   /* the _C.Model */
    fl_request *r;
    int n_prompt;
} FlPyRequest;

static void req_dealloc(FlPyRequest *self) {
    if (self->r) {
        fl_request *r = self->r;
        self->r = NULL;
        Py_BEGIN_ALLOW_THREADS
        fl_request_release(r);
        Py_END_ALLOW_THREADS
    }
    Py_XDECREF(self->owner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* wait(have=0, timeout=None) -> (n, done): block until more than `have` tokens exist or the request is
 * finished (or `timeout` seconds pass). */
static PyObject *req_wait(FlPyRequest *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"have", "timeout", NULL};
    int have = 0;
    PyObject *to = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iO", kwlist, &have, &to)) return NULL;
    double timeout = -1;
    if (to != Py_None) {
        timeout = PyFloat_AsDouble(to);
        if (timeout == -1 && PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    int n = 0, done = 0;
    /* slices of at most FL_WAIT_SLICE_MS (signals are checked between them) until a monotonic deadline: a slice is
     * the time left rounded up to whole milliseconds, so a sub-millisecond rest neither spins on 0 ms slices nor
     * counts as time waited (both were the case when slices were added up, truncated) */
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int slice = FL_WAIT_SLICE_MS;
        if (timeout >= 0) {
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            const double left = timeout - ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) * 1e-9);
            if (left <= 0) slice = 0;
            else if (left * 1000 < slice) slice = (int)ceil(left * 1000);
        }
        Py_BEGIN_ALLOW_THREADS
        n = fl_request_wait(self->r, have, slice, &done);
        Py_END_ALLOW_THREADS
        if (n > have || done || slice == 0) break;
        if (PyErr_CheckSignals() < 0) {
            fl_request_cancel(self->r);
            return NULL;
        }
    }
    return Py_BuildValue("(iO)", n, done ? Py_True : Py_False);
}

/* tokens(start=0, stop=None) -> int64 array of generated tokens [start, stop) */
static PyObject *req_tokens(FlPyRequest *self, PyObject *args) {
    int from = 0, to = -1, done = 0;
    if (!PyArg_ParseTuple(args, "|ii", &from, &to)) return NULL;
    int n = fl_request_wait(self->r, INT32_MAX, 0, &done);
    if (to < 0 || to > n) to = n;
    if (from < 0) from = 0;
    if (from > to) from = to;
    int32_t *tmp = PyMem_Malloc((size_t)(to - from) * 4 + 4);
    if (!tmp) return PyErr_NoMemory();
    fl_request_tokens(self->r, from, to, tmp);
    npy_intp dims[1] = {to - from};
    PyObject *a = PyArray_SimpleNew(1, dims, NPY_INT64);
    if (a) for (int i = 0; i < to - from; i++) ((int64_t *)PyArray_DATA((PyArrayObject *)a))[i] = tmp[i];
    PyMem_Free(tmp);
    return a;
}

/* records(start=0, stop=None) -> float32 array [n, record_size]: what was kept of tokens [start, stop) (engine_submit's
 * keep_scores / keep_logits / logprobs; fl_gen_params.keep_* gives the row's layout), cut to the tokens made so far. */
static PyObject *req_records(FlPyRequest *self, PyObject *args) {
    int from = 0, to = -1, done = 0;
    if (!PyArg_ParseTuple(args, "|ii", &from, &to)) return NULL;
    const int n = fl_request_wait(self->r, INT32_MAX, 0, &done), row = fl_request_record_size(self->r);
    if (to < 0 || to > n) to = n;
    if (from < 0) from = 0;
    if (from > to) from = to;
    npy_intp dims[2] = {to - from, row};
    PyObject *a = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!a) return NULL;
    int got = 0;
    Py_BEGIN_ALLOW_THREADS
    got = fl_request_records(self->r, from, to, (float *)PyArray_DATA((PyArrayObject *)a));
    Py_END_ALLOW_THREADS
    if (got != to - from) { /* cannot be: tokens are never taken back */
        Py_DECREF(a);
        PyErr_Format(PyExc_RuntimeError, "records: %d of %d rows", got, to - from);
        return NULL;
    }
    return a;
}

/* beams() -> [(int64 ids, score, int64 beam indices), ...]: a finished beam search's hypotheses, best first
 * (fl_request_beam); [] for other requests and before it finished. */
static PyObject *req_beams(FlPyRequest *self, PyObject *noargs) {
    (void)noargs;
    const int n = fl_request_n_beams(self->r);
    PyObject *res = PyList_New(n);
    for (int i = 0; res && i < n; i++) {
        float score = 0;
        const int len = fl_request_beam(self->r, i, NULL, NULL, 0, &score);
        npy_intp dims[1] = {len > 0 ? len : 0};
        PyObject *a = PyArray_SimpleNew(1, dims, NPY_INT64), *b = PyArray_SimpleNew(1, dims, NPY_INT64);
        int32_t *tmp = len > 0 ? malloc((size_t)len * 8) : NULL;
        if (!a || !b || (len > 0 && !tmp)) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            free(tmp);
            Py_CLEAR(res);
            if (!PyErr_Occurred()) PyErr_NoMemory();
            break;
        }
        if (len > 0) {
            fl_request_beam(self->r, i, tmp, tmp + len, len, &score);
            int64_t *d = PyArray_DATA((PyArrayObject *)a), *di = PyArray_DATA((PyArrayObject *)b);
            for (int k = 0; k < len; k++) {
                d[k] = tmp[k];
                di[k] = tmp[len + k];
            }
        }
        free(tmp);
        PyObject *t = Py_BuildValue("(NdN)", a, (double)score, b);
        if (!t) { Py_CLEAR(res); break; }
        PyList_SET_ITEM(res, i, t);
    }
    return res;
}

/* beam_scores() -> float32 [steps, num_beams, vocab]: a finished beam search's kept scores (keep_scores: transformers'
 * scores, each step's processed log-probs of the running beams), [0, 0, 0] when none were kept. */
static PyObject *req_beam_scores(FlPyRequest *self, PyObject *noargs) {
    (void)noargs;
    const int steps = fl_request_beam_scores(self->r, -1, NULL);
    const int K = steps ? fl_request_beam_width(self->r) : 0, V = steps ? fl_request_vocab(self->r) : 0;
    npy_intp dims[3] = {steps, K, V};
    PyObject *a = PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (!a) return NULL;
    float *d = PyArray_DATA((PyArrayObject *)a);
    for (int t = 0; t < steps; t++) fl_request_beam_scores(self->r, t, d + (size_t)t * K * V);
    return a;
}

static PyObject *req_record_size(FlPyRequest *self, void *c) {
    (void)c;
    return PyLong_FromLong(fl_request_record_size(self->r));
}

/* check(): raise the request's error if it failed; returns whether it is finished. */
static PyObject *req_check(FlPyRequest *self, PyObject *noargs) {
    (void)noargs;
    char msg[FL_ERR_MAX];
    int done = 0;
    fl_request_wait(self->r, INT32_MAX, 0, &done);
    const fl_status st = fl_request_status(self->r, msg, sizeof msg);
    if (st != FL_OK) {
        if (st == FL_E_INTERRUPTED) {
            PyErr_SetString(PyExc_RuntimeError, msg);
            return NULL;
        }
        fl_err(st, "%s", msg);
        return fl_py_raise(st);
    }
    return PyBool_FromLong(done);
}

static PyObject *req_cancel(FlPyRequest *self, PyObject *noargs) {
    (void)noargs;
    fl_request_cancel(self->r);
    Py_RETURN_NONE;
}

static PyObject *req_n_prompt(FlPyRequest *self, void *c) {
    (void)c;
    return PyLong_FromLong(self->n_prompt);
}

static PyMethodDef req_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))req_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(have=0, timeout=None) -> (n, done): until more than `have` tokens are generated or the request ends."},
    {"tokens", (PyCFunction)req_tokens, METH_VARARGS, "tokens(start=0, stop=None) -> int64 array of generated ids."},
    {"records", (PyCFunction)req_records, METH_VARARGS,
     "records(start=0, stop=None) -> float32 [n, record_size]: what was kept of each token (engine_submit's keep_*)."},
    {"beams", (PyCFunction)req_beams, METH_NOARGS,
     "beams() -> [(int64 ids, score, int64 beam indices), ...]: a finished beam search's hypotheses, best first."},
    {"beam_scores", (PyCFunction)req_beam_scores, METH_NOARGS,
     "beam_scores() -> float32 [steps, num_beams, vocab]: a finished beam search's kept scores (keep_scores)."},
    {"check", (PyCFunction)req_check, METH_NOARGS, "Raise the request's error if it failed; return whether it finished."},
    {"cancel", (PyCFunction)req_cancel, METH_NOARGS, "Stop the request; its KV pages are freed at the next step."},
    {NULL, NULL, 0, NULL},
};
static PyGetSetDef req_getset[] = {{"n_prompt", (getter)req_n_prompt, NULL, "prompt tokens", NULL},
                                   {"record_size", (getter)req_record_size, NULL, "floats kept per token", NULL},
                                   {NULL}};

static PyTypeObject FlPyRequest_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastload._C.Request",
    .tp_basicsize = sizeof(FlPyRequest),
    .tp_dealloc = (destructor)req_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One request of a model's engine (made by Model.engine_submit).",
    .tp_methods = req_methods,
    .tp_getset = req_getset,
};

PyObject *fl_py_request_wrap(PyObject *owner, fl_request *r, int n_prompt) {
    FlPyRequest *o = PyObject_New(FlPyRequest, &FlPyRequest_Type);
    if (!o) {
        fl_request_release(r);
        return NULL;
    }
    Py_INCREF(owner);
    o->owner = owner;
    o->r = r;
    o->n_prompt = n_prompt;
    return (PyObject *)o;
}

int fl_py_init_engine(PyObject *m) {
    if (PyType_Ready(&FlPyRequest_Type) < 0) return -1;
    return PyModule_AddObjectRef(m, "Request", (PyObject *)&FlPyRequest_Type);
}
