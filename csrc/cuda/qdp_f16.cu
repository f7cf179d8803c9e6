// qdp_f16.cu: the dp2a decode GEMV (qdp.cuh) for __half activations.
#define FL_QDP_T __half
#include "qdp.cuh"
