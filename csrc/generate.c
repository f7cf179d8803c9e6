/* generate.c: the generation loop. One call runs prefill and every decode step; the host
 * language is called back only to stream tokens (and to notice Ctrl-C). Semantics follow
 * transformers' generate: left padding with attention_mask, position_ids = cumsum(mask) - 1,
 * finished rows emit pad_token_id, stop when every row has produced an eos id. */
#include "sampling.h"
#include <math.h>
#include <stdlib.h>

#ifdef FL_WITH_CUDA
/* csrc/cuda/generate_cuda.cu: the same loop with sampling on the device and graph-replayed steps */
fl_status fl_cuda_generate(fl_model *m, const int32_t *ids, const uint8_t *mask, int B, int T,
                           const fl_gen_params *p, int32_t *out, int *n_new, fl_stream_fn cb, void *ud);
#endif

/* Prompts are run through the model in chunks of at most this many tokens (all rows together), so
 * the activation workspace stays bounded for long prompts; the KV cache holds the whole context. */
#define FL_PREFILL_TOKENS 2048

int fl_gen_positions(const uint8_t *mask, int B, int T, int total, uint8_t *kfull, int32_t *pos, int32_t *npos) {
    int any_pad = 0;
    for (int b = 0; b < B; b++) {
        int c = 0;
        for (int t = 0; t < T; t++) {
            const uint8_t mv = mask ? mask[(size_t)b * T + t] != 0 : 1;
            kfull[(size_t)b * total + t] = mv;
            any_pad |= !mv;
            c += mv;
            pos[(size_t)b * T + t] = mv ? c - 1 : 1; /* transformers: cumsum - 1, padding -> 1 */
        }
        npos[b] = c;
        memset(kfull + (size_t)b * total + T, 1, (size_t)(total - T));
    }
    return any_pad;
}

fl_status fl_generate(fl_model *m, const int32_t *ids, const uint8_t *mask, int B, int T,
                      const fl_gen_params *p, int32_t *out, int *n_new, fl_stream_fn cb, void *ud) {
    const int V = m->cfg.vocab, maxn = p->max_new_tokens;
    *n_new = 0;
    if (B <= 0 || T <= 0) return fl_err(FL_E_VALUE, "generate: input_ids must have at least one row and one column");
    if (maxn < 0) return fl_err(FL_E_VALUE, "generate: max_new_tokens must be >= 0");
    if ((int64_t)T + maxn > INT32_MAX || (int64_t)B * ((int64_t)T + maxn) > INT32_MAX)
        return fl_err(FL_E_VALUE, "generate: %d rows of %d + %d tokens is too many", B, T, maxn);
    for (int i = 0; i < B * T; i++)
        if (ids[i] < 0 || ids[i] >= V)
            return fl_err(FL_E_VALUE, "input_ids[%d][%d] = %d is outside the vocabulary [0, %d)", i / T, i % T, (int)ids[i], V);
#ifdef FL_WITH_CUDA
    if (strncmp(m->be->name, "cuda", 4) == 0) return fl_cuda_generate(m, ids, mask, B, T, p, out, n_new, cb, ud);
#endif
    const int total = T + maxn;
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * total, ids + (size_t)b * T, (size_t)T * 4);
    if (maxn == 0) return FL_OK;

    fl_kvcache *kv = NULL;
    FL_TRY(fl_kv_create(m, B, total, &kv));
    fl_status st = FL_OK;
    float *logits = malloc((size_t)B * V * sizeof(float));
    int32_t *pos = malloc((size_t)B * T * 4), *next = malloc((size_t)B * 4), *npos = malloc((size_t)B * 4);
    int32_t *idx = malloc((size_t)V * 4);
    uint8_t *kfull = malloc((size_t)B * total), *done = calloc((size_t)B, 1);
    uint8_t *mark = malloc((size_t)V);
    fl_rng *rng = malloc((size_t)B * sizeof(fl_rng));
    if (!logits || !pos || !next || !npos || !idx || !kfull || !done || !mark || !rng) {
        st = fl_err(FL_E_NOMEM, "generate: cannot allocate host buffers");
        goto out;
    }
    const int any_pad = fl_gen_positions(mask, B, T, total, kfull, pos, npos);
    for (int b = 0; b < B; b++) fl_rng_seed(&rng[b], p->seed + 0x9e3779b97f4a7c15ull * (uint64_t)b);
    /* prefill in chunks; the key mask keeps its full row stride for every step */
    const int chunk = FL_PREFILL_TOKENS / B > 0 ? FL_PREFILL_TOKENS / B : 1, tcm = chunk < T ? chunk : T;
    int32_t *ctok = malloc((size_t)B * tcm * 4), *cpos = malloc((size_t)B * tcm * 4);
    if (!ctok || !cpos) st = fl_err(FL_E_NOMEM, "generate: cannot allocate host buffers");
    m->rope_len = npos; /* dynamic NTK rope: every chunk of the prompt takes the prompt's length, as one forward would */
    for (int c0 = 0; st == FL_OK && c0 < T; c0 += tcm) {
        const int tc = T - c0 < tcm ? T - c0 : tcm;
        for (int b = 0; b < B; b++) {
            memcpy(ctok + (size_t)b * tc, ids + (size_t)b * T + c0, (size_t)tc * 4);
            memcpy(cpos + (size_t)b * tc, pos + (size_t)b * T + c0, (size_t)tc * 4);
        }
        st = fl_forward(m, kv, B, tc, c0, ctok, cpos, any_pad ? kfull : NULL, total, 0, logits);
    }
    m->rope_len = NULL;
    free(ctok);
    free(cpos);
    int steps = 0;
    for (int s = 0; st == FL_OK && s < maxn; s++) {
        int alive = 0;
        for (int b = 0; b < B; b++) {
            int32_t tok;
            if (done[b]) tok = p->pad_id;
            else {
                float *lg = logits + (size_t)b * V;
                if (p->repetition_penalty != 1.0f && p->repetition_penalty > 0)
                    fl_repetition_penalty(lg, V, out + (size_t)b * total, T + s, p->repetition_penalty, mark);
                if (s < p->min_new_tokens)
                    for (int e = 0; e < p->n_eos; e++) if (p->eos[e] >= 0 && p->eos[e] < V) lg[p->eos[e]] = -INFINITY;
                tok = fl_sample(lg, V, p, &rng[b], idx);
                if (tok < 0) { st = fl_err(FL_E_NOMEM, "generate: cannot allocate sampling scratch"); break; }
                for (int e = 0; e < p->n_eos; e++) if (tok == p->eos[e]) done[b] = 1;
            }
            out[(size_t)b * total + T + s] = tok;
            next[b] = tok;
            alive += !done[b];
        }
        if (st != FL_OK) break;
        steps = s + 1;
        if (cb && cb(ud, next, B)) { st = fl_err(FL_E_INTERRUPTED, "generation interrupted"); break; }
        if (!alive || s + 1 == maxn) break;
        st = fl_forward(m, kv, B, 1, T + s, next, npos, any_pad ? kfull : NULL, total, 0, logits);
        for (int b = 0; b < B; b++) npos[b]++;
    }
    *n_new = steps;
    /* compact rows to T + steps columns */
    if (steps < maxn)
        for (int b = 1; b < B; b++)
            memmove(out + (size_t)b * (T + steps), out + (size_t)b * total, (size_t)(T + steps) * 4);
out:
    fl_kv_free(m, kv);
    free(logits); free(pos); free(next); free(npos); free(idx); free(kfull); free(done); free(mark); free(rng);
    return st;
}
