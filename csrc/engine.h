/* engine.h: many callers on one model: a request queue, continuous batching and a paged KV cache.
 *
 * Callers submit requests (a prompt and its own generation settings) from any thread and wait for
 * their tokens; one driver runs the steps. Each step
 *   1. drops cancelled requests and admits waiting ones (FIFO) while the batch has room,
 *   2. runs one prefill chunk (at most prefill_chunk tokens) of the oldest request still reading
 *      its prompt,
 *   3. runs one decode forward over every request that is generating (one new token each, each row
 *      with its own cache length: fl_kv_paging's per-row starts),
 *   4. samples each row with its own settings and random stream, appends the token, wakes waiters.
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
    uint64_t kv_bytes;    /* the page pool's size in bytes (both K and V, every layer) */
    int page_tokens;      /* slots per page, a power of two (default 16) */
    int max_batch;        /* rows of one decode step (default 64) */
    int prefill_chunk;    /* prompt tokens read per step (default 512) */
    int max_waiting;      /* requests that may wait for admission; submit fails with FL_E_BUSY beyond (0: no limit) */
    int max_context;      /* prompt + new tokens of one request (default: the model's max_position_embeddings) */
    int no_prefix_cache;  /* 1: no prompt page is shared or kept (each request reads its whole prompt) */
} fl_engine_cfg;

/* kick(ud, e): called (without the engine's lock) when a request arrives and no driver runs; it
 * must arrange for fl_engine_run(e) to be called on some thread, and return nonzero if it cannot. */
typedef int (*fl_engine_kick_fn)(void *ud, fl_engine *e);

fl_status fl_engine_create(fl_model *m, const fl_engine_cfg *cfg, fl_engine_kick_fn kick, void *kick_ud, fl_engine **out);
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
/* Wait until the request has more than `have` tokens or is finished, or timeout_ms passes (< 0:
 * no limit). Returns the number of tokens generated so far; *done is set when it is finished. */
int fl_request_wait(fl_request *r, int have, int timeout_ms, int *done);
/* Copy tokens [from, to) of the output (to <= the count fl_request_wait returned). */
void fl_request_tokens(fl_request *r, int from, int to, int32_t *dst);
/* A finished request's outcome: FL_OK, or the error (message copied into msg[cap]). */
fl_status fl_request_status(fl_request *r, char *msg, size_t cap);
/* Stop it: the next step drops it and frees its pages; waiters see it finished (FL_E_INTERRUPTED). */
void fl_request_cancel(fl_request *r);
void fl_request_release(fl_request *r);

/* The engine's own lock around a forward pass that does not go through it (fl_forward on the same
 * model's workspace), so it cannot run in the middle of a step. */
void fl_engine_lock_model(fl_engine *e);
void fl_engine_unlock_model(fl_engine *e);

typedef struct {
    int n_pages, page_tokens;
    int pages_used;          /* held by requests */
    int pages_cached;        /* in the prefix table, held by nobody (reusable) */
    uint64_t pool_bytes;
    int waiting, running;    /* requests */
    uint64_t steps, decode_rows, prefill_tokens, prefix_hit_tokens, preemptions;
    int peak_pages_used, peak_running;
} fl_engine_stats;
void fl_engine_get_stats(fl_engine *e, fl_engine_stats *s);

#ifdef __cplusplus
}
#endif
#endif
