/* membw.c: read bandwidth of this machine (the ceiling for CPU decode), OpenMP over all cores.
 * Sums a large float array (far larger than the last-level cache) with vectorised float adds, ten
 * times; prints GB/s of the best run. Build: cc -O3 -march=native -fopenmp membw.c */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    size_t bytes = (argc > 1 ? strtoull(argv[1], 0, 10) : 1ull << 30);
    size_t n = bytes / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) return 1;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023) * 1e-3f;
    double best = 1e30, sink = 0;
    for (int rep = 0; rep < 10; rep++) {
        double t0 = omp_get_wtime();
        float s = 0;
        /* float accumulation in SIMD lanes: the loop must be bound by memory, not by adds */
#pragma omp parallel for simd schedule(static) reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double t = omp_get_wtime() - t0;
        sink += s;
        if (t < best) best = t;
    }
    printf("{\"read_GBps\": %.3f, \"bytes\": %zu, \"threads\": %d, \"sink\": %g}\n", bytes / best / 1e9, bytes,
           omp_get_max_threads(), sink);
    free(a);
    return 0;
}
