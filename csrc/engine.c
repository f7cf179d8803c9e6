/* engine.c: continuous batching over a paged KV cache (see engine.h for the design).
 *
 * Locking: one mutex (mu) guards the queue (both lanes), the running set, the page pool and every request's
 * public fields; the step runs its forward passes without it (under model_mu), so callers can
 * submit, wait and cancel while the device works. Only the driver thread changes a running
 * request's pages and tokens; callers read tokens under mu. A forward request's arrays belong to its caller, who
 * waits until it is finished; the driver writes its logits under model_mu and finishes it under mu. */
#include "engine.h"
#include "sampling.h"
#include "fl_exp.h"
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { RQ_WAITING = 0, RQ_PREFILL, RQ_DECODE, RQ_DONE, RQ_FORWARD /* a forward being run by a step */,
       RQ_BEAM_IDLE /* a beam search's beam before the first selection gives it a sequence (fl_beams) */ };
enum { RQ_GENERATE = 0, RQ_KIND_FORWARD };
#define FL_ENGINE_MAX_EOS 64

struct fl_request {
    fl_engine *e;
    int refs;                 /* the caller's and the engine's */
    int kind;                 /* RQ_GENERATE, RQ_KIND_FORWARD (fwd below; no tokens, pages or sampling) */
    fl_forward_req fwd;
    fl_kvcache *fkv;          /* a forward read in chunks: its transient cache (B x T), from its first chunk to its end */
    int fk, fn;               /* its chunks read, and in all (0: not planned yet) */
    int32_t *fbuf;            /* B > 1: one chunk's ids and positions, gathered from the rows */
    int state;
    int cancel;
    uint64_t seq;             /* arrival order: the oldest is served first, the newest preempted first */
    int32_t *toks;            /* prompt, then every generated token: [n_prompt + n_out] of cap */
    int n_prompt, n_out, cap;
    int n_cached;             /* leading tokens whose K/V are in the cache */
    int32_t *pages;           /* block-table row: the pages of slots [0, n_pages * page) */
    int n_pages, n_reg;       /* pages held; leading pages that are (in) the prefix table */
    int pgen;                 /* bumped whenever its pages are given back (the device block table may be stale) */
    int step_rows;            /* rows of this decode step (1; more while replaying after a preemption) */
    int hit1;                 /* 1 + the prompt tokens its first read took from the prefix table (0: not read yet) */
    fl_gen_params p;
    int32_t eos[FL_ENGINE_MAX_EOS];
    void *gen_mem;            /* p's arrays beside eos (biases, begin bans, forced eos), copied: p points here */
    fl_rng rng;
    fl_status st;
    char err[FL_ERR_MAX];
    pthread_cond_t cv;
    clockid_t clk;            /* the clock cv's timed waits use (req_cond_init) */
    int wake_at;              /* wake the waiters once n_out reaches this (INT_MAX: nobody waits for a token) */
    /* What is kept of each generated token (p.keep_*, fl_request_records): rows of rec_row floats (0: nothing kept),
     * rec_blk rows a block. The block pointers are made at submit for every token the request may make; the driver
     * allocates a block when it writes its first row (before that token is counted in n_out, under mu), so a reader
     * holding mu reads only rows and pointers that were complete before it took mu. */
    float **rec;
    int rec_row, rec_blk, rec_nblk;
    fl_request *next;         /* waiting queue */
    struct fl_beams *bm;      /* beam search: the group this request is a beam of (NULL: an ordinary request) */
    int beam_row;             /* beam search: its row of the step's logits (set when the step's forward gave them) */
    int beam_i;               /* beam search: its index in its group's req[] */
};

/* The page pool with its prefix table (chained hash over a page's tokens and the page before it). */
typedef struct {
    int n, shift, page;
    int *ref;                 /* holders of each page */
    int *free_stack, n_free;
    int *parent;              /* table pages: the page before (-1: first); -2: not in the table */
    uint32_t *gen, *pgen;     /* times each page left the table; a table page's parent's gen when it was entered */
    int32_t *ptok;            /* [n, page] tokens of table pages */
    int *bucket, nb, *hnext;  /* hash chains */
    uint64_t *hash;
    int *lru_prev, *lru_next, lru_head, lru_tail, n_cached; /* table pages nobody holds, oldest first */
    int peak_used;            /* the most pages held at once, counted as they are taken (a step's end misses the pages
                                 of requests that finished in it) */
} pool_t;

struct fl_engine {
    fl_model *m;
    fl_engine_cfg cfg;
    fl_kvcache kv;            /* the paged cache (batch 0) */
    void *kv_base;
    pool_t pool;
    pthread_mutex_t mu, model_mu;
    pthread_cond_t idle_cv;
    int driving, closing;
    /* handles: requests returned to a caller and not yet fl_request_release'd (Python Request objects: a finished
     * streamer, a kept exception's traceback hold them). fl_engine_free frees everything else at once, but keeps the
     * struct and its mutex, which those requests' calls lock, while any exists (retired); the last release frees it.
     * It freed them with the rest: a later release locked freed memory (hunt20). */
    int handles, retired;
    fl_engine_kick_fn kick;
    void *kick_ud;
    fl_request *wait_head, *wait_tail;
    int n_waiting;
    fl_request *fwd_head, *fwd_tail; /* the forward lane of the queue (oldest first) */
    int n_fwd_waiting;
    fl_request *fwd_running;  /* the forward a step is running (in no list), or NULL */
    int has_pool;             /* the page pool exists (atomic: set once by fl_engine_add_pool, after it is complete) */
    int adding_pool;          /* under mu: an fl_engine_add_pool is under way */
    fl_request **run;         /* [max_batch] admitted requests (prefill or decode) */
    int n_run;
    uint64_t next_seq;
    fl_engine_stats st;
    /* step scratch (driver only) */
    float *logits;            /* [max_batch, vocab] */
    int32_t *idx; uint8_t *mark;
    float *raw;               /* [n_scratch, vocab] a kept row's logits as they came (choose_tokens) */
    int32_t *h_tok, *h_pos, *h_starts, *h_btab; /* host: [max(max_batch, chunk)], [max_batch * max_pages] (the pool's) */
    int32_t *h_in;            /* tokens | positions | starts of one step, packed for one copy */
    void *d_in, *d_btab;      /* their backend copies (NULL on host-memory backends: the host arrays are used) */
    int in_cap;               /* ints in h_in / d_in */
    /* what the device block table holds (graph-replayed decode steps only upload it when it changed) */
    int btab_rows, btab_ok, btab_stride;
    int n_lbuckets;           /* decode graphs per batch bucket: table lengths 256, 512, ... up to max_pages */
    uint64_t *sig_seq;
    int *sig_gen, *sig_np;
    int max_pages;            /* pages of the longest request: max_context / page, and at most the pool's (set with it) */
    fl_request **rows;        /* [max_batch] this step's decode rows */
    fl_request **prows;       /* [max_batch] this step's prefill rows, */
    int *pc0, *pT;            /* ... their first slot and chunk length, */
    int32_t *plast;           /* ... and the index of their chunk's last token (fl_model.last_rows) */
    int null_page;            /* a page outside the pool: padding rows of a graph-replayed step write there */
    int32_t *h_next;          /* [max_batch] tokens chosen on the device (argmax_rows) */
    uint8_t *h_greedy;        /* [max_batch] row takes the device argmax */
    uint8_t *h_need;          /* [max_batch] row takes a token from this forward */
    int n_scratch;            /* sampling scratch (idx, mark) for this many threads */
    /* decode graphs (backends with graph_capture), one per batch bucket, valid while the backend's scratch_epoch
     * is the one they were captured at */
    int n_buckets;
    void **graph;
    uint64_t *graph_epoch;
    int probe_replays;        /* FASTLOAD_ENGINE_PROBE_REPLAYS (measurement only): extra back-to-back replays a step */
    /* Pipelined decode (la_*: backends with argmax_async, FASTLOAD_ENGINE_PIPELINE): when nothing else waits, a
     * decode step is launched before the tokens of the one before it are read, on that one's device tokens, so the
     * GPU does not wait for the host between steps (~50 us a step measured on an H200: benchmarks/step_gap.py). The
     * step in flight: its rows (a reference held on each), their count and its token slot. */
    int la_on, la_active, la_B, la_slot;
    fl_request **la_rows;
    int32_t *la_host[2];      /* host-memory backends (tests): the slots, filled by the engine's own argmax */
    struct { int B, stride; } cap; /* the step capture_fn records */
    fl_engine *reg_next;      /* every live engine, for fork() */
    /* beam search (driver only): KV page copies (src, dst pairs) the next forward makes first, under model_mu, and the
     * groups whose rows a step's forward gave logits to */
    int32_t *cp;
    int n_cp;
    struct fl_beams **bsel;
    int n_bsel;
};

/* Beam search (transformers 5's _beam_search, greedy): K = num_beams physical requests, the caller's (req[0], the
 * leader) and K - 1 followers made with it, admitted together (K rows of max_batch), never preempted. The leader reads
 * the prompt; its first logits are every beam's (transformers starts beams 1.. at -1e9: the same candidates). Each step
 * the beams are decode rows of the engine's batch like any request; their rows' logits become log-probabilities with
 * the request's rules applied (choose_tokens), and beam_select picks the candidates, keeps the finished hypotheses and
 * moves the beams: a beam that continues its own parent keeps its pages; another takes the parent's full pages shared
 * (the pool's reference counts) and a copy of its partly filled last page (a device copy before the next forward).
 * The logical order of the beams (best first) is transformers' order, which its ties and its early-stop test read. */
typedef struct fl_beams {
    int K, keep, n_ret, early;     /* num_beams; candidates a step, max(2, 1 + n_eos) * K; num_return; early_stopping */
    float lp;                      /* length_penalty */
    int maxlen, gmax;              /* transformers' max_length (prompt + new tokens, at most the context); new tokens */
    int ending;                    /* its beams are being finished (finish() of one ends them all, once) */
    int heur;                      /* transformers' is_early_stop_heuristic_unsatisfied */
    fl_request **req;              /* [K] physical beams */
    int *order;                    /* [K] logical beam j (best first) -> index into req */
    float *score;                  /* [K] running scores of the logical beams */
    float *fin_score;              /* [K] finished hypotheses (transformers' beam_scores), best first */
    uint8_t *fin_done;             /* [K] is_sent_finished */
    int *fin_len;                  /* [K] generated tokens of each */
    int32_t *fin_tok, *fin_tmp;    /* [K * gmax] their tokens, and the buffer the next set is built in */
    float *cv, *rl;                /* [keep] candidates' accumulated scores, running scores */
    float *fs;                     /* [K + keep] the kept hypotheses' scores, then the candidates' finished scores */
    int32_t *cb, *ct;              /* [keep] candidates' logical beam and token */
    uint8_t *hit;                  /* [keep] candidate ends its sequence (eos or max_length) */
    int *sel, *phys, *taken;       /* scratch: [K + keep], [K], [K] */
    float *tmp;                    /* [K] */
    /* transformers' beam_indices: for each running beam (logical order) and each finished hypothesis, the logical
     * beam its token of each step came from; [K * gmax] each, and the buffers the next sets are built in */
    int32_t *hist, *hist_tmp, *fin_hist, *fin_hist_tmp;
    float **sc;                    /* keep_scores: [gmax] steps of [K, vocab] processed log-probs (transformers' scores) */
    int n_sc;
    /* each logical beam's best `keep` accumulated scores of the step and their tokens (value order, ties by token),
     * found by choose_tokens for the beam's row (rows in parallel); beam_select merges them */
    float *bv;                     /* [K * keep] */
    int32_t *bt;                   /* [K * keep] */
    int *bn;                       /* [K] how many each holds (keep, fewer where NaNs are) */
} fl_beams;

/* fork(): the child has no driver thread, and a lock the parent's driver held would stay held there forever.
 * Around fork every engine's locks are taken (a step in flight finishes its forward first); the child then
 * finishes the parent's requests with an error (they stay the parent's: no driver runs in the child, and the
 * thread that forked may be waiting for one of its own, from a streamer's put say: it hung there when they were only
 * marked cancelled, hunt20) and knows no driver runs. Their condition variables are made anew first: no thread of
 * the child waits on them, but the parent's waiters are still counted in them. */
static void finish(fl_engine *e, fl_request *r, fl_status st, const char *msg);
static void req_cond_init(fl_request *r);
static void fork_finish(fl_engine *e, fl_request *r) {
    req_cond_init(r);
    finish(e, r, FL_E_INTERRUPTED, "the process forked while this request ran: it stays with the parent process "
                                   "(submit it again in the child)");
}
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static fl_engine *reg_head;
static pthread_once_t reg_once = PTHREAD_ONCE_INIT;
static void fork_prepare(void) {
    pthread_mutex_lock(&reg_mu);
    for (fl_engine *e = reg_head; e; e = e->reg_next) {
        pthread_mutex_lock(&e->model_mu);
        pthread_mutex_lock(&e->mu);
    }
}
static void fork_parent(void) {
    for (fl_engine *e = reg_head; e; e = e->reg_next) {
        pthread_mutex_unlock(&e->mu);
        pthread_mutex_unlock(&e->model_mu);
    }
    pthread_mutex_unlock(&reg_mu);
}
static void fork_child(void) {
    for (fl_engine *e = reg_head; e; e = e->reg_next) {
        while (e->wait_head) fork_finish(e, e->wait_head);
        while (e->fwd_head) fork_finish(e, e->fwd_head);
        while (e->n_run) fork_finish(e, e->run[0]);
        if (e->fwd_running) fork_finish(e, e->fwd_running); /* the parent's: its caller is not in the child */
        e->fwd_running = NULL;
        e->la_active = 0; /* a pipelined step in flight is the parent's (its rows' references are the child's leak) */
        e->driving = 0;
        pthread_mutex_unlock(&e->mu);
        pthread_mutex_unlock(&e->model_mu);
    }
    pthread_mutex_unlock(&reg_mu);
}
static void reg_init(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* ---- page pool ------------------------------------------------------------------------------ */
static uint64_t page_hash(int parent, const int32_t *t, int n) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)(uint32_t)parent;
    for (int i = 0; i < n; i++) { h ^= (uint32_t)t[i]; h *= 1099511628211ull; h ^= h >> 29; }
    return h;
}
static void lru_unlink(pool_t *P, int id) {
    const int a = P->lru_prev[id], b = P->lru_next[id];
    if (a >= 0) P->lru_next[a] = b; else P->lru_head = b;
    if (b >= 0) P->lru_prev[b] = a; else P->lru_tail = a;
    P->lru_prev[id] = P->lru_next[id] = -1;
    P->n_cached--;
}
static void table_remove(pool_t *P, int id) {
    int *pp = &P->bucket[P->hash[id] % (uint64_t)P->nb];
    while (*pp >= 0 && *pp != id) pp = &P->hnext[*pp];
    if (*pp == id) *pp = P->hnext[id];
    P->parent[id] = -2;
    P->gen[id]++; /* the pages entered after it (its children) no longer follow it: table_find skips them */
}
/* Pages some request holds: neither free nor kept only by the prefix table */
static int pages_used(const pool_t *P) { return P->n - P->n_free - P->n_cached; }
static void pool_note_use(pool_t *P) {
    const int used = pages_used(P);
    if (used > P->peak_used) P->peak_used = used;
}
/* A free page: never used or released, else the least recently released table page. -1: none. */
static int page_alloc(pool_t *P) {
    int id = -1;
    if (P->n_free) id = P->free_stack[--P->n_free];
    else if (P->lru_head >= 0) {
        id = P->lru_head;
        lru_unlink(P, id);
        table_remove(P, id);
    }
    if (id >= 0) {
        P->ref[id] = 1;
        pool_note_use(P);
    }
    return id;
}
static void page_take(pool_t *P, int id) {
    if (P->ref[id]++ == 0) {
        lru_unlink(P, id);
        pool_note_use(P);
    }
}
static void page_release(pool_t *P, int id) {
    if (--P->ref[id] > 0) return;
    if (P->parent[id] != -2) { /* keep it findable, reusable last */
        P->lru_prev[id] = P->lru_tail;
        P->lru_next[id] = -1;
        if (P->lru_tail >= 0) P->lru_next[P->lru_tail] = id; else P->lru_head = id;
        P->lru_tail = id;
        P->n_cached++;
    } else {
        P->free_stack[P->n_free++] = id;
    }
}
static int table_find(pool_t *P, int parent, const int32_t *t) {
    const uint64_t h = page_hash(parent, t, P->page);
    for (int id = P->bucket[h % (uint64_t)P->nb]; id >= 0; id = P->hnext[id])
        if (P->hash[id] == h && P->parent[id] == parent && (parent < 0 || P->pgen[id] == P->gen[parent]) &&
            !memcmp(P->ptok + (size_t)id * P->page, t, (size_t)P->page * 4))
            return id;
    return -1;
}
/* Enter page id (held, full of tokens t after `parent`); 0 if an equal page is already there. */
static int table_insert(pool_t *P, int id, int parent, const int32_t *t) {
    if (table_find(P, parent, t) >= 0) return 0;
    const uint64_t h = page_hash(parent, t, P->page);
    P->hash[id] = h;
    P->parent[id] = parent;
    P->pgen[id] = parent >= 0 ? P->gen[parent] : 0;
    memcpy(P->ptok + (size_t)id * P->page, t, (size_t)P->page * 4);
    P->hnext[id] = P->bucket[h % (uint64_t)P->nb];
    P->bucket[h % (uint64_t)P->nb] = id;
    return 1;
}
static int pool_init(pool_t *P, int n, int shift) {
    memset(P, 0, sizeof *P);
    P->n = n; P->shift = shift; P->page = 1 << shift; P->nb = 2 * n + 1;
    P->ref = calloc((size_t)n, sizeof(int));
    P->free_stack = malloc((size_t)n * sizeof(int));
    P->parent = malloc((size_t)n * sizeof(int));
    P->gen = calloc((size_t)n, sizeof(uint32_t));
    P->pgen = calloc((size_t)n, sizeof(uint32_t));
    P->ptok = malloc((size_t)n * (size_t)P->page * 4);
    P->bucket = malloc((size_t)P->nb * sizeof(int));
    P->hnext = malloc((size_t)n * sizeof(int));
    P->hash = calloc((size_t)n, sizeof(uint64_t));
    P->lru_prev = malloc((size_t)n * sizeof(int));
    P->lru_next = malloc((size_t)n * sizeof(int));
    if (!P->ref || !P->free_stack || !P->parent || !P->gen || !P->pgen || !P->ptok || !P->bucket || !P->hnext || !P->hash || !P->lru_prev || !P->lru_next)
        return -1;
    for (int i = 0; i < n; i++) {
        P->free_stack[i] = n - 1 - i; /* page 0 first */
        P->parent[i] = -2;
        P->lru_prev[i] = P->lru_next[i] = -1;
    }
    for (int i = 0; i < P->nb; i++) P->bucket[i] = -1;
    P->n_free = n;
    P->lru_head = P->lru_tail = -1;
    return 0;
}
static void pool_free(pool_t *P) {
    free(P->ref); free(P->free_stack); free(P->parent); free(P->gen); free(P->pgen); free(P->ptok); free(P->bucket); free(P->hnext);
    free(P->hash); free(P->lru_prev); free(P->lru_next);
}
static int pages_available(const pool_t *P) { return P->n_free + P->n_cached; }

