/* engine.h: many callers on one model: a request queue, continuous batching and a paged KV cache.
 *
 * Callers submit requests (a prompt and its own generation settings) from any thread and wait for
 * their tokens; one driver runs the steps. Each step
 *   1. drops cancelled requests and admits waiting ones (FIFO) while the batch has room,
 *   2. runs one prefill chunk (at most prefill_chunk tokens) of the oldest request still reading
 *      its prompt,
 *   3. runs one decode forward over every request that is generating (one new token each, each row
 *      with its own cache length: fl_kv_paging's per-row starts),
 *   4. samples each row with its own settings and random stream, appends the token, wakes waiters,
 *   5. runs the oldest waiting forward request, if any (below).
 * So a newcomer joins at the next step and a finished request leaves at once; a long prompt is
 * read a chunk per step while the others keep decoding.
 *
 * KV memory is one pool of pages of page_tokens slots (fl_kv_create_paged), sized in bytes. A
 * request holds the pages its tokens occupy, taken as it grows, never its max_new_tokens ahead. When
 * the pool runs dry the newest running request is preempted: its pages go back and it waits at the
 * head of the queue to be read again (prompt + what it generated so far); its output is unchanged.
 * Full prompt pages are kept in a prefix table (keyed by the page's tokens and the page before it):
 * a request whose prompt starts with pages already there (a shared system prompt) takes them,
 * reference-counted, and reads only the rest. Pages nobody holds stay in the table until the pool
 * needs them (least recently released first).
 *
 * A forward request (transformers' forward: the logits of every position of B rows of T tokens, with a key mask
 * and positions as given) waits in the same queue, in its own lane: it needs no pool page and no batch row, so it
 * never waits for admission behind generate requests. Each step runs the next chunk of the oldest one after its decode
 * and prefill work: a forward of at most prefill_chunk tokens (B x T) in one pass, a longer one in passes of at most
 * prefill_chunk tokens, one a step (engine.c, forward_chunks), so a running batch waits at most one chunk a step.
 * Its memory: a forward's keys and values matter only inside its own pass, so it takes no pool pages (they would
 * compete with running requests for memory needed for one step, and the paged kernels have no key mask for an
 * arbitrary attention_mask); it gets a transient rectangular cache of exactly B x T slots, made at its first chunk and
 * freed after its last (fl_kv_create / fl_forward: in one pass the same pass, so the same logits, as a forward outside
 * the engine had), outside the pool's budget, reported as fl_model.kv_bytes_last and the stats' forward_kv_peak. Like
 * every step it grows the shared workspace to its rows (a chunk's activations and logit rows), kept for reuse.
 *
 * The pool can come later than the engine (fl_engine_cfg.kv_bytes 0, then fl_engine_add_pool): a model that only
 * runs forwards never holds one, so a forward-only user (evaluation, perplexity) keeps the device memory a pool would
 * take (on CUDA 40% of what is free by default).
 *
 * The driver: fl_engine_run() runs steps until no request is left. Who calls it is the host's
 * choice (a kick callback given at creation): the Python layer runs it on the process's compute
 * thread for CPU models (one OpenMP team) and on a thread of its own for CUDA models. */
#ifndef FL_ENGINE_H
#define FL_ENGINE_H
#include "fl_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fl_engine fl_engine;
typedef struct fl_request fl_request;

typedef struct {
    uint64_t kv_bytes;    /* the page pool's size in bytes (both K and V, every layer); 0: none yet (fl_engine_add_pool) */
    int page_tokens;      /* slots per page, a power of two (default 16) */
    int max_batch;        /* rows of one decode step (default 64) */
    int prefill_chunk;    /* prompt tokens read per step (default 512) */
    int max_waiting;      /* requests that may wait for admission; submit fails with FL_E_BUSY beyond (0: no limit) */
    int max_context;      /* prompt + new tokens of one request (default: the model's max_position_embeddings) */
    int no_prefix_cache;  /* 1: no prompt page is shared or kept (each request reads its whole prompt) */
    int kv_f16;           /* 1: keys and values (the pool's and forwards') stored as float16 (CPU backend only:
                           * fl_kv_dtype_ok); 0: in the backend's activation dtype */
    int preempt_recompute;/* a preempted request, read again: 0 (replay, the default) reads its prompt and then feeds
                           * the tokens it had generated through decode steps, so their keys and values are the same
                           * bits as before (the same kernels); 1 (recompute) reads prompt + generated tokens as one
                           * prompt (fewer steps; other matmul kernels, which round differently: a greedy answer can
                           * then flip in a near-tie) */
} fl_engine_cfg;

