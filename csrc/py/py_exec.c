/* py_exec.c: the process-wide compute thread for CPU-backend work (see py_exec.h for why).
 *
 * One pthread, started on first use, takes jobs from a FIFO (mutex + condition variable) and runs
 * them; the caller waits with the GIL released. Each job carries its status and error message
 * back explicitly: fl_err's buffer is thread-local, so the message is copied from the compute
 * thread's buffer into the job and set again in the caller's buffer.
 *
 * Callbacks are handed to the waiting caller rather than run on the compute thread with
 * PyGILState_Ensure, because:
 *  - the callback runs in the thread that called generate/load, exactly as before: its
 *    exception is raised in that thread state with its traceback untouched, threading.local,
 *    contextvars, current_thread() and PyErr_CheckSignals (main thread only) behave as they did;
 *  - the compute thread never owns a Python thread state, so interpreter shutdown cannot trap it
 *    in PyGILState_Ensure (a daemon thread's job may still be running when Python finalizes);
 *  - a callback that calls another CPU model (a streamer calling forward) runs on the caller's
 *    thread, whose nested call is posted to the paused job and run inline by the compute thread
 *    (the thread waiting for the callback's answer): no deadlock, still one OpenMP team.
 * The hand-off costs two condition-variable wake-ups per callback (microseconds against the
 * milliseconds of a decode step); with no Python callback (no streamer, no progress callback)
 * nothing is handed off at all and Ctrl-C is noticed by the waiting main thread, which wakes
 * every 50 ms to run the signal handlers and cancels the job on KeyboardInterrupt.
 *
 * A callback that waits for another Python thread's CPU model call deadlocks (the compute thread
 * is paused in the callback); a callback may call models itself instead. */
#include "py_exec.h"
#include "pythread.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>

#define FL_EXEC_POLL_NS 50000000L /* the main thread checks for signals every 50 ms */

struct fl_exec_job {
    fl_exec_fn fn;
    void *arg;
    fl_status st;
    char err[FL_ERR_MAX];
    int cancel;             /* read lock-free with __atomic loads; the core polls it through fl_cancel */
    int queued, done, refs; /* under mu */
    int posted;             /* fl_exec_post: nobody waits; fn runs even when cancelled (it must clean up) */
    /* callback hand-off (under mu) */
    int (*cb)(void *);
    void *cb_arg;
    int cb_pending, cb_done, cb_result;
    fl_exec_job *nested;    /* a call posted by the caller from inside a callback, run inline */
    fl_exec_job *next;      /* FIFO link */
    fl_exec_job *up;        /* the job this one runs on top of (stack of running jobs) */
    pthread_cond_t caller_cv, worker_cv;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_cv; /* CLOCK_MONOTONIC, initialised in exec_init */
static fl_exec_job *q_head, *q_tail, *running;
static int started, exiting;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_condattr_t cv_attr;
static unsigned long main_ident; /* threading.main_thread().ident, 0 = not looked up yet */
/* The job whose callback this (caller) thread is running now: a model call made from the
 * callback is nested into it. */
static _Thread_local fl_exec_job *serving;

static void job_release(fl_exec_job *j) { /* under mu */
    if (--j->refs == 0) {
        pthread_cond_destroy(&j->caller_cv);
        pthread_cond_destroy(&j->worker_cv);
        free(j);
    }
}

/* Run a job on this thread (the compute thread, or the thread paused in a callback of the job
 * below it); then mark it done. Called without mu. */
static void job_run(fl_exec_job *j) {
    pthread_mutex_lock(&mu);
    j->up = running;
    running = j;
    const int cancelled = (__atomic_load_n(&j->cancel, __ATOMIC_RELAXED) || exiting) && !j->posted;
    pthread_mutex_unlock(&mu);
    const int *prev = fl_cancel_flag(&j->cancel);
    fl_err_clear();
    fl_status st = cancelled ? fl_err(FL_E_INTERRUPTED, "interrupted") : j->fn(j, j->arg);
    if (st != FL_OK) snprintf(j->err, sizeof j->err, "%s", fl_err_msg());
    fl_err_clear();
    fl_cancel_flag(prev);
    pthread_mutex_lock(&mu);
    running = j->up;
    j->st = st;
    j->done = 1;
    pthread_cond_signal(&j->caller_cv);
    job_release(j);
    pthread_mutex_unlock(&mu);
}

static void *compute_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!q_head) pthread_cond_wait(&queue_cv, &mu);
        fl_exec_job *j = q_head;
        q_head = j->next;
        if (!q_head) q_tail = NULL;
        j->queued = 0;
        pthread_mutex_unlock(&mu);
        job_run(j);
        pthread_mutex_lock(&mu);
    }
    return NULL;
}