/* ---- requests --------------------------------------------------------------------------------- */
/* A request's condition variable waits on CLOCK_MONOTONIC where the platform allows (Linux does): a wall-clock step
 * (NTP, a VM resuming) then neither cuts a wait short nor stretches it. r->clk is the clock its deadlines use. */
static void req_cond_init(fl_request *r) {
    pthread_condattr_t a;
    r->clk = CLOCK_REALTIME;
    if (pthread_condattr_init(&a) == 0) {
        if (pthread_condattr_setclock(&a, CLOCK_MONOTONIC) == 0) r->clk = CLOCK_MONOTONIC;
        pthread_cond_init(&r->cv, &a);
        pthread_condattr_destroy(&a);
    } else
        pthread_cond_init(&r->cv, NULL);
}

static void beams_free(fl_beams *g) {
    if (!g) return;
    free(g->req); free(g->order); free(g->score); free(g->fin_score); free(g->fin_done); free(g->fin_len);
    free(g->fin_tok); free(g->fin_tmp); free(g->cv); free(g->rl); free(g->fs); free(g->cb); free(g->ct); free(g->hit);
    free(g->sel); free(g->phys); free(g->taken); free(g->tmp);
    free(g->hist); free(g->hist_tmp); free(g->fin_hist); free(g->fin_hist_tmp);
    free(g->bv); free(g->bt); free(g->bn);
    for (int i = 0; i < g->n_sc; i++) free(g->sc[i]);
    free(g->sc);
    free(g);
}
static void req_unref(fl_request *r) { /* under mu */
    if (--r->refs) return;
    if (r->bm && r->bm->req[0] == r) beams_free(r->bm); /* the leader owns its group (followers end before it) */
    pthread_cond_destroy(&r->cv);
    free(r->toks);
    free(r->pages);
    free(r->fbuf);
    for (int i = 0; i < r->rec_nblk; i++) free(r->rec[i]);
    free(r->rec);
    free(r->gen_mem);
    free(r);
}
static void release_pages(fl_engine *e, fl_request *r) { /* under mu */
    for (int i = 0; i < r->n_pages; i++) page_release(&e->pool, r->pages[i]);
    r->pgen++;
    r->n_pages = r->n_reg = 0;
    r->n_cached = 0;
}
static void run_remove(fl_engine *e, fl_request *r) {
    for (int i = 0; i < e->n_run; i++)
        if (e->run[i] == r) {
            memmove(e->run + i, e->run + i + 1, (size_t)(e->n_run - i - 1) * sizeof *e->run);
            e->n_run--;
            return;
        }
}
/* Finish r (running or waiting) with status st; frees its pages, wakes its waiters. Under mu. */
static void finish(fl_engine *e, fl_request *r, fl_status st, const char *msg) {
    if (r->state == RQ_DONE) return;
    fl_beams *g = r->bm;
    if (g && !g->ending) { /* one beam ends: they all do, the followers first, the leader (which owns g) last */
        g->ending = 1;
        fl_request *lead = g->req[0];
        for (int k = 1; k < g->K; k++)
            if (g->req[k] && g->req[k] != r) finish(e, g->req[k], st, msg);
        if (r != lead) {
            finish(e, r, st, msg);
            finish(e, lead, st, msg);
            return;
        }
    }
    if (r->state == RQ_WAITING) {
        const int fwd = r->kind == RQ_KIND_FORWARD;
        fl_request **pp = fwd ? &e->fwd_head : &e->wait_head, *prev = NULL;
        while (*pp && *pp != r) { prev = *pp; pp = &(*pp)->next; }
        if (*pp) {
            *pp = r->next;
            if (fwd) {
                if (e->fwd_tail == r) e->fwd_tail = prev;
                e->n_fwd_waiting--;
            } else {
                if (e->wait_tail == r) e->wait_tail = prev;
                e->n_waiting--;
            }
        }
    } else if (r->state != RQ_FORWARD) { /* a running forward is in no list: the step that runs it finishes it */
        run_remove(e, r);
    }
    release_pages(e, r);
    r->state = RQ_DONE;
    r->st = st;
    if (st != FL_OK) snprintf(r->err, sizeof r->err, "%s", msg ? msg : "error");
    pthread_cond_broadcast(&r->cv);
    req_unref(r); /* the engine's reference */
}
/* Back to the head of the queue, to be read again (prompt + output so far). Under mu. */
static void preempt(fl_engine *e, fl_request *r) {
    run_remove(e, r);
    release_pages(e, r);
    r->state = RQ_WAITING;
    r->next = e->wait_head;
    e->wait_head = r;
    if (!e->wait_tail) e->wait_tail = r;
    e->n_waiting++;
    e->st.preemptions++;
}

/* Where a request in RQ_PREFILL stops reading tokens as a prompt: its prompt, or, read again after a preemption with
 * preempt_recompute, its prompt and the tokens it had generated. In replay mode (the default) the generated tokens
 * are then fed one a decode step (their tokens known: nothing is sampled or taken until the last one is in the cache),
 * so their keys and values are computed by the decode kernels that computed them the first time: the same bits, and
 * the request goes on as if it had never been preempted. */
static int read_end(const fl_engine *e, const fl_request *r) {
    return r->n_prompt + (e->cfg.preempt_recompute ? r->n_out : 0);
}
/* A decode row whose input token is not the last one (a preempted request feeding its generated tokens again). */
static int replaying(const fl_request *r) { return r->n_cached + 1 < r->n_prompt + r->n_out; }

static void beams_reset(fl_beams *g);
/* A beam search back to the head of the queue, to start again from its prompt (beam search is deterministic: it
 * gives the same answer; its beams' sequences could not be read again one by one). Under mu. */
static void beams_restart(fl_engine *e, fl_beams *g) {
    fl_request *lead = g->req[0];
    for (int k = 0; k < g->K; k++) {
        fl_request *x = g->req[k];
        run_remove(e, x);
        release_pages(e, x);
        x->n_out = 0;
        x->state = k ? RQ_BEAM_IDLE : RQ_WAITING;
    }
    lead->hit1 = 0;
    lead->next = e->wait_head;
    e->wait_head = lead;
    if (!e->wait_tail) e->wait_tail = lead;
    e->n_waiting++;
    e->st.preemptions++;
    beams_reset(g);
}

/* Page for r when the pool is dry: the newest holder of pages other than r (an ordinary request, or a beam search as a
 * whole, not r's own) yields when it is newer than r: an ordinary request is preempted, a beam search starts again
 * from its prompt (beams_restart). Else r yields itself (r's whole search, for a beam). Returns 1 when a page may now
 * be free, 0 when r yielded, -1 when nobody else holds pages (r alone cannot fit). */
static int make_room(fl_engine *e, fl_request *r) {
    fl_request *victim = NULL;
    for (int i = 0; i < e->n_run; i++) {
        fl_request *x = e->run[i];
        if (x == r || x->n_pages == 0 || (r->bm && x->bm == r->bm)) continue;
        if (!victim || x->seq > victim->seq) victim = x;
    }
    if (!victim) return -1;
    if (victim->seq > r->seq) {
        if (victim->bm) beams_restart(e, victim->bm);
        else preempt(e, victim);
        return 1;
    }
    if (r->bm) beams_restart(e, r->bm);
    else preempt(e, r);
    return 0;
}

/* A page for slot `slot` of r (held pages cover [0, n_pages * page)); when the pool is dry, make_room. Returns 0 with
 * the page held, -1 if r was preempted, -2 if r alone cannot fit (the caller fails it). Under mu. */
static int ensure_page(fl_engine *e, fl_request *r, int slot) {
    pool_t *P = &e->pool;
    while ((slot >> P->shift) >= r->n_pages) {
        const int id = page_alloc(P);
        if (id >= 0) { r->pages[r->n_pages++] = id; continue; }
        const int rc = make_room(e, r);
        if (rc == 0) return -1;
        if (rc < 0) return -2;
    }
    return 0;
}

/* ---- one step ----------------------------------------------------------------------------------- */
/* Batch buckets of graph-replayed decode steps: 1, 2, 4, 8, then multiples of 8. */
static int bucket_of(int B) { return B <= 1 ? 0 : B <= 2 ? 1 : B <= 4 ? 2 : 2 + (B + 7) / 8; }
static int bucket_rows(int k) { return k < 3 ? 1 << k : 8 * (k - 2); }

static fl_status capture_fn(void *ud) {
    fl_engine *e = ud;
    fl_model *m = e->m;
    fl_kvcache kv = e->kv;
    kv.max_len = e->cap.stride << e->pool.shift;
    const int rows = e->cap.B;
    int32_t *in = e->d_in;
    fl_step s;
    memset(&s, 0, sizeof s);
    s.batch = rows; s.n_new = 1; s.pos_d = in + rows;
    s.pg.starts_d = in + 2 * rows; s.pg.btab_d = e->d_btab; s.pg.btab_stride = e->cap.stride; s.pg.page_shift = e->pool.shift;
    return fl_forward_core(m, &kv, &s, in, 0);
}

/* The block table of this step's rows rq[0:B] (their pages, the null page past them and in padding rows up to
 * `rows`), `stride` entries a row, into the backend. A graph-replayed decode step (graph != 0, stride = max_pages)
 * skips it when the device already holds exactly this (same requests, same pages: the usual step, which adds a page
 * to a row only every page_tokens tokens). */
static fl_status put_btab(fl_engine *e, fl_request **rq, int B, int rows, int stride, int graph, const int32_t **btab_d) {
    fl_backend *be = e->m->be;
    *btab_d = be->host_memory ? e->h_btab : e->d_btab;
    if (graph && e->btab_ok && e->btab_rows == rows && e->btab_stride == stride) {
        int same = 1;
        for (int b = 0; b < B && same; b++)
            same = e->sig_seq[b] == rq[b]->seq && e->sig_gen[b] == rq[b]->pgen && e->sig_np[b] == rq[b]->n_pages;
        for (int b = B; b < rows && same; b++) same = e->sig_np[b] == -1;
        if (same) return FL_OK;
    }
    for (int b = 0; b < rows; b++) {
        int32_t *row = e->h_btab + (size_t)b * stride;
        const int np = b < B ? rq[b]->n_pages : 0;
        if (np) memcpy(row, rq[b]->pages, (size_t)np * 4);
        for (int j = np; j < stride; j++) row[j] = e->null_page;
        e->sig_seq[b] = b < B ? rq[b]->seq : 0;
        e->sig_gen[b] = b < B ? rq[b]->pgen : 0;
        e->sig_np[b] = b < B ? np : -1;
    }
    e->btab_ok = graph;
    e->btab_rows = rows;
    e->btab_stride = stride;
    if (be->host_memory) return FL_OK;
    return be->to_backend(be, e->d_btab, e->h_btab, (size_t)rows * stride * 4);
}

/* Forward the rows rq[0:B], T tokens each (host arrays h_tok / h_pos [B*T], h_starts [B]), leaving each row's last
 * logits in the workspace; then the rows' next tokens: h_next[b] from the device argmax where h_greedy[b] (and the
 * backend has one), the float logits of the others in e->logits. Under model_mu, not mu.
 * Decode steps (T = 1) on a backend with graphs run with a fixed table stride, padded to a batch bucket (padding
 * rows write the null page), eagerly the first time for a bucket and replayed after. Tokens, positions and starts
 * go to the backend in one copy; the block table only when it changed. */
static fl_status engine_launch(fl_engine *e, fl_request **rq, int B, int T, int feed);
static fl_status beam_page_copies(fl_engine *e);

static fl_status engine_forward(fl_engine *e, fl_request **rq, int B, int T) {
    FL_TRY(engine_launch(e, rq, B, T, -1));
    fl_model *m = e->m;
    fl_backend *be = m->be;
    const int V = m->cfg.vocab;
    const size_t es = (size_t)fl_dtype_size(be->act);
    int any_greedy = 0;
    for (int b = 0; b < B; b++) any_greedy |= e->h_greedy[b];
    if (be->argmax_rows && any_greedy) FL_TRY(be->argmax_rows(be, e->h_next, m->ws_logits, B, V));
    for (int b = 0; b < B; b++)
        if (!be->argmax_rows || !e->h_greedy[b])
            FL_TRY(be->logits_to_host(be, e->logits + (size_t)b * V, (const char *)m->ws_logits + (size_t)b * V * es, 1, V));
    return be->sync(be);
}

/* engine_forward up to the forward itself, nothing waited for. feed >= 0 (decode, pipelined): the rows' input
 * tokens are token slot `feed`'s, on the device (the step before, not read yet), not h_tok. */
