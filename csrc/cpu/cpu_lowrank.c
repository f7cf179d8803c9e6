/* cpu_lowrank.c: the LoRA merge at load on host memory, w[rows, cols] += scale * (b[rows, r] @ a[r, cols]).
 *
 * PEFT merges with `W += (B @ A) * scaling` in the weight's dtype; for a float32 model that is: the product in
 * float32, then scaled, then added. Each output row here is the same: acc = sum_k b[i, k] * a[k, :] (k in order),
 * acc * scale, added to the widened weight, rounded once to the weight's dtype. r is small (4 to 256), so the r
 * passes over one row of `a` stay in cache; rows split across threads (when not already inside a parallel load). */
#include "cpu_internal.h"
#include <stdlib.h>

fl_status fl_lowrank_add_host(void *w, fl_dtype dt, int64_t rows, int64_t cols, const float *b, const float *a, int r,
                              float scale) {
    if (dt != FL_F32 && dt != FL_F16 && dt != FL_BF16)
        return fl_err(FL_E_UNSUPPORTED, "LoRA merge: weight dtype %d is not float32 / float16 / bfloat16", (int)dt);
    if (rows <= 0 || cols <= 0 || r <= 0) return FL_OK;
    const size_t es = (size_t)fl_dtype_size(dt);
    int64_t bad_row = -1;
#ifdef _OPENMP
    const int par = rows * cols * r > (1 << 20) && !omp_in_parallel();
#else
    const int par = 0;
#endif
#pragma omp parallel if (par)
    {
        float *acc = malloc((size_t)cols * 2 * sizeof(float));
        float *wf = acc ? acc + cols : NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (!acc) { bad_row = -2; continue; }
            const float *bi = b + (size_t)i * (size_t)r;
            for (int64_t c = 0; c < cols; c++) acc[c] = 0.f;
            for (int k = 0; k < r; k++) {
                const float bk = bi[k];
                const float *ak = a + (size_t)k * (size_t)cols;
#pragma omp simd
                for (int64_t c = 0; c < cols; c++) acc[c] += bk * ak[c];
            }
            char *row = (char *)w + (size_t)i * (size_t)cols * es;
            cpu_row_to_f32(wf, row, dt, cols);
            int finite = 1;
            for (int64_t c = 0; c < cols; c++) {
                wf[c] += acc[c] * scale;
                finite &= isfinite(wf[c]);
            }
            fl_convert(row, dt, wf, FL_F32, (size_t)cols);
            if (dt == FL_F16) /* float16 overflows far below float32 */
                for (int64_t c = 0; c < cols; c++) finite &= fabsf(wf[c]) < 65520.f; /* rounds to inf from here on */
            if (!finite) {
#pragma omp critical(fl_lowrank)
                if (bad_row == -1 || (bad_row >= 0 && i < bad_row)) bad_row = i;
            }
        }
        free(acc);
    }
    if (bad_row == -2) return fl_err(FL_E_NOMEM, "LoRA merge: cannot allocate a row buffer");
    if (bad_row >= 0)
        return fl_err(FL_E_VALUE, "LoRA merge gives non-finite %s values (first in row %lld; scale %g): lora_alpha too "
                      "large, or NaN / inf in the adapter", fl_dtype_table[dt].np_name, (long long)bad_row, (double)scale);
    return FL_OK;
}

fl_status cpu_add_lowrank(fl_backend *be, void *w_d, fl_dtype dt, int64_t rows, int64_t cols, const float *b_d,
                          const float *a_d, int r, float scale) {
    (void)be;
    return fl_lowrank_add_host(w_d, dt, rows, cols, b_d, a_d, r, scale);
}
