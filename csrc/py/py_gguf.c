/* py_gguf.c: placeholder until the GGUF binding lands. */
#include "py_common.h"
PyTypeObject FlPyGGUF_Type;
int fl_py_init_gguf(PyObject *m) { (void)m; return 0; }
