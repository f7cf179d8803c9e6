/* py_model.c: placeholder until the model binding lands. */
#include "py_common.h"
int fl_py_init_model(PyObject *m) { (void)m; return 0; }
