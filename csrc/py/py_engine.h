/* py_engine.h: the Request type and the CPU engine driver (py_engine.c), for py_model.c. */
#ifndef FL_PY_ENGINE_H
#define FL_PY_ENGINE_H
#include "py_common.h"
#include "../engine.h"

/* A new _C.Request owning r (released on failure) and a reference to owner (the _C.Model). */
PyObject *fl_py_request_wrap(PyObject *owner, fl_request *r, int n_prompt);
/* fl_engine_kick_fn for CPU models: steps run on the process's compute thread. */
int fl_py_exec_kick(void *ud, fl_engine *e);
/* Run forward request f through engine e and wait for it with the GIL released (GIL held on entry and exit): 0 when
 * f->logits is written, -1 with a Python exception (the request's error; KeyboardInterrupt on Ctrl-C, after the
 * request has stopped). f's arrays are not touched after it returns. cpu: e's steps run on the compute thread. */
int fl_py_engine_forward(fl_engine *e, const fl_forward_req *f, int cpu);
#endif