/* kick(ud, e): called (without the engine's lock) when a request arrives and no driver runs; it
 * must arrange for fl_engine_run(e) to be called on some thread, and return nonzero if it cannot. */
typedef int (*fl_engine_kick_fn)(void *ud, fl_engine *e);

fl_status fl_engine_create(fl_model *m, const fl_engine_cfg *cfg, fl_engine_kick_fn kick, void *kick_ud, fl_engine **out);
/* Make the page pool of kv_bytes (an engine created with kv_bytes 0); generate requests are refused until then.
 * FL_E_VALUE when it already has one or kv_bytes holds no page; FL_E_NOMEM (with the size) when it cannot be
 * allocated, and the engine stays without a pool. Safe while forwards run; one call at a time. */
fl_status fl_engine_add_pool(fl_engine *e, uint64_t kv_bytes);
/* Cancels every request, waits until no driver is running, frees the pool. The model is not freed. */
void fl_engine_free(fl_engine *e);
/* Run steps until no request is left (the driver). Returns FL_OK; a step's error fails the requests it
 * touched (each gets the message), not the engine. */
fl_status fl_engine_run(fl_engine *e);

/* One step (the driver's unit of work; fl_engine_run loops over it). Returns 1 if requests remain,
 * 0 when the engine went idle (the next submit kicks a driver again). */
int fl_engine_step(fl_engine *e);
/* Mark every request cancelled (each finishes with FL_E_INTERRUPTED at the next step). */
void fl_engine_cancel_all(fl_engine *e);

/* Submit a request: prompt ids[0:n] and settings p (copied, eos ids included). *out holds one
 * reference for the caller (fl_request_release). Errors: FL_E_VALUE (a token out of range, a
 * context longer than max_context, a prompt the whole pool cannot hold), FL_E_BUSY (the queue is
 * full), or what the kick callback reported. */
fl_status fl_engine_submit(fl_engine *e, const int32_t *ids, int n, const fl_gen_params *p, fl_request **out);
/* Submit B requests at once (row b: ids[b][0:n[b]], settings p[b]): all are checked first, then queued together
 * under one lock, so that a generate() call's rows are scheduled as a group whatever the driver was doing; on an
 * error none is queued and out[] is all NULL. A group larger than max_waiting is let in when the queue is empty. */
fl_status fl_engine_submit_group(fl_engine *e, int B, const int32_t *const *ids, const int *n, const fl_gen_params *p,
                                 fl_request **out);
/* A forward request: host arrays, kept alive and unchanged by the caller until the request is finished (also after
 * fl_request_cancel: wait for it to finish before freeing them). */
typedef struct {
    int B, T;               /* rows, tokens per row */
    const int32_t *ids;     /* [B*T] token ids */
    const int32_t *pos;     /* [B*T] positions (rotary) */
    const uint8_t *mask;    /* [B*T] key mask (attention_mask: 1 = may be attended), or NULL */
    float *logits;          /* [B*T, vocab] float32, written by the driver */
} fl_forward_req;
/* Submit a forward (checked first: sizes, every id in the vocabulary: FL_E_VALUE). It is finished with FL_OK once
 * the logits are written, or with the step's error (FL_E_NOMEM when its cache or workspace cannot be allocated),
 * or FL_E_INTERRUPTED when cancelled (also mid-pass: the forward polls its request's cancel flag between layers).
 * Not limited by max_waiting. fl_request_wait(r, 0, ...) waits for it; it has no tokens. */
fl_status fl_engine_submit_forward(fl_engine *e, const fl_forward_req *f, fl_request **out);
/* Run forward f at once on the calling thread, under the engine's model lock, not through the queue: for a host whose
 * driver cannot step until this returns and is not in the middle of a step (a CPU engine whose compute thread is
 * paused in a callback of another job: the queued forward would wait for that callback, which waits for it). The
 * same checks, pass and counts as a queued forward; cancelled through the thread's fl_cancel_flag. */
