// generate_cuda.cu: the generation loop on the device.
//
// Prefill runs in chunks of at most FL_PREFILL_TOKENS tokens (bounded workspace for long prompts).
// Then every decode step is ONE CUDA graph replay: forward (T = 1, cache slot and positions read
// from device memory) -> sample -> advance (write the token, mark eos rows, bump positions).
// Token ids never leave the device; the host enqueues K replays and then reads one int (rows
// still alive) through pinned memory, so it checks stop conditions without stalling every token.
// With a streamer it reads the B new ids after every step (that is what streaming asks for).
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>
#include "../fl_model.h"
#include "sample.cuh"

extern "C" cudaStream_t fl_cuda_stream(fl_backend *be);  // cuda_backend.cu

#define FL_PREFILL_TOKENS 2048
#define CHECK_EVERY 8

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { st = fl_err(FL_E_DEVICE, "%s failed at %s:%d: %s", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); goto out; } } while (0)
#define TRY(x) do { st = (x); if (st != FL_OK) goto out; } while (0)

extern "C" fl_status fl_cuda_generate(fl_model *m, const int32_t *ids, const uint8_t *mask, int B, int T,
                                      const fl_gen_params *p, int32_t *out, int *n_new, fl_stream_fn cb, void *ud) {
    fl_backend *be = m->be;
    cudaStream_t s = fl_cuda_stream(be);
    const int V = m->cfg.vocab, maxn = p->max_new_tokens, total = T + maxn;
    fl_status st = FL_OK;
    fl_kvcache *kv = NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int32_t *pin = NULL;  // pinned: [0] alive, [1..B] next tokens
    int32_t *tok_h = NULL, *pos_h = NULL, *npos = NULL;
    uint8_t *kfull = NULL, *kmask_d = NULL;
    fl_cuda_gen_state g;
    memset(&g, 0, sizeof g);
    void *state = NULL;
    int steps = 0;
    *n_new = 0;

    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * total, ids + (size_t)b * T, (size_t)T * 4);
    if (maxn == 0) return FL_OK;
    if (p->n_eos > 16) return fl_err(FL_E_VALUE, "generate on CUDA: at most 16 eos token ids");

    fl_cuda_sampling sp;
    memset(&sp, 0, sizeof sp);
    sp.do_sample = p->do_sample; sp.temperature = p->temperature; sp.top_p = p->top_p; sp.top_k = p->top_k;
    sp.repetition_penalty = (p->repetition_penalty > 0 ? p->repetition_penalty : 1.f);
    sp.min_new = p->min_new_tokens; sp.n_eos = p->n_eos; sp.pad_id = p->pad_id; sp.seed = p->seed;
    for (int e = 0; e < p->n_eos; e++) sp.eos[e] = p->eos[e];

    TRY(fl_kv_create(m, B, total, &kv));
    {
        const int chunk = FL_PREFILL_TOKENS / B > 0 ? FL_PREFILL_TOKENS / B : 1;
        const int tc_max = chunk < T ? chunk : T;
        TRY(fl_model_reserve(m, B * tc_max, B));
        // device state, one allocation
        const size_t sz_out = (size_t)B * total * 4, sz_b = (size_t)B * 4, sz_scr = (size_t)B * V * 4;
        const size_t bytes = sz_out + 4 * sz_b + 64 + sz_scr + (size_t)B * total + 256;
        TRY(be->alloc(be, bytes, &state));
        char *q = (char *)state;
        g.scratch = (float *)q; q += sz_scr;
        g.out = (int32_t *)q; q += sz_out;
        g.next = (int32_t *)q; q += sz_b;
        g.pos = (int32_t *)q; q += sz_b;
        g.sampled = (int32_t *)q; q += sz_b;
        g.start = (int32_t *)q; g.step = g.start + 1; g.alive = g.start + 2; q += 64;
        g.done = (uint8_t *)q; q += ((size_t)B + 63) & ~(size_t)63;
        kmask_d = (uint8_t *)q;

        tok_h = (int32_t *)malloc((size_t)B * tc_max * 4);
        pos_h = (int32_t *)malloc((size_t)B * T * 4);
        npos = (int32_t *)malloc(sz_b);
        kfull = (uint8_t *)malloc((size_t)B * total);
        if (!tok_h || !pos_h || !npos || !kfull) { st = fl_err(FL_E_NOMEM, "generate: host buffers"); goto out; }
        const int any_pad = fl_gen_positions(mask, B, T, total, kfull, pos_h, npos);
        CK(cudaMallocHost((void **)&pin, (size_t)(B + 1) * 4));
        CK(cudaMemcpyAsync(g.out, out, sz_out, cudaMemcpyHostToDevice, s));
        CK(cudaMemcpyAsync(kmask_d, kfull, (size_t)B * total, cudaMemcpyHostToDevice, s));
        CK(cudaMemcpyAsync(g.pos, npos, sz_b, cudaMemcpyHostToDevice, s));
        CK(cudaMemsetAsync(g.done, 0, (size_t)B, s));
        CK(cudaMemsetAsync(g.step, 0, 4, s));
        const uint8_t *km = any_pad ? kmask_d : NULL;

        // prefill, chunk by chunk; logits of the last chunk's last tokens stay in m->ws_logits
        for (int c0 = 0; c0 < T; c0 += tc_max) {
            const int tc = T - c0 < tc_max ? T - c0 : tc_max;
            for (int b = 0; b < B; b++) {
                memcpy(tok_h + (size_t)b * tc, ids + (size_t)b * T + c0, (size_t)tc * 4);
            }
            CK(cudaMemcpyAsync(m->ws_tok_d, tok_h, (size_t)B * tc * 4, cudaMemcpyHostToDevice, s));
            for (int b = 0; b < B; b++) memcpy(tok_h + (size_t)b * tc, pos_h + (size_t)b * T + c0, (size_t)tc * 4);
            CK(cudaMemcpyAsync(m->ws_pos_d, tok_h, (size_t)B * tc * 4, cudaMemcpyHostToDevice, s));
            CK(cudaStreamSynchronize(s));  // tok_h is reused by the next chunk
            fl_step ps;
            memset(&ps, 0, sizeof ps);
            ps.batch = B; ps.n_new = tc; ps.start = c0; ps.pos_d = m->ws_pos_d; ps.kmask_d = km; ps.kmask_stride = total;
            ps.dyn.len_d = g.pos;  // dynamic NTK rope: each row's whole prompt length (its next position), every chunk
            TRY(fl_forward_core(m, kv, &ps, m->ws_tok_d, 0));
        }
        TRY(fl_cuda_sample(s, be->act, m->ws_logits, B, V, T, total, &sp, &g));
        TRY(fl_cuda_advance(s, B, T, total, &sp, &g));
        steps = 1;
        if (cb) {
            CK(cudaMemcpyAsync(pin, g.alive, 4, cudaMemcpyDeviceToHost, s));
            CK(cudaMemcpyAsync(pin + 1, g.next, sz_b, cudaMemcpyDeviceToHost, s));
            CK(cudaStreamSynchronize(s));
            if (cb(ud, pin + 1, B)) { st = fl_err(FL_E_INTERRUPTED, "generation interrupted"); goto out; }
        }

        if (maxn > 1) {
            fl_step ds;
            memset(&ds, 0, sizeof ds);
            ds.batch = B; ds.n_new = 1; ds.start = T; ds.start_d = g.start; ds.pos_d = g.pos; ds.kmask_d = km;
            ds.kmask_stride = total;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            st = fl_forward_core(m, kv, &ds, g.next, 0);
            if (st == FL_OK) st = fl_cuda_sample(s, be->act, m->ws_logits, B, V, T, total, &sp, &g);
            if (st == FL_OK) st = fl_cuda_advance(s, B, T, total, &sp, &g);
            {
                cudaError_t e = cudaStreamEndCapture(s, &graph);
                if (st != FL_OK) goto out;
                if (e != cudaSuccess) { st = fl_err(FL_E_DEVICE, "capturing the decode step: %s", cudaGetErrorString(e)); goto out; }
            }
            CK(cudaGraphInstantiate(&exec, graph, 0));
            int alive = 1;
            while (steps < maxn && alive) {
                const int k = cb ? 1 : (maxn - steps < CHECK_EVERY ? maxn - steps : CHECK_EVERY);
                for (int i = 0; i < k; i++) CK(cudaGraphLaunch(exec, s));
                steps += k;
                CK(cudaMemcpyAsync(pin, g.alive, 4, cudaMemcpyDeviceToHost, s));
                if (cb) CK(cudaMemcpyAsync(pin + 1, g.next, sz_b, cudaMemcpyDeviceToHost, s));
                CK(cudaStreamSynchronize(s));
                alive = pin[0];
                if (cb && cb(ud, pin + 1, B)) { st = fl_err(FL_E_INTERRUPTED, "generation interrupted"); goto out; }
            }
        }
        CK(cudaMemcpyAsync(out, g.out, sz_out, cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        // Rows stop at their first eos; the output ends where the last row stopped (steps run past
        // that between checks only wrote pad ids).
        int used = 0;
        for (int b = 0; b < B; b++) {
            int len = steps;
            for (int i = 0; i < steps; i++) {
                const int32_t t = out[(size_t)b * total + T + i];
                int is_eos = 0;
                for (int e = 0; e < p->n_eos; e++) is_eos |= t == p->eos[e];
                if (is_eos) { len = i + 1; break; }
            }
            if (len > used) used = len;
        }
        *n_new = used;
        if (used < maxn)
            for (int b = 1; b < B; b++) memmove(out + (size_t)b * (T + used), out + (size_t)b * total, (size_t)(T + used) * 4);
    }
out:
    if (st != FL_OK) cudaStreamSynchronize(s);
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (pin) cudaFreeHost(pin);
    if (state) be->free(be, state);
    fl_kv_free(m, kv);
    free(tok_h); free(pos_h); free(npos); free(kfull);
    return st;
}
