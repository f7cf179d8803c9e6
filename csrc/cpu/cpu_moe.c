/* cpu_moe.c: Mixture of Experts on the CPU backend (float32 activations).
 *
 * Routing as transformers' Mixtral / Qwen MoE routers: softmax over the experts in float32, the top k, optionally
 * renormalised. The experts run grouped: the (token, choice) slots are sorted by expert, each chosen expert's
 * rows are gathered into one block, and its weights are read once per forward (one GEMM per expert over all its
 * tokens; a GEMV in decode) through the ordinary matmul, so float and quantised experts take the same path. */
#include "cpu_internal.h"
#include "../quant.h"
#include <stdlib.h>

fl_status cpu_moe_route(fl_backend *be, int32_t *ids, float *wts, const void *logits_d, int n, int E, int k, int norm) {
    const float *logits = (const float *)logits_d;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 16)
    for (int i = 0; i < n; i++) {
        const float *l = logits + (int64_t)i * E;
        float p[FL_MOE_MAX_EXPERTS]; /* E <= FL_MOE_MAX_EXPERTS (check_config) */
        float mx = l[0];
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        float sum = 0.f;
        for (int e = 0; e < E; e++) { p[e] = expf(l[e] - mx); sum += p[e]; }
        for (int e = 0; e < E; e++) {
            p[e] /= sum;
            if (!(p[e] >= 0.f)) p[e] = 0.f; /* NaN logits: still k distinct experts (the logits show the NaN) */
        }
        /* top k by repeated selection: descending, ties to the lower index; a chosen expert is marked -1 (p >= 0) */
        float tot = 0.f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
            ids[(int64_t)i * k + j] = best;
            wts[(int64_t)i * k + j] = p[best];
            tot += p[best];
            p[best] = -1.f;
        }
        if (norm)
            for (int j = 0; j < k; j++) wts[(int64_t)i * k + j] /= tot;
    }
    return FL_OK;
}

fl_status cpu_moe_ffn(fl_backend *be, void *out_d, const void *x_d, int n, const int32_t *ids, const float *wts, int k,
                      int E, const fl_weight *w13, const fl_weight *w2, const fl_moe_scratch *ws, int may_sync) {
    (void)may_sync;
    const int64_t d = w13->cols, f = w2->cols, nk = (int64_t)n * k;
    if (w13->rows != (int64_t)E * 2 * f || w2->rows != (int64_t)E * d)
        return fl_err(FL_E_INTERNAL, "moe: expert weights [%lld, %lld] / [%lld, %lld] do not hold %d experts",
                      (long long)w13->rows, (long long)w13->cols, (long long)w2->rows, (long long)w2->cols, E);
    const float *x = (const float *)x_d;
    float *out = (float *)out_d, *xs = (float *)ws->xs, *gu = (float *)ws->gu, *ff = (float *)ws->ff, *y = (float *)ws->y;
    int32_t *offs = ws->offs, *perm = ws->perm, *inv = ws->inv;
    /* group the slots by expert: counts, offsets, then each slot's place (stable: token order within an expert) */
    for (int e = 0; e <= E; e++) offs[e] = 0;
    for (int64_t s = 0; s < nk; s++) {
        if (ids[s] < 0 || ids[s] >= E) return fl_err(FL_E_INTERNAL, "moe: expert id %d out of range", (int)ids[s]);
        offs[ids[s] + 1]++;
    }
    for (int e = 0; e < E; e++) offs[e + 1] += offs[e];
    for (int64_t s = 0; s < nk; s++) { /* offs[e] walks to offs[e + 1] here; restored below */
        const int32_t p = offs[ids[s]]++;
        perm[p] = (int32_t)s;
        inv[s] = p;
    }
    for (int e = E; e > 0; e--) offs[e] = offs[e - 1];
    offs[0] = 0;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (nk > 8)
    for (int64_t p = 0; p < nk; p++) memcpy(xs + p * d, x + (int64_t)(perm[p] / k) * d, (size_t)d * 4);
    for (int e = 0; e < E; e++) { /* gate | up of every slot routed to e, one read of the expert's rows */
        const int c = offs[e + 1] - offs[e];
        if (!c) continue;
        const fl_weight v = fl_weight_rows(w13, (int64_t)e * 2 * f, 2 * f);
        FL_TRY(cpu_matmul(be, gu + (int64_t)offs[e] * 2 * f, xs + (int64_t)offs[e] * d, c, &v, NULL));
    }
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (nk > 1)
    for (int64_t p = 0; p < nk; p++) {
        const float *g = gu + p * 2 * f, *u = g + f;
        float *o = ff + p * f;
        for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
    for (int e = 0; e < E; e++) {
        const int c = offs[e + 1] - offs[e];
        if (!c) continue;
        const fl_weight v = fl_weight_rows(w2, (int64_t)e * d, d);
        FL_TRY(cpu_matmul(be, y + (int64_t)offs[e] * d, ff + (int64_t)offs[e] * f, c, &v, NULL));
    }
    /* out[i] = sum of wts * y over the token's slots, in ascending expert order (transformers' index_add_ order) */
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 4)
    for (int i = 0; i < n; i++) {
        int order[FL_MOE_MAX_K];
        for (int j = 0; j < k; j++) order[j] = j;
        for (int a = 1; a < k; a++) /* insertion sort of k <= 16 slots by expert id */
            for (int b = a; b > 0 && ids[(int64_t)i * k + order[b]] < ids[(int64_t)i * k + order[b - 1]]; b--) {
                const int t = order[b]; order[b] = order[b - 1]; order[b - 1] = t;
            }
        float *o = out + (int64_t)i * d;
        for (int64_t c = 0; c < d; c++) o[c] = 0.f;
        for (int j = 0; j < k; j++) {
            const int64_t s = (int64_t)i * k + order[j];
            const float w = wts[s], *ys = y + (int64_t)inv[s] * d;
#pragma omp simd
            for (int64_t c = 0; c < d; c++) o[c] += w * ys[c];
        }
    }
    return FL_OK;
}
