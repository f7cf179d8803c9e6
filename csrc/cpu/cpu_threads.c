/* cpu_threads.c: how many threads the CPU backend's ops use while other processes keep cores busy.
 *
 * Every OpenMP region ends at a barrier that waits for its slowest thread, and a decode step runs a few hundred
 * regions (several a layer). When another process holds one of the cores, one of our threads gets a share of a core:
 * each barrier then waits for the scheduler to give that thread its turn, while the thread that is done spins.
 * Measured on the 2-core VM, demo model (Q4_1, 64 greedy tokens): 100 tok/s idle with 2 threads; with one other
 * process spinning on a core, 30-35 tok/s with 2 threads and 84-88 tok/s with 1; OMP_WAIT_POLICY=passive gives
 * 58-69 busy but 80 idle. llama.cpp's answer is a thread count the user lowers by hand (-t).
 *
 * So with threads=0 (the default: "all cores"), a few times a second at the start of a forward, the backend reads how
 * busy the cores it may run on were since the last look (/proc/stat, only the CPUs in its affinity mask, busy =
 * user + nice + system + irq + softirq + steal), takes off its own process's CPU time (its spinning threads included),
 * and runs on the cores the others left, floor(free + 0.25), at least 1 and at most n_threads. Each kernel splits its
 * work by rows or fixed chunks and never by the thread count, so the outputs are the same bits at any count: this
 * changes speed only. Nor past the CPU limit of the process's cgroups (a container's --cpus, a Kubernetes limit: see
 * cpu_cgroup_limit), which holds from the backend's creation on. A window longer than CPU_ADAPT_STALE (the engine sat
 * idle) is not trusted: the next one starts there. Not Linux, /proc/stat unreadable, or a thread count given: n_threads, always. FASTLOAD_ADAPT_THREADS=0 turns
 * it off. */
#define _GNU_SOURCE
#include "cpu_internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sched.h>
#endif

#define CPU_ADAPT_WINDOW 0.3 /* seconds between looks */
#define CPU_ADAPT_STALE 2.0  /* a longer window (no forwards for a while) only restarts the measurement */

typedef struct {
    double t0, own0;          /* window start: monotonic and process-CPU seconds */
    unsigned long long busy0; /* busy ticks of the CPUs in the affinity mask at t0 */
    double hz;                /* ticks a second (/proc/stat counts in USER_HZ) */
    int ncpu;                 /* CPUs in the affinity mask */
    int limit;                /* the cgroups' CPU limit, rounded up (0: none) */
    int have;                 /* t0 / own0 / busy0 are set */
#ifdef __linux__
    cpu_set_t mask;
#endif
} cpu_adapt_t;

static double now_s(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#ifdef __linux__
/* Busy ticks, summed over the CPUs in A's mask; 0 when /proc/stat cannot be read or has none of them. */
static int read_busy(const cpu_adapt_t *A, unsigned long long *busy) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return 0;
    char line[512];
    unsigned long long sum = 0;
    int seen = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "cpu", 3)) break; /* the per-CPU lines come first; "intr" and the rest are long */
        int id;
        unsigned long long v[8] = {0};
        if (sscanf(line + 3, "%d %llu %llu %llu %llu %llu %llu %llu %llu", &id, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                   &v[6], &v[7]) < 8)
            continue; /* the aggregate "cpu " line, or one too short to hold irq and softirq */
        if (id < 0 || id >= CPU_SETSIZE || !CPU_ISSET(id, &A->mask)) continue;
        /* user nice system idle iowait irq softirq steal: guest time is inside user already */
        sum += v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        seen++;
    }
    fclose(f);
    *busy = sum;
    return seen > 0;
}

/* ---- CPU limits of the process's cgroups (a container's --cpus, a Kubernetes CPU limit, systemd's CPUQuota) ----
 * The scheduler gives the whole group quota/period CPUs' worth of time a period, however many cores the machine (and
 * OpenMP) sees: 64 threads under a limit of 2 run in bursts and then all stop until the next period, and every barrier
 * waits for a stopped thread. So the default count never goes past ceil(quota / period) of the tightest cgroup from the
 * process's own up to its hierarchy's root (cgroup v2 cpu.max; v1 cpu.cfs_quota_us / cpu.cfs_period_us). */

/* "Q P" (v2 cpu.max: "max P" is no limit) or the v1 pair: CPUs (rounded up), 0 for none or unreadable */
static int read_limit(const char *dir, int v2) {
    char path[4352 + 32]; /* dir (at most 4351 bytes) and the file name: no truncation */
    long long q = -1, per = 0;
    FILE *f;
    if (v2) {
        snprintf(path, sizeof path, "%s/cpu.max", dir);
        if (!(f = fopen(path, "r"))) return 0;
        char qs[32] = {0};
        if (fscanf(f, "%31s %lld", qs, &per) != 2 || !strcmp(qs, "max")) q = -1;
        else q = strtoll(qs, NULL, 10);
        fclose(f);
    } else {
        snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", dir);
        if (!(f = fopen(path, "r"))) return 0;
        if (fscanf(f, "%lld", &q) != 1) q = -1;
        fclose(f);
        snprintf(path, sizeof path, "%s/cpu.cfs_period_us", dir);
        if (!(f = fopen(path, "r"))) return 0;
        if (fscanf(f, "%lld", &per) != 1) per = 0;
        fclose(f);
    }
    if (q <= 0 || per <= 0) return 0;
    const long long n = (q + per - 1) / per;
    return n > 4096 ? 4096 : (int)n;
}