static fl_status engine_launch(fl_engine *e, fl_request **rq, int B, int T, int feed) {
    fl_model *m = e->m;
    fl_backend *be = m->be;
    const int shift = e->pool.shift;
    FL_TRY(beam_page_copies(e));
    int rows = B, k = -1, stride = 1;
    for (int b = 0; b < B; b++) { /* pages that cover every slot written, padding included */
        const int need = (e->h_starts[b] + T + (1 << shift) - 1) >> shift;
        if (need > stride) stride = need;
    }
    if (T == 1 && be->graph_capture) {
        /* a graph per batch bucket and length bucket: the table describes 256 << lb slots, the smallest such
         * length that holds every row (the attention grid is sized by it: not by the longest context the model
         * allows, whose splits would mostly launch to exit) */
        int lb = 0;
        while ((256 << lb) < (stride << shift) && lb + 1 < e->n_lbuckets) lb++;
        stride = ((256 << lb) + (1 << shift) - 1) >> shift;
        if (stride > e->max_pages) stride = e->max_pages;
        rows = bucket_rows(bucket_of(B));
        if (rows > e->cfg.max_batch) rows = e->cfg.max_batch;
        k = bucket_of(B) * e->n_lbuckets + lb;
    }
    const int n = rows * T;
    if (2 * n + 2 * rows > e->in_cap) return fl_err(FL_E_INTERNAL, "engine: step of %d x %d tokens exceeds its buffers", rows, T);
    int32_t *in = e->h_in;
    memcpy(in, feed >= 0 && be->host_memory ? e->la_host[feed] : e->h_tok, (size_t)B * T * 4);
    memcpy(in + n, e->h_pos, (size_t)B * T * 4);
    memcpy(in + 2 * n, e->h_starts, (size_t)B * 4);
    for (int i = B * T; i < n; i++) in[i] = in[n + i] = 0; /* padding rows: token 0 at slot 0 of the null page */
    for (int b = B; b < rows; b++) in[2 * n + b] = 0;
    /* dynamic NTK rope, prefill: a row's rope length is its whole prompt (+ the tokens it had generated, when it was
     * preempted in recompute mode), the same for every chunk, as transformers reads a prompt in one forward; decode
     * steps (a replayed token's too) leave it to
     * the token's position + 1 (dyn.len_d NULL) */
    const int dyn_len = T > 1 && m->cfg.rope_type == FL_ROPE_DYNAMIC;
    for (int b = 0; dyn_len && b < rows; b++) in[2 * n + rows + b] = b < B ? read_end(e, rq[b]) : 0;
    FL_TRY(fl_model_reserve(m, n, rows));
    const int32_t *in_d = be->host_memory ? e->h_in : e->d_in, *btab_d = NULL;
    if (!be->host_memory) FL_TRY(be->to_backend(be, e->d_in, in, (size_t)(2 * n + (dyn_len ? 2 : 1) * rows) * 4));
    if (feed >= 0 && !be->host_memory) FL_TRY(be->argmax_feed(be, e->d_in, feed, B));
    FL_TRY(put_btab(e, rq, B, rows, stride, k >= 0, &btab_d));
    if (k >= 0 && e->graph[k] && e->graph_epoch[k] == be->scratch_epoch) {
        FL_TRY(be->graph_replay(be, e->graph[k]));
        /* measurement: the same step again, queued right behind (same inputs: the same K / V and logits written).
         * The step time grows by the GPU's time for one step alone, with no host work between
         * (benchmarks/step_gap.py: what a decode step waits for besides its graph) */
        for (int i = 0; i < e->probe_replays; i++) FL_TRY(be->graph_replay(be, e->graph[k]));
    } else {
        fl_kvcache kv = e->kv;
        kv.max_len = stride << e->pool.shift; /* the longest row this block table describes */
        fl_step s;
        memset(&s, 0, sizeof s);
        s.batch = rows; s.n_new = T; s.pos_d = in_d + n;
        s.pg.starts_d = in_d + 2 * n; s.pg.btab_d = btab_d; s.pg.btab_stride = stride; s.pg.page_shift = e->pool.shift;
        if (dyn_len) s.dyn.len_d = in_d + 2 * n + rows;
        FL_TRY(fl_forward_core(m, &kv, &s, in_d, 0));
        if (k >= 0) { /* record this bucket's step for the next time (the eager run grew every buffer it needs) */
            if (e->graph[k]) be->graph_free(be, e->graph[k]);
            e->graph[k] = NULL;
            e->cap.B = rows;
            e->cap.stride = stride;
            const uint64_t epoch = be->scratch_epoch;
            if (be->graph_capture(be, capture_fn, e, &e->graph[k]) == FL_OK) e->graph_epoch[k] = epoch;
            else { e->graph[k] = NULL; fl_err_clear(); } /* not capturable: this bucket stays eager */
        }
    }
    return FL_OK;
}

/* A row whose next token is the plain argmax: greedy, no bias or penalty, no eos id masked (min_new_tokens reached,
 * or no eos ids at all), nothing kept of its tokens (a kept row needs its logits on the host). */
static int plain_greedy(const fl_request *r) {
    const fl_gen_params *p = &r->p;
    return !r->bm && !p->do_sample && !r->rec_row && (p->repetition_penalty == 1.0f || p->repetition_penalty <= 0) &&
           !p->n_bias && p->presence_penalty == 0 && p->frequency_penalty == 0 && !p->no_repeat_ngram_size &&
           !(p->n_begin_ban && r->n_out == 0) &&
           /* + 2: a pipelined step chained now computes token n_out + 1, which must not be the forced last one */
           !(p->n_forced_eos && r->n_out + 2 >= p->max_new_tokens) &&
           (r->n_out >= p->min_new_tokens || p->n_eos == 0);
}

static void apply_rules(const fl_request *r, float *lg, int V, uint8_t *mark);
static void beam_row_candidates(fl_beams *g, int phys, const float *lp, int V);
static void log_softmax_row(float *x, int V);

#define TOK_NO_RECORD (-2) /* choose_tokens: the block for the token's kept row could not be allocated */

/* The row kept for r's token i (its block allocated on first use), or NULL when it cannot be had. Driver only. */
static float *rec_at(fl_request *r, int i) {
    const int b = i / r->rec_blk;
    if (i < 0 || b >= r->rec_nblk) return NULL;
    if (!r->rec[b]) r->rec[b] = malloc((size_t)r->rec_blk * (size_t)r->rec_row * sizeof(float));
    return r->rec[b] ? r->rec[b] + (size_t)(i % r->rec_blk) * (size_t)r->rec_row : NULL;
}

/* Row b's next token into h_next[b] from its logits row (repetition penalty, eos masked below min_new_tokens, then
 * the request's own sampler and random stream); rows with the device argmax have theirs already. Rows run in
 * parallel (a sampled row of a 152k vocabulary is ~0.5 ms of host work). The driver alone touches a running
 * request's tokens and random state, so this needs no lock. */
static void choose_tokens(fl_engine *e, fl_request **rq, int B) {
    const int V = e->m->cfg.vocab;
    int n = 0;
    for (int b = 0; b < B; b++) n += e->h_need[b] && !(e->m->be->argmax_rows && e->h_greedy[b]);
    if (!n) return;
#ifdef _OPENMP
    const int tn = fl_backend_threads_now(e->m->be); /* the CPU backend's count now (fewer while other processes hold cores) */
    int nt = n < e->n_scratch ? n : e->n_scratch;
    if (tn > 0 && nt > tn) nt = tn;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
#endif
    for (int b = 0; b < B; b++) {
        if (!e->h_need[b] || (e->m->be->argmax_rows && e->h_greedy[b])) continue;
#ifdef _OPENMP
        const int t = omp_get_thread_num();
#else
        const int t = 0;
#endif
        fl_request *r = rq[b];
        const fl_gen_params *p = &r->p;
        float *lg = e->logits + (size_t)b * V, *rec = NULL, *raw = NULL;
        int32_t *idx = e->idx + (size_t)t * V;
        if (r->rec_row) { /* the row kept for this token; the logits as they came, before the rules below change them */
            rec = rec_at(r, r->n_out);
            if (!rec) { e->h_next[b] = TOK_NO_RECORD; continue; }
            raw = e->raw + (size_t)t * V;
            memcpy(raw, lg, (size_t)V * sizeof *lg);
        }
        uint8_t *mark = e->mark + (size_t)t * V;
        if (r->bm) { /* a beam: its row becomes log-probabilities, then the rules below (transformers' order) */
            log_softmax_row(lg, V);
            apply_rules(r, lg, V, mark);
            beam_row_candidates(r->bm, r->beam_i, lg, V);
            e->h_next[b] = 0;
            continue;
        }
        apply_rules(r, lg, V, mark);
        const int32_t tok = e->h_next[b] = fl_sample(lg, V, p, &r->rng, idx, rec && p->keep_scores ? rec : NULL);
        if (!rec || tok < 0) continue;
        rec += p->keep_scores ? V : 0;
        if (p->keep_logits) memcpy(rec, raw, (size_t)V * sizeof *raw);
        rec += p->keep_logits ? V : 0;
        if (p->keep_logprob && fl_token_logprobs(raw, V, tok, p->top_logprobs, idx, rec) < 0) e->h_next[b] = -1;
    }
}

/* The request's rules on row lg of its next token's logits (in place): sequence biases, the repetition, presence and
 * frequency penalties, no-repeat n-grams, eos masked below min_new_tokens, forced eos, begin bans. */
static void apply_rules(const fl_request *r, float *lg, int V, uint8_t *mark) {
    const fl_gen_params *p = &r->p;
    const int len = r->n_prompt + r->n_out;
    for (int i = 0; i < p->n_bias; i++) { /* a sequence's last token, when the ones before it end the text */
        const int32_t *q = p->bias_toks + p->bias_off[i];
        const int m = p->bias_off[i + 1] - p->bias_off[i] - 1;
        if (m <= len && !memcmp(r->toks + len - m, q, (size_t)m * sizeof *q)) lg[q[m]] += p->bias[i];
    }
    if (p->repetition_penalty != 1.0f && p->repetition_penalty > 0)
        fl_repetition_penalty(lg, V, r->toks, len, p->repetition_penalty, mark);
    if (p->presence_penalty != 0 || p->frequency_penalty != 0)
        fl_count_penalty(lg, V, r->toks + r->n_prompt, r->n_out, p->presence_penalty, p->frequency_penalty, mark);
    if (p->no_repeat_ngram_size > 0) fl_no_repeat_ngram(lg, r->toks, len, p->no_repeat_ngram_size);
    if (r->n_out < p->min_new_tokens)
        for (int i = 0; i < p->n_eos; i++) if (p->eos[i] >= 0 && p->eos[i] < V) lg[p->eos[i]] = -INFINITY;
    if (p->n_forced_eos && r->n_out + 1 >= p->max_new_tokens) { /* the last token: an eos (wins over the above) */
        for (int i = 0; i < V; i++) lg[i] = -INFINITY;
        for (int i = 0; i < p->n_forced_eos; i++) lg[p->forced_eos[i]] = 0;
    }
    if (r->n_out == 0)
        for (int i = 0; i < p->n_begin_ban; i++) lg[p->begin_ban[i]] = -INFINITY;
}

/* x = log softmax(x) in place, as torch's: (x - max) - log(sum(exp(x - max))) (float32 exps, fl_exp.h's vectorised
 * polynomial within 2 ulp, summed in double) */
static void log_softmax_row(float *x, int V) {
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += (double)fl_exp_nonpos(x[i] - mx);
    const float ls = (float)log(sum);
    for (int i = 0; i < V; i++) x[i] = (x[i] - mx) - ls;
}

/* Append tok (chose_tokens' or the device argmax's) to r; finish r if it is done. Under mu. */
static void take_token(fl_engine *e, fl_request *r, int32_t tok) {
    const fl_gen_params *p = &r->p;
    const int n_total = r->n_prompt + r->n_out;
    if (tok == TOK_NO_RECORD) {
        char msg[160];
        snprintf(msg, sizeof msg, "generate: cannot allocate memory to keep this request's scores / logits / logprobs "
                 "(%d floats a token)", r->rec_row);
        finish(e, r, FL_E_NOMEM, msg);
        return;
    }
    if (tok < 0) { finish(e, r, FL_E_NOMEM, "generate: cannot allocate sampling scratch"); return; }
    r->toks[n_total] = tok;
    r->n_out++;
    int stop = r->n_out >= p->max_new_tokens || n_total + 1 >= e->cfg.max_context;
    for (int i = 0; i < p->n_eos; i++) stop |= tok == p->eos[i];
    /* Only a waiter that wants this token is woken (finish always wakes them): a caller waiting for the end of its
     * request used to be woken by every token, and each wake took mu back from the driver between two decode
     * steps while the GPU waited. */
    if (r->n_out >= r->wake_at) {
        r->wake_at = INT_MAX;
        pthread_cond_broadcast(&r->cv);
    }
    if (stop) finish(e, r, FL_OK, NULL);
}

/* ---- beam search (fl_beams, above) --------------------------------------------------------------- */
/* (a, x) into the best-first list v / id of c entries and capacity k, after the entries of equal value: the new count,
 * or -1 when a is not among the best k (NaN never is). The top-k of beam search's candidate lists. */
static int topk_push(float *v, int32_t *id, int c, int k, float a, int32_t x) {
    if (c == k && !(a > v[k - 1])) return -1;
    int i = c < k ? c++ : k - 1;
    while (i > 0 && a > v[i - 1]) { v[i] = v[i - 1]; id[i] = id[i - 1]; i--; }
    v[i] = a;
    id[i] = x;
    return c;
}

/* For each logical beam j whose sequence is physical beam `phys` (one; every j at the first step, when the leader's
 * row stands for all): the best `keep` of lp[v] + score[j], in value order with ties by token (the order of
 * transformers' flat top-k over beam * vocab + token, which beam_select keeps when it merges the beams in j order).
 * Runs in choose_tokens' parallel rows: each j's lists are written by its own row only. */
static void beam_row_candidates(fl_beams *g, int phys, const float *lp, int V) {
    const int keep = g->keep;
    for (int j = 0; j < g->K; j++) {
        if (g->order[j] != phys) continue;
        float *cv = g->bv + (size_t)j * keep;
        int32_t *ct = g->bt + (size_t)j * keep;
        const float sc = g->score[j];
        int c = 0;
        for (int v = 0; v < V; v++) {
            const int n = topk_push(cv, ct, c, keep, lp[v] + sc, v);
            if (n >= 0) c = n;
        }
        g->bn[j] = c;
    }
}

/* A page for a beam's copy of its parent's last page: a free one, else one a newer holder gives back (make_room).
 * -1: r's search was restarted instead (it is the newest holder); -2: nobody else holds pages. */
static int beam_page(fl_engine *e, fl_request *r) {
    for (;;) {
        const int id = page_alloc(&e->pool);
        if (id >= 0) return id;
        const int rc = make_room(e, r);
        if (rc <= 0) return rc == 0 ? -1 : -2;
    }
}

/* dst (a beam whose sequence was dropped) becomes a copy of src: its generated tokens, src's full pages shared, and
 * a page of its own for src's partly filled last one, copied on the device before the next forward. 0, or beam_page's
 * -1 (the search was restarted) / -2 (no page can be had). Under mu. */
static int beam_copy(fl_engine *e, fl_request *dst, const fl_request *src) {
    pool_t *P = &e->pool;
    for (int i = 0; i < dst->n_pages; i++) page_release(P, dst->pages[i]);
    dst->pgen++; /* the device block table may describe the old pages */
    memcpy(dst->toks + dst->n_prompt, src->toks + src->n_prompt, (size_t)src->n_out * 4);
    dst->n_out = src->n_out;
    dst->n_cached = src->n_cached;
    const int full = src->n_cached >> P->shift;
    for (int i = 0; i < full; i++) {
        page_take(P, src->pages[i]);
        dst->pages[i] = src->pages[i];
    }
    dst->n_pages = full;
    dst->n_reg = src->n_reg < full ? src->n_reg : full;
    dst->state = RQ_DECODE;
    if (!(src->n_cached & (P->page - 1))) return 0;
    const int id = beam_page(e, dst);
    if (id < 0) return id;
    dst->pages[dst->n_pages++] = id;
    e->cp[2 * e->n_cp] = src->pages[full];
    e->cp[2 * e->n_cp + 1] = id;
    e->n_cp++;
    return 0;
}

/* The page copies beam_copy asked for, before the forward that reads them (under model_mu; the driver alone fills
 * e->cp). A copy whose beams ended meanwhile writes a page nobody reads before it is written again. */