fl_status fl_engine_forward_now(fl_engine *e, const fl_forward_req *f);
/* Wait until the request has more than `have` tokens or is finished, or timeout_ms passes (< 0:
 * no limit). Returns the number of tokens generated so far; *done is set when it is finished. */
int fl_request_wait(fl_request *r, int have, int timeout_ms, int *done);
/* Copy tokens [from, to) of the output (to <= the count fl_request_wait returned). */
void fl_request_tokens(fl_request *r, int from, int to, int32_t *dst);
/* Floats kept per generated token (fl_gen_params.keep_*; 0: nothing kept), and rows [from, to) of them (to is cut
 * to the tokens generated so far) into dst; returns the rows copied. */
int fl_request_record_size(const fl_request *r);
int fl_request_records(fl_request *r, int from, int to, float *dst);
/* A beam search request (fl_gen_params.num_beams > 1), once finished with FL_OK: its num_return hypotheses, best
 * first (transformers' sequences[:num_return_sequences]). fl_request_n_beams: how many (0 for other requests or
 * before it finished); fl_request_beam: hypothesis i's generated tokens (the eos that ended it included) into
 * dst[0:min(len, cap)], the beam each token came from at its step (transformers' beam_indices, without the batch
 * offset) into idx, its score (sequences_scores) into *score (each may be NULL); returns len, or -1 when there is no
 * such one. fl_request_beam_scores: the steps whose scores were kept (keep_scores; 0 otherwise), and step's
 * [num_beams, vocab] processed log-probs (transformers' scores) into dst when step is one of them. */
int fl_request_n_beams(fl_request *r);
int fl_request_beam(fl_request *r, int i, int32_t *dst, int32_t *idx, int cap, float *score);
int fl_request_beam_scores(fl_request *r, int step, float *dst);
int fl_request_beam_width(const fl_request *r); /* num_beams (1 for other requests) */
int fl_request_vocab(const fl_request *r);
/* A finished request's outcome: FL_OK, or the error (message copied into msg[cap]). */
fl_status fl_request_status(fl_request *r, char *msg, size_t cap);
/* Stop it: the next step drops it and frees its pages; waiters see it finished (FL_E_INTERRUPTED). */
void fl_request_cancel(fl_request *r);
void fl_request_release(fl_request *r);

/* The engine's own lock, held by the driver around each forward pass of a step: a caller that reads the model's
 * backend state outside the engine (rope_freqs, export) takes it so as not to run in the middle of one. */
void fl_engine_lock_model(fl_engine *e);
void fl_engine_unlock_model(fl_engine *e);

typedef struct {
    int n_pages, page_tokens;
    int pages_used;          /* held by requests */
    int pages_cached;        /* in the prefix table, held by nobody (reusable) */
    uint64_t pool_bytes;
    int pool_huge; /* the pool was advised to 2 MiB pages (CPU, FASTLOAD_HUGEPAGES=2) */
    int waiting, running;    /* requests */
    uint64_t steps, decode_rows, prefill_tokens, prefix_hit_tokens, preemptions;
    int peak_pages_used, peak_running;
    int forwards_waiting;    /* forward requests queued (not counted in waiting) */
    int forwards_running;    /* 1 while a step runs one */
    uint64_t forwards;       /* forward requests run to the end (FL_OK) */
    uint64_t forward_tokens; /* their B x T tokens */
    uint64_t forward_chunks; /* passes run for forwards (a forward longer than prefill_chunk tokens takes several) */
    uint64_t forward_kv_peak;/* bytes of the largest transient KV cache a forward made (freed after it) */
    uint64_t pipelined_steps;/* decode steps launched before the tokens of the step before them were read */
    uint64_t wasted_rows;    /* rows such a step computed for a request that had ended meanwhile (dropped) */
    uint64_t replayed_tokens;/* decode rows that recomputed a preempted request's generated tokens (replay mode) */
} fl_engine_stats;
void fl_engine_get_stats(fl_engine *e, fl_engine_stats *s);

#ifdef __cplusplus
}
#endif
#endif
