// dev/cuda/tma_util.cuh: shared memory addresses, mbarriers and the copy engine's bulk copy (sm_90), for the
// benchmarks that stream through them (qgemv_bench.cu's TMA GEMVs, persist_bench.cu's persist-tma). No dependencies.
#ifndef FL_DEV_TMA_UTIL_CUH
#define FL_DEV_TMA_UTIL_CUH
#include <stdint.h>

__device__ __forceinline__ uint32_t fl_smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void fl_mbar_init(uint64_t *b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(fl_smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void fl_mbar_expect_tx(uint64_t *b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(fl_smem_addr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void fl_mbar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(fl_smem_addr(b)) : "memory");
}
__device__ __forceinline__ void fl_mbar_wait(uint64_t *b, uint32_t parity) {
    asm volatile(
        "{\n .reg .pred p;\n"
        "W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra W;\n}" ::"r"(fl_smem_addr(b)), "r"(parity) : "memory");
}
// bytes [src, src + bytes) of global memory into shared memory at dst, completion counted on barrier b
__device__ __forceinline__ void fl_bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     fl_smem_addr(dst)), "l"(src), "r"(bytes), "r"(fl_smem_addr(b))
                 : "memory");
}

#endif