static fl_status beam_page_copies(fl_engine *e) {
    if (!e->n_cp) return FL_OK;
    fl_backend *be = e->m->be;
    const fl_kvcache *kv = &e->kv;
    const size_t es = (size_t)fl_dtype_size(kv->dtype);
    const size_t n = ((size_t)1 << kv->page_shift) * (size_t)kv->n_kv_heads * (size_t)kv->head_dim;
    fl_status st = FL_OK;
    for (int i = 0; i < e->n_cp && st == FL_OK; i++) {
        const size_t so = (size_t)e->cp[2 * i] * n * es, dof = (size_t)e->cp[2 * i + 1] * n * es;
        for (int l = 0; l < kv->n_layers && st == FL_OK; l++)
            for (int h = 0; h < 2 && st == FL_OK; h++) {
                char *base = h ? kv->v_d[l] : kv->k_d[l];
                if (be->host_memory) memcpy(base + dof, base + so, n * es);
                else st = be->convert_d(be, base + dof, kv->dtype, base + so, kv->dtype, n);
            }
    }
    e->n_cp = 0;
    return st;
}

/* The indices of the best k of a[i] (i < n) in out, sorted by value, ties in index order (the first one first); returns
 * how many there are (< k when n is smaller, or where NaNs are). Used for transformers' torch.topk calls,
 * whose order for equal values is not specified (equal float scores are rare outside -inf ones). */
static int topk_idx(const float *a, int n, int k, int *out) {
    int c = 0;
    for (int i = 0; i < n; i++) {
        if (c == k && !(a[i] > a[out[k - 1]])) continue;
        int j = c < k ? c++ : k - 1;
        while (j > 0 && a[i] > a[out[j - 1]]) { out[j] = out[j - 1]; j--; }
        out[j] = i;
    }
    return c;
}

/* One step of transformers' beam search for group g, whose beams' rows of e->logits hold their processed
 * log-probabilities (the leader's alone at the first step, standing for every beam). Finishes the group when the
 * search ends (or with an error); else moves its beams to their new sequences. Under mu, driver only. */
static void beam_select(fl_engine *e, fl_beams *g) {
    const int V = e->m->cfg.vocab, K = g->K, keep = g->keep;
    fl_request *lead = g->req[0];
    const int n_prompt = lead->n_prompt, n_out = lead->n_out, cur = n_prompt + n_out;
    if (g->sc && g->n_sc < g->gmax) { /* transformers' scores: this step's processed log-probs, logical beam order */
        float *row = malloc((size_t)K * (size_t)V * sizeof(float));
        if (!row) {
            finish(e, lead, FL_E_NOMEM, "beam search: cannot allocate memory to keep its scores");
            return;
        }
        for (int j = 0; j < K; j++)
            memcpy(row + (size_t)j * V, e->logits + (size_t)g->req[g->order[j]]->beam_row * V, (size_t)V * sizeof(float));
        g->sc[g->n_sc++] = row;
    }
    /* b. accumulated log-probs of every (logical beam, token); c. the top `keep` of them: each beam's best `keep`
     * (beam_row_candidates) merged in beam order, so equal values keep transformers' flat order */
    int c = 0;
    for (int j = 0; j < K; j++)
        for (int t = 0; t < g->bn[j]; t++) { /* cb holds the candidate's place in bv / bt until the merge is done */
            const int n = topk_push(g->cv, g->cb, c, keep, g->bv[(size_t)j * keep + t], j * keep + t);
            if (n < 0) break; /* the beam's next ones are no larger */
            c = n;
        }
    for (int i = 0; i < c; i++) {
        g->ct[i] = g->bt[g->cb[i]];
        g->cb[i] /= keep;
    }
    if (c < keep) { /* NaN log-probabilities: fewer candidates than transformers' torch.topk would return */
        finish(e, lead, FL_E_VALUE, "beam search: the model's log-probabilities are NaN");
        return;
    }
    /* d. candidates that end their sequence: an eos, or transformers' max_length reached */
    int all_hit = 1;
    for (int i = 0; i < keep; i++) {
        int h = cur + 1 >= g->maxlen;
        for (int q = 0; q < lead->p.n_eos && !h; q++) h = g->ct[i] == lead->p.eos[q];
        g->hit[i] = (uint8_t)h;
        all_hit &= h;
    }
    /* e. the running beams of the next step: the best K that did not end */
    for (int i = 0; i < keep; i++) g->rl[i] = g->cv[i] + (g->hit[i] ? -1.0e9f : -0.0f);
    int *nj = g->sel;
    topk_idx(g->rl, keep, K, nj);
    /* f. finished hypotheses: the candidates among the top K that ended, scored with the length penalty, merged with
     * the ones kept so far (the best K of both, those first at equal scores) */
    int all_done = 1;
    for (int k = 0; k < K; k++) all_done &= g->fin_done[k];
    const float den = (float)pow((double)(cur + 1 - n_prompt), (double)g->lp);
    for (int i = 0; i < keep; i++) {
        float f = g->cv[i] / den;
        f += (all_done && g->early == 1) ? -1.0e9f : -0.0f;
        f += !g->heur ? -1.0e9f : -0.0f;
        f += !(g->hit[i] && i < K) ? -1.0e9f : -0.0f;
        g->fs[K + i] = f;
    }
    memcpy(g->fs, g->fin_score, (size_t)K * sizeof(float));
    int *mi = g->sel + K; /* K slots after nj: the merged top K (index < K: a kept hypothesis, else candidate - K) */
    topk_idx(g->fs, K + keep, K, mi);
    for (int j = 0; j < K; j++) { /* the new finished set, built in fin_tmp */
        const int i = mi[j];
        int32_t *d = g->fin_tmp + (size_t)j * g->gmax;
        int32_t *dh = g->fin_hist_tmp + (size_t)j * g->gmax;
        if (i < K) {
            memcpy(d, g->fin_tok + (size_t)i * g->gmax, (size_t)g->fin_len[i] * 4);
            memcpy(dh, g->fin_hist + (size_t)i * g->gmax, (size_t)g->fin_len[i] * 4);
            g->phys[j] = g->fin_len[i];
            g->tmp[j] = g->fin_score[i];
            g->taken[j] = g->fin_done[i];
        } else {
            const int q = i - K;
            const fl_request *par = g->req[g->order[g->cb[q]]];
            memcpy(d, par->toks + n_prompt, (size_t)n_out * 4);
            d[n_out] = g->ct[q];
            memcpy(dh, g->hist + (size_t)g->cb[q] * g->gmax, (size_t)n_out * 4);
            dh[n_out] = g->cb[q];
            g->phys[j] = n_out + 1;
            g->tmp[j] = g->fs[i];
            g->taken[j] = g->hit[q] && q < K;
        }
    }
    int32_t *t = g->fin_tok; g->fin_tok = g->fin_tmp; g->fin_tmp = t;
    t = g->fin_hist; g->fin_hist = g->fin_hist_tmp; g->fin_hist_tmp = t;
    for (int j = 0; j < K; j++) {
        g->fin_len[j] = g->phys[j];
        g->fin_score[j] = g->tmp[j];
        g->fin_done[j] = (uint8_t)g->taken[j];
    }
    /* g. the early-stop heuristic and transformers' stopping condition */
    const int cur2 = cur + 1;
    const float run0 = g->rl[nj[0]];
    const int best_len = g->early == 2 && g->lp > 0 ? g->maxlen - n_prompt : cur2 - n_prompt;
    const float bprs = run0 / (float)pow((double)best_len, (double)g->lp);
    float fmin = g->fin_score[0];
    int done2 = 1;
    for (int k = 0; k < K; k++) {
        if (g->fin_score[k] < fmin) fmin = g->fin_score[k];
        done2 &= g->fin_done[k];
    }
    int better = 0;
    for (int k = 0; k < K; k++) better |= bprs > (g->fin_done[k] ? fmin : -1.0e9f);
    g->heur = g->heur && better;
    if (!(g->heur && !(done2 && g->early == 1) && !all_hit) || cur2 >= e->cfg.max_context) {
        finish(e, lead, FL_OK, NULL);
        return;
    }
    /* the beams move: a new beam whose parent no earlier new beam continues keeps the parent's request; the others
     * take the requests of beams nobody continues, copying their parent (no request is both read and overwritten) */
    for (int k = 0; k < K; k++) g->taken[k] = 0;
    for (int j = 0; j < K; j++) {
        const int par = g->order[g->cb[nj[j]]];
        if (!g->taken[par]) { g->taken[par] = 1; g->phys[j] = par; }
        else g->phys[j] = -1;
    }
    int fr = 0;
    for (int j = 0; j < K; j++) {
        if (g->phys[j] >= 0) continue;
        while (g->taken[fr]) fr++;
        g->taken[fr] = 1;
        g->phys[j] = fr;
        const int rc = beam_copy(e, g->req[fr], g->req[g->order[g->cb[nj[j]]]]);
        if (rc == -1) return; /* restarted from its prompt: an older request needed the pages */
        if (rc < 0) {
            finish(e, lead, FL_E_NOMEM, "beam search: the KV cache pool cannot hold this search's beams alone; give "
                   "the model more kv_cache_memory or use fewer beams");
            return;
        }
    }
    for (int j = 0; j < K; j++) {
        fl_request *r = g->req[g->phys[j]];
        r->toks[n_prompt + n_out] = g->ct[nj[j]];
        r->n_out = n_out + 1;
        r->state = RQ_DECODE;
        g->tmp[j] = g->rl[nj[j]];
    }
    for (int j = 0; j < K; j++) {
        g->order[j] = g->phys[j];
        g->score[j] = g->tmp[j];
        int32_t *h = g->hist_tmp + (size_t)j * g->gmax;
        memcpy(h, g->hist + (size_t)g->cb[nj[j]] * g->gmax, (size_t)n_out * 4);
        h[n_out] = g->cb[nj[j]];
    }
    t = g->hist; g->hist = g->hist_tmp; g->hist_tmp = t;
}

/* Groups whose beams got their logits in this step's forward: rows rq[0:B] that are beams, each group once. */
static void beam_collect(fl_engine *e, fl_request *r, int row) {
    r->beam_row = row;
    for (int i = 0; i < e->n_bsel; i++)
        if (e->bsel[i] == r->bm) return;
    e->bsel[e->n_bsel++] = r->bm;
}
static void beam_run(fl_engine *e) {
    for (int i = 0; i < e->n_bsel; i++) {
        fl_beams *g = e->bsel[i];
        if (g->req[0]->state == RQ_DECODE) beam_select(e, g); /* not one finished or restarted meanwhile */
    }
    e->n_bsel = 0;
}

static void fail_all(fl_engine *e, fl_request **rs, int n, fl_status st, const char *msg) {
    for (int i = 0; i < n; i++) finish(e, rs[i], st, msg);
}

/* engine_forward of rows rq[0:B] under model_mu (called without mu; last: fl_model.last_rows for this call). Returns
 * with mu held: 1, or 0 after failing every row with the error. */
static int forward_rows(fl_engine *e, fl_request **rq, int B, int T, const int32_t *last) {
    pthread_mutex_lock(&e->model_mu);
    fl_err_clear();
    e->m->last_rows = last;
    const fl_status st = engine_forward(e, rq, B, T);
    e->m->last_rows = NULL;
    if (st == FL_OK) choose_tokens(e, rq, B);
    char msg[FL_ERR_MAX];
    if (st != FL_OK) snprintf(msg, sizeof msg, "%s", fl_err_msg());
    pthread_mutex_unlock(&e->model_mu);
    pthread_mutex_lock(&e->mu);
    if (st != FL_OK) fail_all(e, rq, B, st, msg);
    return st == FL_OK;
}

/* The pass of forward f: its own transient cache of B x T slots and the one rectangular pass (fl_forward, all logits)
 * under model_mu, polling *cancel (beside the thread's own flag: a compute job's, at exit) between layers. Then,
 * with mu taken (and held on return), its counts. The error message, if any, is in the thread's fl_err buffer. */
static fl_status forward_pass(fl_engine *e, const fl_forward_req *f, const int *cancel) {
    fl_model *m = e->m;
    pthread_mutex_lock(&e->model_mu);
    fl_err_clear();
    const int *prev = fl_cancel_flag_extra(cancel);
    fl_kvcache *kv = NULL;
    fl_status st = fl_kv_create(m, f->B, f->T, e->kv.dtype, &kv);
    const uint64_t kv_bytes = st == FL_OK ? m->kv_bytes_last : 0;
    if (st == FL_OK) st = fl_forward(m, kv, f->B, f->T, 0, f->ids, f->pos, f->mask, f->T, 1, f->logits);
    fl_kv_free(m, kv);
    fl_cancel_flag_extra(prev);
    pthread_mutex_unlock(&e->model_mu);
    pthread_mutex_lock(&e->mu);
    if (kv_bytes > e->st.forward_kv_peak) e->st.forward_kv_peak = kv_bytes;
    if (st == FL_OK) {
        e->st.forwards++;
        e->st.forward_chunks++;
        e->st.forward_tokens += (uint64_t)f->B * (uint64_t)f->T;
    }
    return st;
}

/* The chunks a queued forward is read in: B rows x T tokens in passes of at most prefill_chunk tokens (B x t), as a
 * prompt is, so that a long forward holds the running batch for one chunk a step, not for its whole pass (and its
 * activations and logit rows in the workspace are a chunk's, not B x T). The cut depends on the shape and prefill_chunk
 * alone (whoever else is running), into chunks of equal length (+-1), so the same call always gives the same logits:
 * a forward of at most prefill_chunk tokens is one pass, bit for bit the pass outside the engine; a longer one equals
 * that pass within float rounding (the keys of earlier chunks are read from its cache, matmuls of fewer rows). Dynamic
 * NTK rope scales by each row's largest position, which a chunk does not see: such models take one pass. */
static int forward_chunks(const fl_engine *e, const fl_forward_req *f) {
    if (e->m->cfg.rope_type == FL_ROPE_DYNAMIC) return 1;
    const int tmax = e->cfg.prefill_chunk / f->B > 1 ? e->cfg.prefill_chunk / f->B : 1;
    return (f->T + tmax - 1) / tmax;
}

/* The next chunk of forward request r (state RQ_FORWARD, in no list: e->fwd_running; called without mu), finishing it
 * after its last chunk, on an error, or when cancelled (checked before each chunk and, by its pass, between layers: a
 * caller that gives up, Ctrl-C, stops it within a layer). Its cache lives from its first chunk to its end and is freed
 * here, under model_mu. Returns with mu held: the step ends in the same critical section, so the woken caller does not
 * wait for the driver to take mu once more. */
