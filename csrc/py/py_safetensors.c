/* py_safetensors.c: placeholder until the safetensors binding lands. */
#include "py_common.h"
PyTypeObject FlPySt_Type;
int fl_py_init_safetensors(PyObject *m) { (void)m; return 0; }
