/* py_exec.h: the process-wide compute thread for CPU-backend work.
 *
 * libgomp keeps one OpenMP thread team per OS thread that ever ran a parallel region; as soon as
 * more libgomp threads exist than CPUs it makes every team spin briefly and then sleep on futexes,
 * so a CPU model called from several Python threads (or from one thread that is not the thread of
 * the previous calls) decodes much slower than the same calls from a loop. Every OpenMP-using core
 * call of a CPU model therefore runs on one pthread, whichever Python thread asks: only one team
 * ever exists. CUDA models do not come here (their CUDA context is per caller thread).
 *
 * Callbacks (stream tokens, load progress) run Python code; the compute thread never touches
 * Python: it hands each callback to the caller, which waits with the GIL released and runs it in
 * its own thread with the GIL (see py_exec.c for why). */
#ifndef FL_PY_EXEC_H
#define FL_PY_EXEC_H
#include "py_common.h"

typedef struct fl_exec_job fl_exec_job;

/* The work of one job: runs on the compute thread (or an OpenMP thread of its team for
 * callbacks); returns a core status, the message in that thread's fl_err buffer. */
typedef fl_status (*fl_exec_fn)(fl_exec_job *job, void *arg);

/* Run fn(job, arg) on the compute thread and wait for it. Called with the GIL held; releases it
 * while waiting. Returns 0 with *st set (on failure the message is in this thread's fl_err
 * buffer, ready for fl_py_raise), or -1 with a Python exception set: a callback's own exception,
 * or KeyboardInterrupt when Ctrl-C arrived while the main thread waited (the job was stopped
 * first). A call made from inside a callback of a running job (a streamer calling forward) runs
 * at once on the compute thread, nested in the paused job, instead of queueing behind it. */
int fl_exec_run(fl_exec_fn fn, void *arg, fl_status *st);

/* For core callbacks of a running job (any thread of the job): run py(arg) on the waiting
 * caller's thread with the GIL held and return its result; 1 (stop) when the job was cancelled.
 * Calls for one job must not overlap (the core calls progress under a critical section). */
int fl_exec_callback(fl_exec_job *job, int (*py)(void *arg), void *arg);

/* Queue fn(job, arg) on the compute thread without waiting for it (no GIL needed; no callbacks).
 * fn runs even when the job is cancelled (interpreter exit): it checks fl_exec_cancelled and must
 * release what it holds. Returns 0, or an errno value if the thread cannot be started. */
int fl_exec_post(fl_exec_fn fn, void *arg);

/* Nonzero once the job should stop (Ctrl-C in the waiting caller, interpreter exit). */
int fl_exec_cancelled(const fl_exec_job *job);

/* Nonzero when this (caller) thread is running a callback of a compute-thread job: the compute thread is paused in
 * that job, so work posted to it (fl_exec_post: a CPU engine's steps) cannot run until the callback returns; a call
 * that must wait for such work runs it through fl_exec_run instead, which nests it into the paused job. */
int fl_exec_in_callback(void);

#endif