static void forward_chunk(fl_engine *e, fl_request *r) {
    const fl_forward_req *f = &r->fwd;
    if (!r->fn) r->fn = forward_chunks(e, f);
    if (r->fn == 1) { /* one pass, exactly as outside the engine */
        char msg[FL_ERR_MAX] = "";
        const fl_status st = forward_pass(e, f, &r->cancel); /* returns with mu */
        if (st != FL_OK) snprintf(msg, sizeof msg, "%s", fl_err_msg());
        fl_err_clear();
        e->fwd_running = NULL;
        finish(e, r, st, msg); /* RQ_FORWARD: in no list */
        return;
    }
    fl_model *m = e->m;
    const int B = f->B, a = (int)((int64_t)r->fk * f->T / r->fn), t = (int)((int64_t)(r->fk + 1) * f->T / r->fn) - a;
    char msg[FL_ERR_MAX] = "";
    uint64_t kv_bytes = 0;
    pthread_mutex_lock(&e->model_mu);
    fl_err_clear();
    fl_status st = FL_OK;
    if (__atomic_load_n(&r->cancel, __ATOMIC_RELAXED)) st = fl_err(FL_E_INTERRUPTED, "cancelled");
    if (st == FL_OK && !r->fkv) {
        st = fl_kv_create(m, B, f->T, e->kv.dtype, &r->fkv);
        if (st == FL_OK) kv_bytes = m->kv_bytes_last;
    }
    const int32_t *ids = f->ids + a, *pos = f->pos + a; /* one row: the chunk is contiguous */
    if (st == FL_OK && B > 1) {
        if (!r->fbuf) {
            const int tmax = (f->T + r->fn - 1) / r->fn + 1;
            if (!(r->fbuf = malloc((size_t)2 * B * tmax * 4))) st = fl_err(FL_E_NOMEM, "forward: chunk of %d x %d ids", B, t);
        }
        for (int b = 0; st == FL_OK && b < B; b++) {
            memcpy(r->fbuf + (size_t)b * t, f->ids + (size_t)b * f->T + a, (size_t)t * 4);
            memcpy(r->fbuf + (size_t)(B + b) * t, f->pos + (size_t)b * f->T + a, (size_t)t * 4);
        }
        ids = r->fbuf;
        pos = r->fbuf + (size_t)B * t;
    }
    if (st == FL_OK) {
        const int *prev = fl_cancel_flag_extra(&r->cancel);
        st = fl_forward_ld(m, r->fkv, B, t, a, ids, pos, f->mask, f->T, 1, f->logits + (size_t)a * m->cfg.vocab, f->T);
        fl_cancel_flag_extra(prev);
    }
    const int done = st != FL_OK || ++r->fk == r->fn;
    if (done) {
        fl_kv_free(m, r->fkv);
        r->fkv = NULL;
    }
    if (st != FL_OK) snprintf(msg, sizeof msg, "%s", fl_err_msg());
    fl_err_clear();
    pthread_mutex_unlock(&e->model_mu);
    pthread_mutex_lock(&e->mu);
    if (kv_bytes > e->st.forward_kv_peak) e->st.forward_kv_peak = kv_bytes;
    if (st == FL_OK) e->st.forward_chunks++;
    if (!done) return;
    if (st == FL_OK) {
        e->st.forwards++;
        e->st.forward_tokens += (uint64_t)B * (uint64_t)f->T;
    }
    e->fwd_running = NULL;
    finish(e, r, st, msg);
}