/* The tightest limit from `dir` (a cgroup directory under `mnt`) up to `mnt`; 0 for none */
static int walk_limits(char *dir, size_t mnt_len, int v2) {
    int best = 0;
    for (;;) {
        const int n = read_limit(dir, v2);
        if (n > 0 && (best == 0 || n < best)) best = n;
        char *slash = strrchr(dir, '/');
        if (strlen(dir) <= mnt_len || !slash || (size_t)(slash - dir) < mnt_len) break;
        *slash = 0;
    }
    return best;
}

/* Is `opt` one of the comma-separated words of `list`? */
static int has_word(const char *list, const char *opt) {
    const size_t n = strlen(opt);
    for (const char *p = list; p && *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, opt, n)) return 1;
        p = e ? e + 1 : NULL;
    }
    return 0;
}

/* CPUs' worth of time the process's cgroups allow, rounded up; 0 when there is no limit (or none could be read) */
int cpu_cgroup_limit(void) {
    char v2path[2048] = "", v1path[2048] = "", line[4096];
    int have2 = 0, have1 = 0;
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) { /* "0::/path" (v2) or "N:cpu,cpuacct:/path" (v1) */
        line[strcspn(line, "\n")] = 0;
        char *a = strchr(line, ':'), *b = a ? strchr(a + 1, ':') : NULL;
        if (!a || !b) continue;
        *a = *b = 0;
        if (!strcmp(line, "0") && a + 1 == b) {
            snprintf(v2path, sizeof v2path, "%s", b + 1);
            have2 = 1;
        } else if (has_word(a + 1, "cpu")) {
            snprintf(v1path, sizeof v1path, "%s", b + 1);
            have1 = 1;
        }
    }
    fclose(f);
    if (!(f = fopen("/proc/self/mountinfo", "r"))) return 0;
    int best = 0;
    while (fgets(line, sizeof line, f)) { /* "id parent dev ROOT MOUNTPOINT opts ... - FSTYPE SOURCE SUPEROPTS" */
        char root[1024], mnt[1024], fstype[64], super[512];
        const char *dash = strstr(line, " - ");
        if (!dash || sscanf(line, "%*s %*s %*s %1023s %1023s", root, mnt) != 2 ||
            sscanf(dash + 3, "%63s %*s %511s", fstype, super) != 2)
            continue;
        const int v2 = !strcmp(fstype, "cgroup2");
        if (!(v2 && have2) && !(!strcmp(fstype, "cgroup") && have1 && has_word(super, "cpu"))) continue;
        const char *cg = v2 ? v2path : v1path;
        const size_t rl = strcmp(root, "/") ? strlen(root) : 0; /* the part of the hierarchy this mount shows */
        if (rl && strncmp(cg, root, rl)) continue;
        char dir[4352];
        snprintf(dir, sizeof dir, "%s%s", mnt, strcmp(cg + rl, "/") ? cg + rl : "");
        const int n = walk_limits(dir, strlen(mnt), v2);
        if (n > 0 && (best == 0 || n < best)) best = n;
    }
    fclose(f);
    return best;
}

/* n threads, within 1 .. n_threads and the cgroups' limit */
static int clamp_threads(const fl_backend *be, const cpu_adapt_t *A, int n) {
    if (n > be->n_threads) n = be->n_threads;
    if (A->limit > 0 && n > A->limit) n = A->limit;
    return n < 1 ? 1 : n;
}
#endif

static void cpu_step_begin(fl_backend *be) {
    cpu_adapt_t *A = (cpu_adapt_t *)be->impl;
    if (!A) return;
#ifdef __linux__
    const double t = now_s(CLOCK_MONOTONIC);
    if (A->have && t - A->t0 < CPU_ADAPT_WINDOW) return;
    unsigned long long busy;
    const double own = now_s(CLOCK_PROCESS_CPUTIME_ID);
    if (!read_busy(A, &busy)) { /* /proc/stat went away (a chroot, a sandbox): all threads (the limit's) from now on */
        be->threads_now = clamp_threads(be, A, be->n_threads);
        free(A);
        be->impl = NULL;
        return;
    }
    if (A->have && t - A->t0 <= CPU_ADAPT_STALE && busy >= A->busy0) {
        const double wall = t - A->t0;
        double others = ((double)(busy - A->busy0) / A->hz - (own - A->own0)) / wall; /* cores others kept busy */
        if (others < 0) others = 0;
        be->threads_now = clamp_threads(be, A, (int)((double)A->ncpu - others + 0.25));
    }
    A->t0 = t;
    A->own0 = own;
    A->busy0 = busy;
    A->have = 1;
#else
    (void)be;
#endif
}

void cpu_threads_init(fl_backend *be, int adapt) {
    be->threads_now = be->n_threads;
    be->impl = NULL;
    be->step_begin = NULL;
#ifdef __linux__
    const char *env = getenv("FASTLOAD_ADAPT_THREADS");
    if (!adapt || be->n_threads <= 1 || (env && !strcmp(env, "0"))) return;
    cpu_adapt_t *A = calloc(1, sizeof *A);
    if (!A) return; /* not worth failing the backend for */
    long hz = sysconf(_SC_CLK_TCK);
    A->hz = hz > 0 ? (double)hz : 100.0;
    if (sched_getaffinity(0, sizeof A->mask, &A->mask) != 0) {
        free(A);
        return;
    }
    A->ncpu = CPU_COUNT(&A->mask);
    unsigned long long busy;
    if (A->ncpu < 1 || !read_busy(A, &busy)) {
        free(A);
        return;
    }
    A->limit = cpu_cgroup_limit();
    be->threads_now = clamp_threads(be, A, be->n_threads); /* the limit holds from the first forward on */
    be->impl = A;
    be->step_begin = cpu_step_begin;
#else
    (void)adapt;
#endif
}

void cpu_threads_free(fl_backend *be) {
    free(be->impl);
    be->impl = NULL;
}
