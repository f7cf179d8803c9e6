/* py_common.h: shared by the binding files (the only files that include Python.h / NumPy). */
#ifndef FL_PY_COMMON_H
#define FL_PY_COMMON_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL fastload_ARRAY_API
#ifndef FL_PY_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "../fl_common.h"
#include "../safetensors.h"
#include "../gguf.h"
#include "../fl_model.h"

/* fastload.CheckpointError (subclass of ValueError): a checkpoint file is malformed. */
extern PyObject *FlCheckpointError;
/* fastload.EngineBusy (subclass of RuntimeError): the engine's queue of waiting requests is full. */
extern PyObject *FlEngineBusy;
/* Raise the Python exception for `st` with the thread's fl_err message; returns NULL. */
PyObject *fl_py_raise(fl_status st);

typedef struct { PyObject_HEAD fl_st_file *f; } FlPySt;
typedef struct { PyObject_HEAD fl_gguf *g; } FlPyGGUF;
extern PyTypeObject FlPySt_Type, FlPyGGUF_Type;

/* Each binding file registers its types/functions; return 0 or -1 with an exception set. */
int fl_py_init_safetensors(PyObject *m);
int fl_py_init_gguf(PyObject *m);
int fl_py_init_model(PyObject *m);
int fl_py_init_ops(PyObject *m);  /* run_op: one backend op on numpy arrays (tests) */
int fl_py_init_engine(PyObject *m); /* the Request type (py_engine.c) */
#endif