static int cmp_seq(const void *a, const void *b) {
    const fl_request *x = *(fl_request *const *)a, *y = *(fl_request *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* ---- pipelined decode ------------------------------------------------------------------------------ */
/* A page for slot `slot` of r from the free pages only (no preemption). Under mu. */
static int try_page(fl_engine *e, fl_request *r, int slot) {
    while ((slot >> e->pool.shift) >= r->n_pages) {
        const int id = page_alloc(&e->pool);
        if (id < 0) return 0;
        r->pages[r->n_pages++] = id;
    }
    return 1;
}

/* Whether decode rows rq[0:B] may run without the host reading each step's tokens before the next: nothing else
 * is queued (no request waiting, no forward), they are every running request, none is cancelled, and each takes
 * the plain argmax (pipelined steps take the backend's argmax, nothing is sampled on the host). Under mu. */
static int la_quiet(const fl_engine *e, fl_request *const *rq, int B) {
    if (!e->la_on || B < 1 || e->wait_head || e->fwd_head || e->fwd_running || e->n_run != B) return 0;
    for (int b = 0; b < B; b++) {
        const fl_request *r = rq[b];
        if (r->state != RQ_DECODE || __atomic_load_n(&r->cancel, __ATOMIC_RELAXED) || !plain_greedy(r) || replaying(r))
            return 0;
    }
    return 1;
}

/* After a launched step: its rows' argmax ids into token slot `slot` (read by la_wait, fed by engine_launch). */
static fl_status la_argmax(fl_engine *e, int B, int slot) {
    fl_backend *be = e->m->be;
    const int V = e->m->cfg.vocab;
    if (be->argmax_async) return be->argmax_async(be, e->m->ws_logits, B, V, slot);
    const float *lg = e->m->ws_logits; /* host memory, float32 (la_on requires it) */
    for (int b = 0; b < B; b++) e->la_host[slot][b] = fl_argmax(lg + (size_t)b * V, V);
    return FL_OK;
}

static fl_status la_wait(fl_engine *e, int slot, int B) {
    fl_backend *be = e->m->be;
    if (be->argmax_wait) return be->argmax_wait(be, slot, e->h_next, B);
    memcpy(e->h_next, e->la_host[slot], (size_t)B * 4);
    return FL_OK;
}

/* The decode step in flight (launched by the call before, its tokens not read). When its rows may go on (la_quiet,
 * and none ends by count with the token it computes, and each has a free page for the slot after), the next step
 * is launched first, on its device tokens; then its tokens are read and taken. Returns 1 when the next one was
 * launched (the call's work is done: the rows and their references move to it), 0 when not (the rows are released
 * and the caller goes on with an ordinary step). A row that ended with the token read (an eos) has its row of the
 * launched step computed for nothing: counted in wasted_rows when that one is read. */
static int la_step(fl_engine *e) {
    const int B = e->la_B, slot = e->la_slot;
    fl_request **rq = e->la_rows;
    pthread_mutex_lock(&e->mu);
    int chain = la_quiet(e, rq, B);
    for (int b = 0; b < B && chain; b++) {
        const fl_request *r = rq[b];
        chain = r->n_out + 1 < r->p.max_new_tokens && r->n_prompt + r->n_out + 1 < e->cfg.max_context;
    }
    for (int b = 0; b < B && chain; b++) chain = try_page(e, rq[b], rq[b]->n_cached + 1);
    for (int b = 0; b < B && chain; b++) {
        e->h_tok[b] = 0; /* fed from the device */
        e->h_pos[b] = e->h_starts[b] = rq[b]->n_cached + 1;
    }
    pthread_mutex_unlock(&e->mu);
    char msg[FL_ERR_MAX] = "";
    pthread_mutex_lock(&e->model_mu);
    fl_err_clear();
    fl_status st = FL_OK;
    if (chain) {
        st = engine_launch(e, rq, B, 1, slot);
        if (st == FL_OK) st = la_argmax(e, B, 1 - slot);
    }
    const fl_status stw = la_wait(e, slot, B);
    if (st == FL_OK) st = stw;
    if (st != FL_OK) snprintf(msg, sizeof msg, "%s", fl_err_msg());
    pthread_mutex_unlock(&e->model_mu);
    pthread_mutex_lock(&e->mu);
    if (st == FL_OK) {
        e->st.decode_rows += (uint64_t)B;
        for (int b = 0; b < B; b++) {
            fl_request *r = rq[b];
            if (r->state != RQ_DECODE) { e->st.wasted_rows++; continue; } /* ended at the step before */
            r->n_cached++;
            take_token(e, r, e->h_next[b]);
        }
    } else {
        fail_all(e, rq, B, st, msg);
        chain = 0;
    }
    if (chain) {
        e->la_slot = 1 - slot;
        e->st.pipelined_steps++;
        e->st.steps++;
    } else {
        for (int b = 0; b < B; b++) req_unref(rq[b]);
        e->la_active = 0;
    }
    pthread_mutex_unlock(&e->mu);
    return chain;
}

int fl_engine_step(fl_engine *e) {
    pool_t *P = &e->pool;
    const int page = P->page;
    char msg[FL_ERR_MAX];
    if (e->la_active && la_step(e)) return 1;
    pthread_mutex_lock(&e->mu);
    /* 1. cancellations */
    for (int i = e->n_run - 1; i >= 0; i--) /* (a beam's finish() removes its whole group: i may pass n_run) */
        if (i < e->n_run && __atomic_load_n(&e->run[i]->cancel, __ATOMIC_RELAXED))
            finish(e, e->run[i], FL_E_INTERRUPTED, "cancelled");
    for (fl_request *r = e->wait_head, *nx; r; r = nx) {
        nx = r->next;
        if (__atomic_load_n(&r->cancel, __ATOMIC_RELAXED)) finish(e, r, FL_E_INTERRUPTED, "cancelled");
    }
    for (fl_request *r = e->fwd_head, *nx; r; r = nx) {
        nx = r->next;
        if (__atomic_load_n(&r->cancel, __ATOMIC_RELAXED)) finish(e, r, FL_E_INTERRUPTED, "cancelled");
    }
    /* 2. admission: FIFO while the batch has room and the pool can hold the prompts being read */
    int reading = 0;
    for (int i = 0; i < e->n_run; i++)
        if (e->run[i]->state == RQ_PREFILL)
            reading += (e->run[i]->n_prompt + e->run[i]->n_out - e->run[i]->n_cached + page) / page;
    while (e->wait_head && e->n_run < e->cfg.max_batch) {
        fl_request *r = e->wait_head;
        const int need = (r->n_prompt + r->n_out + page) / page;
        if (e->n_run > 0 && pages_available(P) - reading < need) break;
        if (r->bm && e->n_run + r->bm->K > e->cfg.max_batch) break; /* a beam search's K rows come in together */
        e->wait_head = r->next;
        if (!e->wait_head) e->wait_tail = NULL;
        e->n_waiting--;
        r->next = NULL;
        r->state = RQ_PREFILL;
        e->run[e->n_run++] = r;
        for (int k = 1; r->bm && k < r->bm->K; k++) e->run[e->n_run++] = r->bm->req[k]; /* RQ_BEAM_IDLE */
        reading += need;
    }
    qsort(e->run, (size_t)e->n_run, sizeof *e->run, cmp_seq);
    if (e->n_run > e->st.peak_running) e->st.peak_running = e->n_run;

    /* 3. decode rows: every request generating, with a page for its next slot (which may preempt others). A request
     * replaying its generated tokens after a preemption takes the step's spare rows (oldest first), one a token: the
     * step stores every row's keys and values of a layer before any row's attention reads them, and a row's
     * arithmetic is a row's whatever the others (CPU: passes of 4 rows through the decode kernels), so k tokens in
     * one step are the bits of k steps of one token, at a fraction of the time. */
    int room = e->cfg.max_batch;
    for (int i = 0; i < e->n_run; i++)
        if (e->run[i]->state == RQ_DECODE) room--;
    for (int i = 0; i < e->n_run; i++) {
        fl_request *r = e->run[i];
        if (r->state != RQ_DECODE) continue;
        const int left = r->n_prompt + r->n_out - r->n_cached - 1; /* known tokens before the last one */
        const int extra = left < room ? left : room > 0 ? room : 0;
        r->step_rows = 1 + extra;
        room -= extra;
    }
    for (;;) {
        fl_request *need = NULL;
        for (int i = 0; i < e->n_run && !need; i++) {
            fl_request *r = e->run[i];
            if (r->state == RQ_DECODE && ((r->n_cached + r->step_rows - 1) >> P->shift) >= r->n_pages) need = r;
        }
        if (!need) break;
        if (ensure_page(e, need, need->n_cached + need->step_rows - 1) == -2) {
            snprintf(msg, sizeof msg, "the KV cache pool (%d pages of %d tokens) cannot hold this request's %d tokens; "
                     "give the model more kv_cache_memory", P->n, page, need->n_cached + need->step_rows);
            finish(e, need, FL_E_NOMEM, msg);
        }
    }
    int B = 0;
    for (int i = 0; i < e->n_run; i++) {
        fl_request *r = e->run[i];
        if (r->state != RQ_DECODE) continue;
        for (int j = 0; j < r->step_rows && B < e->cfg.max_batch; j++, B++) {
            e->rows[B] = r;
            e->h_tok[B] = r->toks[r->n_cached + j];
            e->h_pos[B] = e->h_starts[B] = r->n_cached + j;
            e->h_need[B] = r->n_cached + j + 1 == r->n_prompt + r->n_out; /* the last known token gives a new one */
            e->h_greedy[B] = (uint8_t)(plain_greedy(r) || !e->h_need[B]); /* a replayed row's logits stay on the device */
        }
    }
    /* nothing else queued: this step's tokens are read by the next call, after it launched the step after it */
    const int async = la_quiet(e, e->rows, B);
    if (async) {
        for (int b = 0; b < B; b++) {
            e->la_rows[b] = e->rows[b];
            e->rows[b]->refs++;
        }
    }
    pthread_mutex_unlock(&e->mu);

    if (async) {
        pthread_mutex_lock(&e->model_mu);
        fl_err_clear();
        fl_status st = engine_launch(e, e->la_rows, B, 1, -1);
        if (st == FL_OK) st = la_argmax(e, B, 0);
        if (st != FL_OK) snprintf(msg, sizeof msg, "%s", fl_err_msg());
        pthread_mutex_unlock(&e->model_mu);
        pthread_mutex_lock(&e->mu);
        if (st == FL_OK) {
            e->la_active = 1;
            e->la_B = B;
            e->la_slot = 0;
        } else {
            fail_all(e, e->la_rows, B, st, msg);
            for (int b = 0; b < B; b++) req_unref(e->la_rows[b]);
        }
        pthread_mutex_unlock(&e->mu);
    } else if (B > 0) {
        if (forward_rows(e, e->rows, B, 1, NULL)) {
            e->st.decode_rows += (uint64_t)B;
            for (int b = 0; b < B; b++) {
                fl_request *r = e->rows[b];
                if (r->state != RQ_DECODE) continue; /* cancelled meanwhile: finish() ran */
                r->n_cached++;
                if (r->n_cached < r->n_prompt + r->n_out) { e->st.replayed_tokens++; continue; } /* known already */
                if (r->bm) beam_collect(e, r, b);
                else take_token(e, r, e->h_next[b]);
            }
            beam_run(e);
        }
        pthread_mutex_unlock(&e->mu);
    }

    /* 4. prefill: the oldest requests reading their prompts, each its next chunk, together in one forward as many as
     * fit prefill_chunk tokens when padded (at the right) to the longest chunk */
    pthread_mutex_lock(&e->mu);
    int np = 0, T = 0;
    for (int i = 0; i < e->n_run && np < e->cfg.max_batch; i++) {
        fl_request *r = e->run[i];
        if (r->state != RQ_PREFILL) continue;
        const int n_total = read_end(e, r);
        if (r->n_cached == 0 && r->n_pages == 0 && !e->cfg.no_prefix_cache) {
            /* a request that starts with the same page as one already chosen waits a step, to share it then */
            int twin = 0;
            for (int k = 0; k < np && !twin; k++) {
                const fl_request *o = e->prows[k];
                twin = o->n_pages == 0 && e->pc0[k] == 0 && n_total > page && read_end(e, o) > page &&
                       !memcmp(o->toks, r->toks, (size_t)page * 4);
            }
            if (twin) continue;
            /* the prefix table: full pages of the prompt but its last token (whose logits are needed). A request read
             * again after a preemption (replay) takes no more than its first read took (its own prompt pages are in
             * the table now): it then reads the rest in the chunks it read it in the first time, the same bits
             * (when pages it had taken were reused meanwhile it reads more, which can round differently, as any
             * prefix sharing can) */
            const int limit = r->hit1 && !e->cfg.preempt_recompute ? r->hit1 - 1 : n_total - 1;
            int parent = -1;
            while ((r->n_pages + 1) * page <= limit && (r->n_pages + 1) * page <= n_total - 1) {
                const int id = table_find(P, parent, r->toks + (size_t)r->n_pages * page);
                if (id < 0) break;
                page_take(P, id);
                r->pages[r->n_pages++] = id;
                parent = id;
            }
            r->n_reg = r->n_pages;
            r->n_cached = r->n_pages * page;
            if (!r->hit1) r->hit1 = r->n_cached + 1;
            e->st.prefix_hit_tokens += (uint64_t)r->n_cached;
        }
        const int c0 = r->n_cached;
        const int t = n_total - c0 < e->cfg.prefill_chunk ? n_total - c0 : e->cfg.prefill_chunk;
        const int Tn = t > T ? t : T;
        if (np > 0 && (np + 1) * Tn > e->cfg.prefill_chunk) break;
        /* Without graphs (the CPU backend) one prompt a forward: there the matmul's kernel depends on the number of
         * rows (integer dot products up to 16, float above), so a prompt read beside others could round differently
         * from the same prompt alone; the CPU is compute-bound, so reading prompts together would save little. */
        if (np > 0 && !e->m->be->graph_capture) break;
        e->prows[np] = r;
        e->pc0[np] = c0;
        e->pT[np] = t;
        np++;
        T = Tn;
    }
    /* pages for every chosen chunk (this may preempt newer requests, chosen ones included, or the chunk's own) */
    for (int k = 0; k < np; k++) {
        fl_request *r = e->prows[k];
        if (r->state != RQ_PREFILL) continue;
        if (ensure_page(e, r, e->pc0[k] + e->pT[k] - 1) == -2) {
            snprintf(msg, sizeof msg, "the KV cache pool (%d pages of %d tokens) cannot hold this request's %d tokens; "
                     "give the model more kv_cache_memory", P->n, page, e->pc0[k] + e->pT[k]);
            finish(e, r, FL_E_NOMEM, msg);
        }
    }
    int nb = 0;
    T = 0;
    for (int k = 0; k < np; k++)
        if (e->prows[k]->state == RQ_PREFILL && e->prows[k]->n_cached == e->pc0[k]) {
            e->prows[nb] = e->prows[k];
            e->pc0[nb] = e->pc0[k];
            e->pT[nb] = e->pT[k];
            if (e->pT[nb] > T) T = e->pT[nb];
            nb++;
        }
    for (int k = 0; k < nb; k++) {
        fl_request *r = e->prows[k];
        const int c0 = e->pc0[k], t = e->pT[k];
        for (int j = 0; j < T; j++) { /* padding after the chunk: token 0, its slots go to pages past the row's */
            e->h_tok[k * T + j] = j < t ? r->toks[c0 + j] : 0;
            e->h_pos[k * T + j] = c0 + j;
        }
        e->h_starts[k] = c0;
        /* the chunk that ends the prompt gives the first token (not one that ends a replayed request's prompt) */
        e->h_need[k] = c0 + t == r->n_prompt + r->n_out;
        e->h_greedy[k] = (uint8_t)(plain_greedy(r) || !e->h_need[k]);
        e->plast[k] = t - 1;
    }
    pthread_mutex_unlock(&e->mu);
    if (nb > 0) {
        if (forward_rows(e, e->prows, nb, T, e->plast)) {
            for (int k = 0; k < nb; k++) {
                fl_request *r = e->prows[k];
                if (r->state != RQ_PREFILL) continue;
                r->n_cached = e->pc0[k] + e->pT[k];
                e->st.prefill_tokens += (uint64_t)e->pT[k];
                /* enter the pages this chunk filled into the prefix table, in order */
                while (!e->cfg.no_prefix_cache && r->n_reg < r->n_pages && (r->n_reg + 1) * page <= r->n_cached) {
                    const int j = r->n_reg, parent = j ? r->pages[j - 1] : -1;
                    if (j && P->parent[parent] == -2) break; /* the chain is broken: stop */
                    if (!table_insert(P, r->pages[j], parent, r->toks + (size_t)j * page)) break;
                    r->n_reg++;
                }
                if (r->n_cached == read_end(e, r)) {
                    r->state = RQ_DECODE;
                    if (r->n_cached != r->n_prompt + r->n_out) continue;
                    if (r->bm) beam_collect(e, r, k);
                    else take_token(e, r, e->h_next[k]);
                }
            }
            beam_run(e);
        }
        pthread_mutex_unlock(&e->mu);
    }

    /* 5. the next chunk of the forward being read, or of the oldest one queued (between this step's batch work and
     * the next step's; forward_chunks: one pass for at most prefill_chunk tokens) */
    pthread_mutex_lock(&e->mu);
    fl_request *f = e->fwd_running;
    if (!f && (f = e->fwd_head)) {
        e->fwd_head = f->next;
        if (!e->fwd_head) e->fwd_tail = NULL;
        e->n_fwd_waiting--;
        f->next = NULL;
        f->state = RQ_FORWARD;
        e->fwd_running = f;
    }
    if (f) {
        pthread_mutex_unlock(&e->mu);
        forward_chunk(e, f); /* returns with mu held */
    }
    e->st.steps++;
    const int more = e->n_run > 0 || e->wait_head != NULL || e->fwd_head != NULL || e->fwd_running != NULL;
    if (!more) {
        e->driving = 0;
        pthread_cond_broadcast(&e->idle_cv);
    }
    pthread_mutex_unlock(&e->mu);
    return more;
}

fl_status fl_engine_run(fl_engine *e) {
    while (fl_engine_step(e)) {
    }
    return FL_OK;
}

void fl_engine_cancel_all(fl_engine *e) {
    pthread_mutex_lock(&e->mu);
    for (fl_request *r = e->wait_head; r; r = r->next) __atomic_store_n(&r->cancel, 1, __ATOMIC_RELAXED);
    for (fl_request *r = e->fwd_head; r; r = r->next) __atomic_store_n(&r->cancel, 1, __ATOMIC_RELAXED);
    if (e->fwd_running) __atomic_store_n(&e->fwd_running->cancel, 1, __ATOMIC_RELAXED); /* stops within a layer */
    for (int i = 0; i < e->n_run; i++) __atomic_store_n(&e->run[i]->cancel, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->mu);
}

/* ---- public API ---------------------------------------------------------------------------------- */
static void *driver_main(void *arg) {
    fl_engine_run((fl_engine *)arg);
    return NULL;
}
static int default_kick(void *ud, fl_engine *e) {
    (void)ud;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t tid;
    const int rc = pthread_create(&tid, &attr, driver_main, e);
    pthread_attr_destroy(&attr);
    return rc;
}

/* Pages of page_tokens slots that kv_bytes holds (K and V of every layer), and the bytes of one token's K (or V) in
 * one layer; or FL_E_VALUE naming kv_cache_memory. */
static fl_status pool_pages(const fl_model *m, fl_dtype dtype, uint64_t kv_bytes, int page_tokens, int *n_pages,
                            size_t *slot_out) {
    const fl_config *c = &m->cfg;
    size_t slot_bytes;
    if (!fl_mul3_size((size_t)c->n_kv_heads, (size_t)c->head_dim, (size_t)fl_dtype_size(dtype), &slot_bytes))
        return fl_err(FL_E_VALUE, "engine: KV slot size overflows");
    const double page_all = (double)slot_bytes * 2.0 * c->n_layers * page_tokens; /* one page, K and V, every layer */
    const double n_pages_d = floor((double)kv_bytes / page_all);
    if (n_pages_d < 1)
        return fl_err(FL_E_VALUE, "engine: kv_cache_memory of %llu bytes holds no page (one page of %d tokens is %.0f bytes)",
                      (unsigned long long)kv_bytes, page_tokens, page_all);
    if (n_pages_d > (double)INT32_MAX / 2) /* page ids are int32 in the block tables */
        return fl_err(FL_E_VALUE, "engine: kv_cache_memory of %llu bytes is too many pages", (unsigned long long)kv_bytes);
    if (n_pages) *n_pages = (int)n_pages_d;
    if (slot_out) *slot_out = slot_bytes;
    return FL_OK;
}

fl_status fl_engine_create(fl_model *m, const fl_engine_cfg *cfg_in, fl_engine_kick_fn kick, void *kick_ud, fl_engine **out) {
    *out = NULL;
    if (!m->arena_d) return fl_err(FL_E_VALUE, "engine: the model's weights are not loaded");
    fl_engine_cfg cfg = *cfg_in;
    if (cfg.page_tokens <= 0) cfg.page_tokens = 16;
    if (cfg.max_batch <= 0) cfg.max_batch = 64;
    if (cfg.prefill_chunk <= 0) cfg.prefill_chunk = 512;
    /* dynamic NTK rope: a page's keys are rotated with frequencies that depend on the length of the request that
     * wrote them, so no other request may take them */
    if (m->cfg.rope_type == FL_ROPE_DYNAMIC) {
        cfg.no_prefix_cache = 1;
        /* and recompute would read a preempted request's generated tokens with the NTK base of the whole length
         * (their keys were rotated with their own positions' the first time): O(1) off, not rounding. Replay only */
        cfg.preempt_recompute = 0;
    }
    if (cfg.max_context <= 0) cfg.max_context = m->cfg.max_pos > 0 ? m->cfg.max_pos : 4096;
    if (cfg.page_tokens & (cfg.page_tokens - 1) || cfg.page_tokens > 4096)
        return fl_err(FL_E_VALUE, "engine: page_tokens=%d must be a power of two up to 4096", cfg.page_tokens);
    if (cfg.max_batch > 4096 || cfg.prefill_chunk > 65536)
        return fl_err(FL_E_VALUE, "engine: max_batch %d (at most 4096) or prefill_chunk %d (at most 65536)", cfg.max_batch, cfg.prefill_chunk);
    int shift = 0;
    while ((1 << shift) < cfg.page_tokens) shift++;
    const fl_config *c = &m->cfg;
    const fl_dtype kv_dtype = cfg.kv_f16 ? FL_F16 : m->be->act;
    FL_TRY(fl_kv_dtype_ok(m->be, kv_dtype));
    if (cfg.kv_bytes) FL_TRY(pool_pages(m, kv_dtype, cfg.kv_bytes, cfg.page_tokens, NULL, NULL)); /* a size holding no page: before anything */
    fl_engine *e = calloc(1, sizeof *e);
    if (!e) return fl_err(FL_E_NOMEM, "engine: cannot allocate");
    e->m = m;
    e->cfg = cfg;
    e->kick = kick ? kick : default_kick;
    e->kick_ud = kick_ud;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->model_mu, NULL);
    pthread_cond_init(&e->idle_cv, NULL);
    fl_status st = FL_OK;
    e->kv = (fl_kvcache){.n_layers = c->n_layers, .batch = 0, .max_len = cfg.max_context, .n_kv_heads = c->n_kv_heads,
                         .head_dim = c->head_dim, .dtype = kv_dtype, .page_shift = shift}; /* pages: fl_engine_add_pool */
    e->kv.k_d = calloc((size_t)c->n_layers, sizeof(void *));
    e->kv.v_d = calloc((size_t)c->n_layers, sizeof(void *));
    e->max_pages = (int)(((int64_t)cfg.max_context + cfg.page_tokens - 1) / cfg.page_tokens + 1); /* context 2^31 - 1: no overflow */
    const int rows = cfg.max_batch > cfg.prefill_chunk ? cfg.max_batch : cfg.prefill_chunk;
    e->run = calloc((size_t)cfg.max_batch, sizeof *e->run);
    e->rows = calloc((size_t)cfg.max_batch, sizeof *e->rows);
    e->prows = calloc((size_t)cfg.max_batch, sizeof *e->prows);
    e->pc0 = calloc((size_t)cfg.max_batch, sizeof(int));
    e->pT = calloc((size_t)cfg.max_batch, sizeof(int));
    e->plast = calloc((size_t)cfg.max_batch, sizeof(int32_t));
    e->cp = calloc((size_t)cfg.max_batch * 2, sizeof(int32_t));
    e->bsel = calloc((size_t)cfg.max_batch, sizeof *e->bsel);
    e->logits = malloc((size_t)cfg.max_batch * (size_t)c->vocab * sizeof(float));
    e->la_rows = calloc((size_t)cfg.max_batch, sizeof *e->la_rows);
    e->la_host[0] = malloc((size_t)cfg.max_batch * 4);
    e->la_host[1] = malloc((size_t)cfg.max_batch * 4);
    {
        const fl_backend *be = m->be;
        const char *pl = getenv("FASTLOAD_ENGINE_PIPELINE");
        const int dev = be->argmax_async && be->argmax_wait && be->argmax_feed && be->graph_capture;
        const int host = be->host_memory && be->act == FL_F32; /* the engine's own argmax over float32 logits */
        e->la_on = pl && !strcmp(pl, "0") ? 0 : pl && !strcmp(pl, "1") ? dev || host : dev;
    }
    e->n_scratch = 1;
    const char *probe = getenv("FASTLOAD_ENGINE_PROBE_REPLAYS");
    e->probe_replays = probe ? atoi(probe) : 0;
    if (e->probe_replays < 0 || e->probe_replays > 16) e->probe_replays = 0;
#ifdef _OPENMP
    e->n_scratch = m->be->n_threads > 0 ? m->be->n_threads : omp_get_max_threads();
    if (e->n_scratch > 16) e->n_scratch = 16;
    if (e->n_scratch < 1) e->n_scratch = 1;
#endif
    e->idx = malloc((size_t)e->n_scratch * (size_t)c->vocab * 4);
    e->mark = malloc((size_t)e->n_scratch * (size_t)c->vocab);
    e->raw = malloc((size_t)e->n_scratch * (size_t)c->vocab * sizeof(float));
    e->h_need = calloc((size_t)(cfg.max_batch > cfg.prefill_chunk ? cfg.max_batch : cfg.prefill_chunk), 1);
    e->h_tok = malloc((size_t)rows * 4);
    e->h_pos = malloc((size_t)rows * 4);
    e->h_starts = malloc((size_t)cfg.max_batch * 4);
    e->h_next = malloc((size_t)cfg.max_batch * 4);
    e->in_cap = 2 * rows + 2 * cfg.max_batch; /* tokens, positions, starts, rope lengths */
    e->h_in = malloc((size_t)e->in_cap * 4);
    e->sig_seq = calloc((size_t)cfg.max_batch, sizeof(uint64_t));
    e->sig_gen = calloc((size_t)cfg.max_batch, sizeof(int));
    e->sig_np = calloc((size_t)cfg.max_batch, sizeof(int));
    e->h_greedy = calloc((size_t)rows, 1);
    e->n_lbuckets = 1;
    /* in 64 bits: a declared context of 2^31 - 1 tokens makes max_pages << shift pass INT_MAX (which stopped the loop
     * at one bucket, and a graph's table then described 256 slots whatever the row's length) */
    while (((int64_t)256 << (e->n_lbuckets - 1)) < ((int64_t)e->max_pages << shift) && e->n_lbuckets < 20) e->n_lbuckets++;
    e->n_buckets = (bucket_of(cfg.max_batch) + 1) * e->n_lbuckets;
    e->graph = calloc((size_t)e->n_buckets, sizeof(void *));
    e->graph_epoch = calloc((size_t)e->n_buckets, sizeof(uint64_t));
    if (!e->kv.k_d || !e->kv.v_d || !e->run || !e->rows || !e->logits || !e->idx || !e->mark || !e->raw || !e->h_tok || !e->h_pos ||
        !e->h_starts || !e->h_next || !e->h_greedy || !e->graph || !e->graph_epoch ||
        !e->h_in || !e->sig_seq || !e->sig_gen || !e->sig_np || !e->prows || !e->pc0 || !e->pT || !e->plast || !e->cp || !e->bsel || !e->h_need ||
        !e->la_rows || !e->la_host[0] || !e->la_host[1]) {
        st = fl_err(FL_E_NOMEM, "engine: cannot allocate its tables");
        goto fail;
    }
    /* the workspace for the largest step now, so that it never moves under a captured graph later */
    st = fl_model_reserve(m, rows, cfg.max_batch);
    if (st != FL_OK) goto fail;
    if (!m->be->host_memory) {
        st = m->be->alloc(m->be, (size_t)e->in_cap * 4, &e->d_in);
        if (st != FL_OK) goto fail;
    }
    e->st.page_tokens = cfg.page_tokens;
    if (cfg.kv_bytes && (st = fl_engine_add_pool(e, cfg.kv_bytes)) != FL_OK) goto fail;
    pthread_once(&reg_once, reg_init);
    pthread_mutex_lock(&reg_mu);
    e->reg_next = reg_head;
    reg_head = e;
    pthread_mutex_unlock(&reg_mu);
    *out = e;
    return FL_OK;
fail:
    fl_engine_free(e);
    return st;
}

fl_status fl_engine_add_pool(fl_engine *e, uint64_t kv_bytes) {
    fl_model *m = e->m;
    const fl_config *c = &m->cfg;
    const int shift = e->kv.page_shift;
    size_t slot_bytes; /* one token's K (or V) in one layer */
    int n_pages;
    FL_TRY(pool_pages(m, e->kv.dtype, kv_bytes, 1 << shift, &n_pages, &slot_bytes));
    pthread_mutex_lock(&e->mu);
    const int busy = e->adding_pool || __atomic_load_n(&e->has_pool, __ATOMIC_ACQUIRE);
    if (!busy) e->adding_pool = 1;
    pthread_mutex_unlock(&e->mu);
    if (busy) return fl_err(FL_E_VALUE, "engine: it has a KV cache pool already");
    const size_t layer_bytes = slot_bytes * ((size_t)(n_pages + 1) << shift); /* K of one layer; + the null page */
    const size_t layer_al = (layer_bytes + 255) & ~(size_t)255;
    /* Made without the engine's locks (a forward may be running): no step touches the pool or e->kv before has_pool,
     * since no generate request is let in before (fl_engine_submit_group). */
    void *base = NULL;
    pool_t pool;
    const size_t pool_bytes = layer_al * 2 * (size_t)c->n_layers;
    fl_status st = m->be->alloc(m->be, pool_bytes, &base);
    const int huge = st == FL_OK && m->be->host_memory ? fl_advise_huge(base, pool_bytes, 2) : 0;
    if (st != FL_OK) {
        st = fl_err_prefix(st, "engine: the KV cache pool of %d pages (%.2f GiB)", n_pages, pool_bytes / 1073741824.0);
    } else if (pool_init(&pool, n_pages, shift) < 0) { /* host tables: after the pool, which fails first when too big */
        pool_free(&pool);
        m->be->free(m->be, base);
        st = fl_err(FL_E_NOMEM, "engine: cannot allocate the page tables of %d pages", n_pages);
    }
    /* Block tables: a request never holds more pages than the pool has, so a row of the table is at most that long
     * (a config's max_position_embeddings can be 2^31: tables sized by it alone would not fit in memory). */
    const int max_pages = e->max_pages < n_pages + 1 ? e->max_pages : n_pages + 1;
    const size_t btab_bytes = (size_t)e->cfg.max_batch * (size_t)max_pages * 4;
    int32_t *h_btab = NULL;
    void *d_btab = NULL;
    if (st == FL_OK) {
        h_btab = malloc(btab_bytes);
        if (!h_btab) st = fl_err(FL_E_NOMEM, "engine: cannot allocate the block table (%zu bytes)", btab_bytes);
        else if (!m->be->host_memory) st = m->be->alloc(m->be, btab_bytes, &d_btab);
        if (st != FL_OK) {
            free(h_btab);
            pool_free(&pool);
            m->be->free(m->be, base);
        }
    }
    pthread_mutex_lock(&e->mu);
    e->adding_pool = 0;
    if (st == FL_OK) {
        e->kv_base = base;
        e->pool = pool;
        e->max_pages = max_pages;
        e->h_btab = h_btab;
        e->d_btab = d_btab;
        e->kv.n_pages = n_pages + 1;
        e->null_page = n_pages;
        for (int l = 0; l < c->n_layers; l++) {
            e->kv.k_d[l] = (char *)base + layer_al * (size_t)(2 * l);
            e->kv.v_d[l] = (char *)base + layer_al * (size_t)(2 * l + 1);
        }
        e->st.n_pages = n_pages;
        e->st.pool_bytes = pool_bytes;
        e->st.pool_huge = huge;
        __atomic_store_n(&e->has_pool, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

static void engine_destroy(fl_engine *e);

void fl_engine_free(fl_engine *e) {
    if (!e) return;
    pthread_mutex_lock(&reg_mu);
    for (fl_engine **pp = &reg_head; *pp; pp = &(*pp)->reg_next)
        if (*pp == e) { *pp = e->reg_next; break; }
    pthread_mutex_unlock(&reg_mu);
    fl_engine_cancel_all(e);
    pthread_mutex_lock(&e->mu);
    e->closing = 1;
    while (e->driving) pthread_cond_wait(&e->idle_cv, &e->mu);
    if (e->la_active) { /* not expected: the driver stops only when nothing runs, and a step in flight has rows */
        pthread_mutex_unlock(&e->mu);
        (void)la_wait(e, e->la_slot, e->la_B);
        fl_err_clear();
        pthread_mutex_lock(&e->mu);
        for (int b = 0; b < e->la_B; b++) req_unref(e->la_rows[b]);
        e->la_active = 0;
    }
    while (e->wait_head) finish(e, e->wait_head, FL_E_INTERRUPTED, "the engine was closed");
    while (e->fwd_head) finish(e, e->fwd_head, FL_E_INTERRUPTED, "the engine was closed");
    while (e->n_run) finish(e, e->run[0], FL_E_INTERRUPTED, "the engine was closed");
    pthread_mutex_unlock(&e->mu);
    fl_backend *be = e->m->be;
    if (e->kv_base) be->free(be, e->kv_base);
    if (e->d_in) be->free(be, e->d_in);
    if (e->d_btab) be->free(be, e->d_btab);
    for (int k = 0; e->graph && k < e->n_buckets; k++)
        if (e->graph[k]) be->graph_free(be, e->graph[k]);
    free(e->graph); free(e->graph_epoch); free(e->h_next); free(e->h_greedy);
    free(e->la_rows); free(e->la_host[0]); free(e->la_host[1]);
    free(e->h_in); free(e->sig_seq); free(e->sig_gen); free(e->sig_np);
    free(e->prows); free(e->pc0); free(e->pT); free(e->plast); free(e->cp); free(e->bsel); free(e->h_need);
    free(e->kv.k_d); free(e->kv.v_d);
    free(e->run); free(e->rows); free(e->logits); free(e->idx); free(e->mark); free(e->raw);
    free(e->h_tok); free(e->h_pos); free(e->h_starts); free(e->h_btab);
    pool_free(&e->pool);
    pthread_mutex_lock(&e->mu);
    const int held = e->handles > 0;
    e->retired = held;
    pthread_mutex_unlock(&e->mu);
    if (!held) engine_destroy(e); /* else the last fl_request_release does (every request is finished by now) */
}

/* A request for prompt ids[0:n], checked against the engine's limits and allocated, not yet queued (refs 2: the
 * caller's and the engine's). */
/* The group of beam search leader r (made by req_make, num_beams > 1): its K - 1 followers (RQ_BEAM_IDLE, the engine's
 * reference only; the settings are the leader's, pointing into its arrays: they end before it) and the search's
 * state as transformers starts it. On failure nothing is left attached to r. */
static fl_status beams_make(fl_engine *e, fl_request *r) {
    const int K = r->p.num_beams, per = r->p.n_eos + 1 > 2 ? r->p.n_eos + 1 : 2, keep = per * K;
    fl_beams *g = calloc(1, sizeof *g);
    if (!g) return FL_E_NOMEM;
    const int64_t ml = (int64_t)r->n_prompt + r->p.max_new_tokens;
    g->K = K; g->keep = keep; g->n_ret = r->p.num_return > 0 ? r->p.num_return : 1; g->early = r->p.early_stopping;
    g->lp = r->p.length_penalty;
    g->maxlen = ml < e->cfg.max_context ? (int)ml : e->cfg.max_context;
    g->gmax = g->maxlen - r->n_prompt > 1 ? g->maxlen - r->n_prompt : 1;
    g->heur = 1;
    g->req = calloc((size_t)K, sizeof *g->req);
    g->order = calloc((size_t)K, sizeof(int));
    g->score = malloc((size_t)K * sizeof(float));
    g->fin_score = malloc((size_t)K * sizeof(float));
    g->fin_done = calloc((size_t)K, 1);
    g->fin_len = calloc((size_t)K, sizeof(int));
    g->fin_tok = malloc((size_t)K * (size_t)g->gmax * 4);
    g->fin_tmp = malloc((size_t)K * (size_t)g->gmax * 4);
    g->cv = malloc((size_t)keep * sizeof(float)); g->rl = malloc((size_t)keep * sizeof(float));
    g->fs = malloc((size_t)(K + keep) * sizeof(float));
    g->cb = malloc((size_t)keep * 4); g->ct = malloc((size_t)keep * 4); g->hit = malloc((size_t)keep);
    g->sel = malloc((size_t)(K + keep) * sizeof(int)); g->phys = malloc((size_t)K * sizeof(int));
    g->taken = malloc((size_t)K * sizeof(int)); g->tmp = malloc((size_t)K * sizeof(float));
    const size_t nh = (size_t)K * (size_t)g->gmax * 4;
    g->hist = malloc(nh); g->hist_tmp = malloc(nh); g->fin_hist = malloc(nh); g->fin_hist_tmp = malloc(nh);
    g->bv = malloc((size_t)K * keep * sizeof(float)); g->bt = malloc((size_t)K * keep * 4); g->bn = calloc((size_t)K, sizeof(int));
    if (r->p.keep_scores) g->sc = calloc((size_t)g->gmax, sizeof *g->sc);
    int ok = g->req && g->order && g->score && g->fin_score && g->fin_done && g->fin_len && g->fin_tok && g->fin_tmp &&
             g->cv && g->rl && g->fs && g->cb && g->ct && g->hit && g->sel && g->phys && g->taken && g->tmp &&
             g->hist && g->hist_tmp && g->fin_hist && g->fin_hist_tmp && g->bv && g->bt && g->bn &&
             (!r->p.keep_scores || g->sc);
    if (ok) g->req[0] = r;
    for (int k = 1; ok && k < K; k++) {
        fl_request *f = calloc(1, sizeof *f);
        if (f) {
            f->toks = malloc((size_t)r->cap * 4);
            f->pages = malloc((size_t)e->max_pages * 4);
        }
        if (!f || !f->toks || !f->pages) {
            if (f) { free(f->toks); free(f->pages); }
            free(f);
            ok = 0;
            break;
        }
        memcpy(f->toks, r->toks, (size_t)r->n_prompt * 4);
        f->cap = r->cap;
        f->n_prompt = r->n_prompt;
        f->e = e;
        f->p = r->p;
        req_cond_init(f);
        f->wake_at = INT_MAX;
        f->refs = 1;
        f->state = RQ_BEAM_IDLE;
        f->bm = g;
        f->beam_i = k;
        g->req[k] = f;
    }
    if (!ok) {
        for (int k = 1; g->req && k < K; k++)
            if (g->req[k]) { g->req[k]->bm = NULL; req_unref(g->req[k]); }
        beams_free(g);
        return FL_E_NOMEM;
    }
    beams_reset(g);
    r->bm = g;
    return FL_OK;
}

/* The search's state as transformers starts it (at submit, and when it starts again: beams_restart). */
static void beams_reset(fl_beams *g) {
    for (int k = 0; k < g->K; k++) {
        g->order[k] = 0;
        g->score[k] = k ? -1.0e9f : 0.0f; /* transformers: only the first beam's candidates at the first step */
        g->fin_score[k] = -1.0e9f;
        g->fin_done[k] = 0;
        g->fin_len[k] = 0;
        g->bn[k] = 0;
    }
    g->heur = 1;
    for (int i = 0; i < g->n_sc; i++) { free(g->sc[i]); g->sc[i] = NULL; }
    g->n_sc = 0;
}

/* A request never queued (submit failed, or nothing to generate): its beams' followers go with it. Under mu or not
 * yet shared. */
static void req_discard(fl_request *r) {
    fl_beams *g = r->bm;
    for (int k = 1; g && k < g->K; k++)
        if (g->req[k]) { req_unref(g->req[k]); g->req[k] = NULL; }
    r->refs = 1;
    req_unref(r);
}

static fl_status req_make(fl_engine *e, const int32_t *ids, int n, const fl_gen_params *p, fl_request **out) {
    *out = NULL;
    const int V = e->m->cfg.vocab, page = e->pool.page;
    if (n <= 0) return fl_err(FL_E_VALUE, "generate: the prompt is empty");
    if (p->max_new_tokens < 0) return fl_err(FL_E_VALUE, "generate: max_new_tokens must be >= 0");
    if (p->n_eos < 0 || p->n_eos > FL_ENGINE_MAX_EOS) return fl_err(FL_E_VALUE, "generate: at most %d eos token ids", FL_ENGINE_MAX_EOS);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) return fl_err(FL_E_VALUE, "input_ids[%d] = %d is outside the vocabulary [0, %d)", i, (int)ids[i], V);
    if (n >= e->cfg.max_context)
        return fl_err(FL_E_VALUE, "generate: a prompt of %d tokens leaves no room in the model's context of %d tokens", n, e->cfg.max_context);
    /* the prompt's keys and values; the first new token's are stored only if a second one is made (outgrowing the
     * pool then is the MemoryError of a request that alone outgrows it) */
    if ((int64_t)n > (int64_t)e->pool.n * page)
        return fl_err(FL_E_VALUE, "generate: a prompt of %d tokens does not fit the KV cache pool of %d tokens (kv_cache_memory)", n,
                      e->pool.n * page);
    if (p->n_bias < 0 || (p->n_bias && (!p->bias_toks || !p->bias_off || !p->bias)) || p->no_repeat_ngram_size < 0 ||
        !isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty) || p->n_begin_ban < 0 ||
        (p->n_begin_ban && !p->begin_ban) || p->n_forced_eos < 0 || (p->n_forced_eos && !p->forced_eos) ||
        !(p->typical_p >= 0) || !(p->epsilon_cutoff >= 0 && p->epsilon_cutoff < 1) ||
        !(p->eta_cutoff >= 0 && p->eta_cutoff < 1))
        return fl_err(FL_E_VALUE, "generate: bad bias list, ban list, forced eos, no_repeat_ngram_size, presence / "
                      "frequency penalty, typical_p, epsilon_cutoff or eta_cutoff");
    int64_t n_bias_toks = 0;
    for (int i = 0; i < p->n_bias; i++) {
        const int a = p->bias_off[i], b = p->bias_off[i + 1];
        if ((i == 0 && a != 0) || b <= a || isnan(p->bias[i]) || p->bias[i] == INFINITY)
            return fl_err(FL_E_VALUE, "generate: logit bias %d: an empty token sequence, or a bias that is NaN or +inf", i);
        for (int j = a; j < b; j++)
            if (p->bias_toks[j] < 0 || p->bias_toks[j] >= V)
                return fl_err(FL_E_VALUE, "generate: logit bias %d: token %d is outside the vocabulary [0, %d)", i,
                              (int)p->bias_toks[j], V);
        n_bias_toks = b;
    }
    for (int i = 0; i < p->n_begin_ban + p->n_forced_eos; i++) {
        const int32_t t = i < p->n_begin_ban ? p->begin_ban[i] : p->forced_eos[i - p->n_begin_ban];
        if (t < 0 || t >= V)
            return fl_err(FL_E_VALUE, "generate: %s token %d is outside the vocabulary [0, %d)",
                          i < p->n_begin_ban ? "begin_suppress_tokens" : "forced_eos_token_id", (int)t, V);
    }
    if (p->num_beams > 1) {
        const int K = p->num_beams, per = p->n_eos + 1 > 2 ? p->n_eos + 1 : 2;
        if (K > e->cfg.max_batch)
            return fl_err(FL_E_VALUE, "generate: num_beams=%d is more beams than the engine's batch of %d rows "
                          "(max_num_seqs): the beams are rows of one batch", K, e->cfg.max_batch);
        if (p->do_sample)
            return fl_err(FL_E_VALUE, "generate: beam search with do_sample=True (beam sampling) is not supported");
        if (p->keep_logits || p->keep_logprob)
            return fl_err(FL_E_VALUE, "generate: a beam search keeps its scores only (not logits or logprobs)");
        if (p->num_return < 0 || p->num_return > K)
            return fl_err(FL_E_VALUE, "generate: num_return_sequences=%d must be at most num_beams=%d", p->num_return, K);
        if (!isfinite(p->length_penalty) || p->early_stopping < 0 || p->early_stopping > 2)
            return fl_err(FL_E_VALUE, "generate: length_penalty must be finite and early_stopping 0, 1 or 2");
        if ((int64_t)per > V)
            return fl_err(FL_E_VALUE, "generate: beam search keeps %d candidates a beam, more than the vocabulary of "
                          "%d tokens", per, V);
    } else if (p->num_beams < 0) {
        return fl_err(FL_E_VALUE, "generate: num_beams=%d must be positive", p->num_beams);
    }
    if (p->top_logprobs < 0 || p->top_logprobs > FL_MAX_TOP_LOGPROBS || p->top_logprobs > V ||
        (p->top_logprobs && !p->keep_logprob))
        return fl_err(FL_E_VALUE, "generate: top_logprobs=%d must be in [0, %d] (with logprobs kept)", p->top_logprobs,
                      FL_MAX_TOP_LOGPROBS < V ? FL_MAX_TOP_LOGPROBS : V);
    fl_request *r = calloc(1, sizeof *r);
    const int64_t want = (int64_t)n + (p->max_new_tokens < e->cfg.max_context ? p->max_new_tokens : e->cfg.max_context) + 1;
    if (r) {
        const int64_t cap = want < (int64_t)e->cfg.max_context + 1 ? want : (int64_t)e->cfg.max_context + 1;
        r->cap = cap < INT_MAX ? (int)cap : INT_MAX; /* a context of 2^31 - 1 tokens: no int overflow */
        r->toks = malloc((size_t)r->cap * 4);
        r->pages = malloc((size_t)e->max_pages * 4);
    }
    const int64_t rec_row = (p->keep_scores ? (int64_t)V : 0) + (p->keep_logits ? (int64_t)V : 0) +
                            (p->keep_logprob ? 1 + 2 * (int64_t)p->top_logprobs : 0);
    if (r && rec_row) { /* blocks of about 64K floats (one row each for vocabulary rows), pointers for every token */
        r->rec_row = (int)rec_row;
        r->rec_blk = rec_row >= 65536 ? 1 : rec_row * 256 <= 65536 ? 256 : (int)(65536 / rec_row);
        r->rec_nblk = (r->cap - n + r->rec_blk - 1) / r->rec_blk;
        r->rec = calloc((size_t)(r->rec_nblk > 0 ? r->rec_nblk : 1), sizeof *r->rec);
    }
    /* one block for p's arrays: bias values (float), then bias offsets, bias tokens, begin bans, forced eos (int32) */
    const int64_t n_gen = p->n_bias ? 2 * (int64_t)p->n_bias + 1 + n_bias_toks : 0;
    const int64_t n_mem = n_gen + p->n_begin_ban + p->n_forced_eos;
    if (r && n_mem) r->gen_mem = malloc((size_t)n_mem * 4);
    if (!r || !r->toks || !r->pages || (r->rec_row && !r->rec) || (n_mem && !r->gen_mem)) {
        if (r) { free(r->toks); free(r->pages); free(r->rec); free(r->gen_mem); }
        free(r);
        return fl_err(FL_E_NOMEM, "generate: cannot allocate the request");
    }
    memcpy(r->toks, ids, (size_t)n * 4);
    r->n_prompt = n;
    r->e = e;
    r->p = *p;
    if (p->n_eos) memcpy(r->eos, p->eos, (size_t)p->n_eos * 4);
    r->p.eos = r->eos;
    if (n_mem) {
        float *fv = r->gen_mem;
        int32_t *iv = (int32_t *)r->gen_mem + p->n_bias;
        if (p->n_bias) {
            memcpy(fv, p->bias, (size_t)p->n_bias * 4);
            memcpy(iv, p->bias_off, (size_t)(p->n_bias + 1) * 4);
            memcpy(iv + p->n_bias + 1, p->bias_toks, (size_t)n_bias_toks * 4);
            r->p.bias = fv;
            r->p.bias_off = iv;
            r->p.bias_toks = iv + p->n_bias + 1;
        }
        iv = (int32_t *)r->gen_mem + n_gen;
        if (p->n_begin_ban) memcpy(iv, p->begin_ban, (size_t)p->n_begin_ban * 4);
        if (p->n_forced_eos) memcpy(iv + p->n_begin_ban, p->forced_eos, (size_t)p->n_forced_eos * 4);
        r->p.begin_ban = iv;
        r->p.forced_eos = iv + p->n_begin_ban;
    }
    fl_rng_seed(&r->rng, p->seed);
    req_cond_init(r);
    r->wake_at = INT_MAX;
    r->refs = 2;
    r->state = RQ_WAITING;
    if (p->num_beams > 1 && beams_make(e, r) != FL_OK) {
        r->refs = 1;
        req_unref(r);
        return fl_err(FL_E_NOMEM, "generate: cannot allocate the beam search's %d beams", p->num_beams);
    }
    *out = r;
    return FL_OK;
}

/* For a submitter holding mu that has queued `queued` requests: a driver is kicked when none drives, and mu is
 * released. Returns 0, or the kick's error with mu taken again and driving cleared (the caller fails what it queued
 * and unlocks). */
static int ensure_driver(fl_engine *e, int queued) {
    const int kick = queued && !e->driving;
    if (kick) e->driving = 1;
    pthread_mutex_unlock(&e->mu);
    if (!kick) return 0;
    const int rc = e->kick(e->kick_ud, e);
    if (rc) {
        pthread_mutex_lock(&e->mu);
        e->driving = 0;
    }
    return rc;
}

fl_status fl_engine_submit_group(fl_engine *e, int B, const int32_t *const *ids, const int *n, const fl_gen_params *p,
                                 fl_request **out) {
    for (int b = 0; b < B; b++) out[b] = NULL;
    if (B <= 0) return FL_OK;
    if (!__atomic_load_n(&e->has_pool, __ATOMIC_ACQUIRE))
        return fl_err(FL_E_VALUE, "engine: generate needs the KV cache pool, which this engine does not have yet "
                      "(fl_engine_add_pool / engine_pool first)");
    fl_status st = FL_OK;
    for (int b = 0; b < B && st == FL_OK; b++) st = req_make(e, ids[b], n[b], &p[b], &out[b]);
    const char *why = NULL;
    int w = 0;
    pthread_mutex_lock(&e->mu);
    if (st == FL_OK && e->closing) why = "closing";
    else if (st == FL_OK && e->cfg.max_waiting > 0 && e->n_waiting + B > e->cfg.max_waiting && e->n_waiting > 0) {
        why = "busy"; /* a group larger than the whole queue is let in when the queue is empty, else it could never run */
        w = e->n_waiting;
    }
    if (st != FL_OK || why) {
        pthread_mutex_unlock(&e->mu);
        for (int b = 0; b < B; b++)
            if (out[b]) { req_discard(out[b]); out[b] = NULL; }
        if (st != FL_OK) return st;
        if (why[0] == 'c') return fl_err(FL_E_INTERRUPTED, "the engine is closing");
        return fl_err(FL_E_BUSY, "the engine's queue is full (%d requests waiting)", w);
    }
    /* all rows enter the queue under one lock: the scheduler sees the group together, so the batches it forms, and
     * with them each row's rounding, do not depend on when the submitting thread got here (a batch submitted row by
     * row could have its first row stepped alone, and sampled tokens then differed from run to run) */
    int queued = 0;
    e->handles += B;
    for (int b = 0; b < B; b++) {
        fl_request *r = out[b];
        if (r->p.max_new_tokens == 0) { /* nothing to generate */
            fl_beams *g = r->bm;
            for (int k = 1; g && k < g->K; k++) { req_unref(g->req[k]); g->req[k] = NULL; }
            r->state = RQ_DONE;
            r->refs = 1;
            continue;
        }
        r->seq = e->next_seq++;
        for (int k = 1; r->bm && k < r->bm->K; k++) r->bm->req[k]->seq = r->seq;
        if (e->wait_tail) e->wait_tail->next = r; else e->wait_head = r;
        e->wait_tail = r;
        e->n_waiting++;
        queued++;
    }
    const int rc = ensure_driver(e, queued);
    if (rc) {
        for (int b = 0; b < B; b++)
            if (out[b]->state == RQ_WAITING) finish(e, out[b], FL_E_INTERNAL, "no driver");
        for (int b = 0; b < B; b++) { /* finish() dropped the engine's reference: this drops the caller's */
            req_unref(out[b]);
            out[b] = NULL;
        }
        e->handles -= B;
        pthread_mutex_unlock(&e->mu);
        errno = rc;
        return fl_err(FL_E_INTERNAL, "engine: cannot start its driver (error %d)", rc);
    }
    return FL_OK;
}

fl_status fl_engine_submit(fl_engine *e, const int32_t *ids, int n, const fl_gen_params *p, fl_request **out) {
    return fl_engine_submit_group(e, 1, &ids, &n, p, out);
}

static fl_status forward_check(const fl_engine *e, const fl_forward_req *f) {
    const int V = e->m->cfg.vocab;
    if (f->B <= 0 || f->T <= 0) return fl_err(FL_E_VALUE, "forward: input_ids is empty");
    if (f->B > INT32_MAX / f->T) return fl_err(FL_E_VALUE, "forward: input_ids of %d x %d tokens is too large", f->B, f->T);
    if (!f->ids || !f->pos || !f->logits) return fl_err(FL_E_VALUE, "forward: no ids, positions or logits buffer");
    for (int64_t i = 0; i < (int64_t)f->B * f->T; i++)
        if (f->ids[i] < 0 || f->ids[i] >= V)
            return fl_err(FL_E_VALUE, "input_ids[%d][%d] = %d is outside the vocabulary [0, %d)", (int)(i / f->T),
                          (int)(i % f->T), (int)f->ids[i], V);
    return FL_OK;
}

fl_status fl_engine_forward_now(fl_engine *e, const fl_forward_req *f) {
    FL_TRY(forward_check(e, f));
    const fl_status st = forward_pass(e, f, NULL); /* returns with mu */
    pthread_mutex_unlock(&e->mu);
    return st;
}

fl_status fl_engine_submit_forward(fl_engine *e, const fl_forward_req *f, fl_request **out) {
    *out = NULL;
    FL_TRY(forward_check(e, f));
    fl_request *r = calloc(1, sizeof *r);
    if (!r) return fl_err(FL_E_NOMEM, "forward: cannot allocate the request");
    r->e = e;
    r->kind = RQ_KIND_FORWARD;
    r->fwd = *f;
    req_cond_init(r);
    r->wake_at = INT_MAX;
    r->refs = 2;
    r->state = RQ_WAITING;
    pthread_mutex_lock(&e->mu);
    if (e->closing) {
        r->refs = 1;
        req_unref(r);
        pthread_mutex_unlock(&e->mu);
        return fl_err(FL_E_INTERRUPTED, "the engine is closing");
    }
    r->seq = e->next_seq++;
    e->handles++;
    if (e->fwd_tail) e->fwd_tail->next = r; else e->fwd_head = r;
    e->fwd_tail = r;
    e->n_fwd_waiting++;
    const int rc = ensure_driver(e, 1);
    if (rc) {
        finish(e, r, FL_E_INTERNAL, "no driver"); /* drops the engine's reference */
        req_unref(r);                             /* and the caller's */
        e->handles--;
        pthread_mutex_unlock(&e->mu);
        errno = rc;
        return fl_err(FL_E_INTERNAL, "engine: cannot start its driver (error %d)", rc);
    }
    *out = r;
    return FL_OK;
}

int fl_request_wait(fl_request *r, int have, int timeout_ms, int *done) {
    fl_engine *e = r->e;
    pthread_mutex_lock(&e->mu);
    struct timespec dl;
    if (timeout_ms >= 0) {
        clock_gettime(r->clk, &dl);
        dl.tv_sec += timeout_ms / 1000;
        dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (dl.tv_nsec >= 1000000000L) { dl.tv_sec++; dl.tv_nsec -= 1000000000L; }
    }
    while (r->n_out <= have && r->state != RQ_DONE) {
        if (have < INT_MAX - 1 && have + 1 < r->wake_at) r->wake_at = have + 1; /* every waiter re-registers after a wake */
        if (timeout_ms < 0) pthread_cond_wait(&r->cv, &e->mu);
        else if (pthread_cond_timedwait(&r->cv, &e->mu, &dl) == ETIMEDOUT) break;
    }
    const int n = r->n_out;
    *done = r->state == RQ_DONE;
    pthread_mutex_unlock(&e->mu);
    return n;
}

int fl_request_n_beams(fl_request *r) {
    pthread_mutex_lock(&r->e->mu);
    const int n = r->bm && r->state == RQ_DONE && r->st == FL_OK ? r->bm->n_ret : 0;
    pthread_mutex_unlock(&r->e->mu);
    return n;
}

int fl_request_beam(fl_request *r, int i, int32_t *dst, int32_t *idx, int cap, float *score) {
    pthread_mutex_lock(&r->e->mu);
    int len = -1;
    const fl_beams *g = r->bm;
    if (g && r->state == RQ_DONE && r->st == FL_OK && i >= 0 && i < g->n_ret) {
        len = g->fin_len[i];
        const size_t n = (size_t)(len < cap ? len : cap) * 4;
        if (dst && cap > 0) memcpy(dst, g->fin_tok + (size_t)i * g->gmax, n);
        if (idx && cap > 0) memcpy(idx, g->fin_hist + (size_t)i * g->gmax, n);
        if (score) *score = g->fin_score[i];
    }
    pthread_mutex_unlock(&r->e->mu);
    return len;
}

int fl_request_beam_width(const fl_request *r) { return r->bm ? r->bm->K : 1; }
int fl_request_vocab(const fl_request *r) { return r->e->m->cfg.vocab; }

int fl_request_beam_scores(fl_request *r, int step, float *dst) {
    pthread_mutex_lock(&r->e->mu);
    const fl_beams *g = r->bm;
    int n = g && r->state == RQ_DONE && r->st == FL_OK && g->sc ? g->n_sc : 0;
    if (dst && step >= 0 && step < n) memcpy(dst, g->sc[step], (size_t)g->K * (size_t)r->e->m->cfg.vocab * sizeof(float));
    pthread_mutex_unlock(&r->e->mu);
    return n;
}

void fl_request_tokens(fl_request *r, int from, int to, int32_t *dst) {
    pthread_mutex_lock(&r->e->mu);
    if (to > r->n_out) to = r->n_out;
    if (from < to) memcpy(dst, r->toks + r->n_prompt + from, (size_t)(to - from) * 4);
    pthread_mutex_unlock(&r->e->mu);
}

int fl_request_record_size(const fl_request *r) { return r->rec_row; }

int fl_request_records(fl_request *r, int from, int to, float *dst) {
    pthread_mutex_lock(&r->e->mu);
    if (to > r->n_out) to = r->n_out;
    pthread_mutex_unlock(&r->e->mu);
    /* rows of counted tokens are never written again and their blocks live as long as the request: copied without mu
     * (a long answer's logits are hundreds of MB; the driver takes mu for every token) */
    const size_t row = (size_t)r->rec_row * sizeof(float);
    for (int i = from; i < to && row; i++)
        memcpy(dst + (size_t)(i - from) * r->rec_row, r->rec[i / r->rec_blk] + (size_t)(i % r->rec_blk) * r->rec_row, row);
    return to > from ? to - from : 0;
}

fl_status fl_request_status(fl_request *r, char *msg, size_t cap) {
    pthread_mutex_lock(&r->e->mu);
    const fl_status st = r->state == RQ_DONE ? r->st : FL_OK;
    if (msg && cap) snprintf(msg, cap, "%s", st != FL_OK ? r->err : "");
    pthread_mutex_unlock(&r->e->mu);
    return st;
}

void fl_request_cancel(fl_request *r) { __atomic_store_n(&r->cancel, 1, __ATOMIC_RELAXED); }

static void engine_destroy(fl_engine *e) { /* the struct itself: nothing can reach it any more */
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->model_mu);
    pthread_cond_destroy(&e->idle_cv);
    free(e);
}

void fl_request_release(fl_request *r) {
    if (!r) return;
    fl_engine *e = r->e;
    pthread_mutex_lock(&e->mu);
    if (r->state != RQ_DONE) __atomic_store_n(&r->cancel, 1, __ATOMIC_RELAXED); /* nobody waits for it any more */
    req_unref(r);
    const int last = --e->handles == 0 && e->retired;
    pthread_mutex_unlock(&e->mu);
    if (last) engine_destroy(e); /* fl_engine_free ran while this request was held */
}

void fl_engine_lock_model(fl_engine *e) { pthread_mutex_lock(&e->model_mu); }
void fl_engine_unlock_model(fl_engine *e) { pthread_mutex_unlock(&e->model_mu); }

void fl_engine_get_stats(fl_engine *e, fl_engine_stats *s) {
    pthread_mutex_lock(&e->mu);
    *s = e->st;
    s->pages_cached = e->pool.n_cached;
    s->pages_used = pages_used(&e->pool);
    s->peak_pages_used = e->pool.peak_used;
    s->waiting = e->n_waiting;
    s->forwards_waiting = e->n_fwd_waiting;
    s->forwards_running = e->fwd_running != NULL;
    s->running = e->n_run;
    pthread_mutex_unlock(&e->mu);
}
