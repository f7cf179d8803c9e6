// qdp_bf16.cu: the dp2a decode GEMV (qdp.cuh) for __nv_bfloat16 activations.
#define FL_QDP_T __nv_bfloat16
#include "qdp.cuh"