/* fork(): the child has no compute thread (and no callers waiting in it). The parent's mutex is
 * taken around fork so the child gets it in a known state; the child starts afresh on first use. */
static void atfork_prepare(void) { pthread_mutex_lock(&mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&mu); }
static void atfork_child(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&queue_cv, &cv_attr);
    q_head = q_tail = running = NULL; /* jobs of the parent's threads; their memory is leaked */
    started = 0;
    main_ident = 0; /* the forking thread is the child's main thread */
    serving = NULL;
}

/* Interpreter exit (the end of Py_FinalizeEx): stop whatever a daemon thread left running or
 * queued, so the compute thread is idle, not inside an OpenMP region, when the process ends. */
static void exec_atexit(void) {
    pthread_mutex_lock(&mu);
    exiting = 1;
    for (fl_exec_job *j = running; j; j = j->up) __atomic_store_n(&j->cancel, 1, __ATOMIC_RELAXED);
    for (fl_exec_job *j = q_head; j; j = j->next) __atomic_store_n(&j->cancel, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&mu);
}

static void exec_init(void) {
    pthread_condattr_init(&cv_attr);
    pthread_condattr_setclock(&cv_attr, CLOCK_MONOTONIC);
    pthread_cond_init(&queue_cv, &cv_attr);
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Under mu. The compute thread (and the OpenMP workers it starts, which inherit its mask) blocks
 * the asynchronous signals: they go to Python's threads, where the main thread handles them. */
static int start_thread(void) {
    sigset_t block, old;
    sigemptyset(&block);
    const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGALRM, SIGUSR1, SIGUSR2, SIGCHLD, SIGPIPE, SIGWINCH};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaddset(&block, sigs[i]);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t tid;
    int rc = pthread_create(&tid, &attr, compute_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return rc;
    started = 1;
    return 0;
}

int fl_exec_in_callback(void) { return serving != NULL; }

int fl_exec_cancelled(const fl_exec_job *job) {
    return __atomic_load_n(&job->cancel, __ATOMIC_RELAXED) || __atomic_load_n(&exiting, __ATOMIC_RELAXED);
}

int fl_exec_callback(fl_exec_job *j, int (*py)(void *), void *arg) {
    if (fl_exec_cancelled(j)) return 1;
    pthread_mutex_lock(&mu);
    j->cb = py;
    j->cb_arg = arg;
    j->cb_done = 0;
    j->cb_pending = 1;
    pthread_cond_signal(&j->caller_cv);
    for (;;) {
        while (!j->cb_done && !j->nested) pthread_cond_wait(&j->worker_cv, &mu);
        if (j->cb_done) break;
        fl_exec_job *n = j->nested; /* a model call made by the callback: run it here, inline */
        j->nested = NULL;
        pthread_mutex_unlock(&mu);
        job_run(n);
        pthread_mutex_lock(&mu);
    }
    const int r = j->cb_result;
    j->cb_done = 0;
    pthread_mutex_unlock(&mu);
    return r;
}

static int is_main_thread(void) { /* GIL held */
    if (!main_ident) {
        PyObject *th = PyImport_ImportModule("threading");
        PyObject *mt = th ? PyObject_CallMethod(th, "main_thread", NULL) : NULL;
        PyObject *id = mt ? PyObject_GetAttrString(mt, "ident") : NULL;
        if (id && PyLong_Check(id)) main_ident = PyLong_AsUnsignedLong(id);
        Py_XDECREF(id); Py_XDECREF(mt); Py_XDECREF(th);
        if (PyErr_Occurred()) PyErr_Clear();
    }
    return main_ident != 0 && main_ident == PyThread_get_thread_ident();
}

/* Remember the first exception (the caller reports it); later ones are dropped. GIL held. */
static void stash_exception(PyObject **et, PyObject **ev, PyObject **etb) {
    if (!PyErr_Occurred()) return;
    if (*et) { PyErr_Clear(); return; }
    PyErr_Fetch(et, ev, etb);
}

int fl_exec_post(fl_exec_fn fn, void *arg) {
    pthread_once(&once, exec_init);
    fl_exec_job *j = calloc(1, sizeof *j);
    if (!j) return ENOMEM;
    j->fn = fn;
    j->arg = arg;
    j->refs = 1; /* the runner's only */
    j->posted = 1;
    pthread_cond_init(&j->caller_cv, &cv_attr);
    pthread_cond_init(&j->worker_cv, &cv_attr);
    pthread_mutex_lock(&mu);
    const int rc = started ? 0 : start_thread();
    if (rc != 0) {
        pthread_mutex_unlock(&mu);
        pthread_cond_destroy(&j->caller_cv);
        pthread_cond_destroy(&j->worker_cv);
        free(j);
        return rc;
    }
    if (exiting) __atomic_store_n(&j->cancel, 1, __ATOMIC_RELAXED);
    j->queued = 1;
    if (q_tail) q_tail->next = j; else q_head = j;
    q_tail = j;
    pthread_cond_signal(&queue_cv);
    pthread_mutex_unlock(&mu);
    return 0;
}

int fl_exec_run(fl_exec_fn fn, void *arg, fl_status *st_out) {
    static int atexit_done;
    pthread_once(&once, exec_init);
    if (!atexit_done) { /* GIL held: no race */
        atexit_done = 1;
        Py_AtExit(exec_atexit);
    }
    const int check_signals = is_main_thread();
    fl_exec_job *j = calloc(1, sizeof *j);
    if (!j) { PyErr_NoMemory(); return -1; }
    j->fn = fn;
    j->arg = arg;
    j->refs = 2; /* the caller and the runner: a daemon caller that Python ends at exit leaks it */
    pthread_cond_init(&j->caller_cv, &cv_attr);
    pthread_cond_init(&j->worker_cv, &cv_attr);
    fl_exec_job *outer = serving;
    pthread_mutex_lock(&mu);
    if (outer) {
        /* Called from a callback of `outer`, whose runner waits for the callback's answer: it runs
         * this job inline (queueing it behind `outer` would never finish). */
        outer->nested = j;
        pthread_cond_signal(&outer->worker_cv);
    } else {
        int rc = started ? 0 : start_thread();
        if (rc != 0) {
            pthread_mutex_unlock(&mu);
            pthread_cond_destroy(&j->caller_cv);
            pthread_cond_destroy(&j->worker_cv);
            free(j);
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        j->queued = 1;
        if (q_tail) q_tail->next = j; else q_head = j;
        q_tail = j;
        pthread_cond_signal(&queue_cv);
    }
    pthread_mutex_unlock(&mu);
    PyObject *et = NULL, *ev = NULL, *etb = NULL;
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&mu);
    while (!j->done) {
        if (j->cb_pending) {
            j->cb_pending = 0;
            int r = 1;
            if (!et && !__atomic_load_n(&j->cancel, __ATOMIC_RELAXED)) {
                pthread_mutex_unlock(&mu);
                PyEval_RestoreThread(ts);
                serving = j;
                r = j->cb(j->cb_arg);
                serving = outer;
                stash_exception(&et, &ev, &etb);
                if (et) r = 1;
                ts = PyEval_SaveThread();
                pthread_mutex_lock(&mu);
            }
            j->cb_result = r;
            j->cb_done = 1;
            pthread_cond_signal(&j->worker_cv);
            continue;
        }
        if (!check_signals || et) {
            pthread_cond_wait(&j->caller_cv, &mu);
            continue;
        }
        struct timespec dl;
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_nsec += FL_EXEC_POLL_NS;
        if (dl.tv_nsec >= 1000000000L) { dl.tv_sec++; dl.tv_nsec -= 1000000000L; }
        if (pthread_cond_timedwait(&j->caller_cv, &mu, &dl) != ETIMEDOUT || j->done || j->cb_pending) continue;
        pthread_mutex_unlock(&mu);
        PyEval_RestoreThread(ts);
        if (PyErr_CheckSignals() < 0) stash_exception(&et, &ev, &etb);
        ts = PyEval_SaveThread();
        pthread_mutex_lock(&mu);
        if (et) {
            __atomic_store_n(&j->cancel, 1, __ATOMIC_RELAXED);
            if (j->queued) { /* not started: take it out of the queue */
                fl_exec_job **pp = &q_head, *prev = NULL;
                while (*pp && *pp != j) { prev = *pp; pp = &(*pp)->next; }
                if (*pp) {
                    *pp = j->next;
                    if (q_tail == j) q_tail = prev;
                    j->queued = 0;
                    j->done = 1;
                    j->st = FL_E_INTERRUPTED;
                    j->refs--; /* the runner's reference (the caller's is released below) */
                }
            }
        }
    }
    const fl_status st = j->st;
    if (st != FL_OK) fl_err(st, "%s", j->err);
    job_release(j);
    pthread_mutex_unlock(&mu);
    PyEval_RestoreThread(ts);
    *st_out = st;
    if (et) {
        fl_err_clear();
        PyErr_Restore(et, ev, etb);
        return -1;
    }
    return 0;
}
