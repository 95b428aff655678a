/* The CPU LoRA ops (backend "cpu", loraplex/ops/lora_cpu.py): float32 shrink and expand over a
 * batch's work items, one OpenMP parallel region per call, one single-threaded BLAS GEMM per
 * (item, slice). Semantics: loraplex/ops/lora_ref.py. Built at first use by
 * loraplex/ops/native_build.py; the GEMM is torch's own BLAS (its exported Fortran `sgemm_`,
 * passed in by pointer), so this library links to nothing but the C and OpenMP runtimes.
 *
 * Why: the torch backend makes one library GEMM call per (segment, slice) from Python, and at
 * two or more threads each of those small calls is a fork/join of the whole thread team, plus
 * a few microseconds of dispatch. Here the team forks once per call and each thread runs whole
 * GEMMs on its own rows (a GEMM called inside a parallel region runs on its thread alone).
 *
 * Layouts (row-major; the Fortran GEMM sees each matrix transposed, column-major):
 *   items  [n_items, 3] int64: (first row, rows, slot); rows of one item are one adapter's
 *   x      [T, in_f], row stride ldx            a  [S, n*R, in_f] contiguous
 *   out/h  [T, n*R], row stride ldo / ldh       b  [S, out_f, R] contiguous
 *   y      [T, out_f], row stride ldy           ranks [S, n] int32, scalings [S, n] float32
 *   offsets [n + 1] int64: slice i is columns offsets[i] .. offsets[i+1] of y
 * Items never share rows, so the threads write disjoint rows of out / y.
 */
#include <stdint.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n,
                         const int *k, const float *alpha, const float *a, const int *lda,
                         const float *b, const int *ldb, const float *beta, float *c,
                         const int *ldc);

/* out[rows, i*R : i*R + r] = x[rows] @ a[slot, i*R : i*R + r].T  (beta 0: out is not read) */
void lp_shrink_f32(sgemm_fn gemm, const float *x, int64_t ldx, const float *a, int64_t n_r,
                   int64_t in_f, const int32_t *ranks, int64_t n, int64_t big_r,
                   const int64_t *items, int64_t n_items, float *out, int64_t ldo) {
#pragma omp parallel for schedule(dynamic, 1) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2];
    const int rows = (int)items[3 * it + 1], k = (int)in_f, lda = (int)in_f;
    const int ldb = (int)ldx, ldc = (int)ldo;
    const float one = 1.0f, zero = 0.0f;
    const int32_t *rk = ranks + slot * n;
    int full = 1;
    for (int64_t i = 0; i < n; i++) full &= rk[i] == big_r;
    if (full) { /* every slice at full rank: one GEMM over the stacked rows of A */
      const int m = (int)n_r;
      gemm("T", "N", &m, &rows, &k, &one, a + slot * n_r * in_f, &lda, x + start * ldx, &ldb,
           &zero, out + start * ldo, &ldc);
      continue;
    }
    for (int64_t i = 0; i < n; i++) {
      const int m = rk[i];
      if (m <= 0) continue;
      gemm("T", "N", &m, &rows, &k, &one, a + (slot * n_r + i * big_r) * in_f, &lda,
           x + start * ldx, &ldb, &zero, out + start * ldo + i * big_r, &ldc);
    }
  }
}

/* y[rows, cols_i] += scalings[slot, i] * h[rows, i*R : i*R + r] @ b[slot, cols_i, :r].T */
void lp_expand_f32(sgemm_fn gemm, const float *h, int64_t ldh, const float *b, int64_t out_f,
                   int64_t big_r, const int32_t *ranks, const float *scalings, int64_t n,
                   const int64_t *offsets, const int64_t *items, int64_t n_items, float *y,
                   int64_t ldy) {
#pragma omp parallel for schedule(dynamic, 1) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2];
    const int rows = (int)items[3 * it + 1], lda = (int)big_r, ldb = (int)ldh, ldc = (int)ldy;
    const float one = 1.0f;
    for (int64_t i = 0; i < n; i++) {
      const int r = ranks[slot * n + i], m = (int)(offsets[i + 1] - offsets[i]);
      if (r <= 0 || m <= 0) continue;
      const float alpha = scalings[slot * n + i];
      gemm("T", "N", &m, &rows, &r, &alpha, b + (slot * out_f + offsets[i]) * big_r, &lda,
           h + start * ldh + i * big_r, &ldb, &one, y + start * ldy + offsets[i], &ldc);
    }
  }
}
