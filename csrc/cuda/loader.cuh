// loader.cuh: the CUDA backend's loading pipeline (the fl_backend `load` hook).
//
// Checkpoint bytes travel  file -> pinned host buffer -> device  in fixed-size chunks:
//   - N reader threads (FASTLOAD_LOAD_THREADS, default min(16, cores)) each own a stream and two
//     pinned buffers (kept for the next call, see FASTLOAD_LOAD_KEEP_POOL); a reader takes the
//     next chunk, preads it (O_DIRECT where the page cache does not hold it), and queues its
//     copies to the device on its own stream, so the read of the next chunk overlaps the copy of
//     the last one. An event per buffer says when it is free again.
//   - tensors whose dtype is kept are copied straight into their place in the weight arena
//     (job->dst_d): no device memory beyond the weights;
//   - tensors that change dtype (bf16 -> f16, f32 -> bf16, f64 -> ...) go through a ring of up to
//     eight chunk-sized device staging slots (at most 128 MiB; 32 MiB at the default chunk) and a
//     conversion kernel writes dst_d.
//   - the calling thread only reports progress (cb every ~50 ms and at the end) and, when cb
//     returns nonzero, stops the readers and returns FL_E_INTERRUPTED.
// Everything but the cached pinned buffers (threads, streams, events, staging memory, descriptors,
// maps) is made inside the call and released before it returns, on success or failure. The
// caller has released the GIL. The device is the calling thread's current device (cudaGetDevice).
//
// Environment (read at each call):
//   FASTLOAD_LOAD_THREADS=N      reader threads (1..64); default min(16, online cores)
//   FASTLOAD_LOAD_CHUNK=SIZE     chunk bytes, with an optional K/M suffix (64K..64M, rounded up
//                                to 4 KiB); default 4M
//   FASTLOAD_LOAD_KEEP_POOL=1|0  1 (default): keep the pinned read buffers (threads x 2 x chunk)
//                                for the next call in this process; 0: free them on return
//   FASTLOAD_LOAD_PINNED=register|alloc  how the buffers are pinned: huge-page anonymous memory +
//                                cudaHostRegister (default; cudaHostAlloc where that fails), or
//                                cudaHostAlloc
//   FASTLOAD_LOAD_DIRECT=auto|0|1  auto (default): per chunk, O_DIRECT when most of its pages are
//                                not in the page cache (mincore; for files we do not own, where
//                                mincore cannot see the cache, a one-page RWF_NOWAIT read);
//                                0: buffered only; 1: O_DIRECT always (buffered where the file
//                                system refuses O_DIRECT)
#ifndef FL_CUDA_LOADER_CUH
#define FL_CUDA_LOADER_CUH

#include "../fl_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

// Load every job (plain-dtype sources only; unpermute_heads must be 0) into its dst_d.
// Adds the tensors' bytes to stats->bytes_read, sets stats->threads and stats->direct_io.
// Errors: FL_E_IO (open/pread/short file, message names file, offset and tensor), FL_E_DEVICE
// (a CUDA call, message names the call), FL_E_NOMEM, FL_E_UNSUPPORTED (dtype pair),
// FL_E_INTERNAL (a job this hook never receives: GGML source, un-permuted heads, size mismatch),
// FL_E_INTERRUPTED (cb returned nonzero).
fl_status fl_cuda_load(fl_backend *be, const fl_load_job *jobs, int n, fl_progress_fn cb, void *ud,
                       fl_load_stats *stats);

// Free the pinned read buffers that fl_cuda_load keeps for the next call (no-op while a load runs).
void fl_cuda_load_release_pool(void);

#ifdef __cplusplus
}
#endif
#endif
