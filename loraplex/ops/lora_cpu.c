/* The CPU LoRA ops (backend "cpu", loraplex/ops/lora_cpu.py): float32 shrink and expand over a
 * batch's work items, one OpenMP parallel region per call, one single-threaded BLAS GEMM per
 * (item, slice) (an AVX-512 kernel for the shrink where the CPU has it). Semantics:
 * loraplex/ops/lora_ref.py. Built at first use by
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
 * Items never share rows, so the threads write disjoint rows of out / y. `threads` is torch's
 * intra-op thread count, passed in: OpenMP's default is per calling thread (the machine's
 * core count in a thread torch.set_num_threads never ran in).
 */
#include <stdint.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n,
                         const int *k, const float *alpha, const float *a, const int *lda,
                         const float *b, const int *ldb, const float *beta, float *c,
                         const int *ldc);

/* An AVX-512 shrink kernel, used when the CPU has AVX-512 and the caller allows it
 * (simd != 0), else the BLAS GEMM. Why: with 16-48 output columns the BLAS GEMM runs well
 * below its square-GEMM rate; blocks of 6 x 4 dot products keep 24 accumulators in registers
 * for 10 loads per 24 FMAs (benchmarks/bench_cpu_parts.py part (g) times both). The expand
 * stays the BLAS GEMM: a kernel that transposed B's 32-column tiles into L1 and walked y's
 * rows per tile was slower in an unscripted probe (y read column tile by column tile defeats
 * the prefetchers). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LP_X86 1
#define LP_TARGET __attribute__((target("avx512f")))
#define LP_INLINE static inline __attribute__((always_inline))

static int has_avx512(void) { return __builtin_cpu_supports("avx512f"); }
/* shrink blocks: BI rows of x by BJ rows of a, BI * BJ accumulators (24 of the 32 zmm
 * registers; picked over 4 x 4, 8 x 2, 8 x 3 and 4 x 6 in an unscripted probe) */
#define BI 6
#define BJ 4

/* out[i, j] = sum_k x[i, k] * a[j, k] for NI rows x NJ rows of a (rows past the edge are
 * computed from clamped pointers and not stored: ni, nj are the valid counts). */
LP_TARGET LP_INLINE void dot_block(const float *x, int64_t ldx, int ni, const float *a,
                                   int64_t lda, int nj, int k_len, float *out, int64_t ldo,
                                   const int NI, const int NJ) {
  const float *xr[8], *ar[8];
  __m512 acc[8][8];
  for (int i = 0; i < NI; i++) xr[i] = x + (i < ni ? i : ni - 1) * ldx;
  for (int j = 0; j < NJ; j++) ar[j] = a + (j < nj ? j : nj - 1) * lda;
  for (int i = 0; i < NI; i++)
    for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= k_len; k += 16) {
    __m512 av[8];
    for (int j = 0; j < NJ; j++) av[j] = _mm512_loadu_ps(ar[j] + k);
    for (int i = 0; i < NI; i++) {
      const __m512 xv = _mm512_loadu_ps(xr[i] + k);
      for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_fmadd_ps(xv, av[j], acc[i][j]);
    }
  }
  if (k < k_len) {
    const __mmask16 m = (__mmask16)((1u << (k_len - k)) - 1u);
    __m512 av[8];
    for (int j = 0; j < NJ; j++) av[j] = _mm512_maskz_loadu_ps(m, ar[j] + k);
    for (int i = 0; i < NI; i++) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr[i] + k);
      for (int j = 0; j < NJ; j++) acc[i][j] = _mm512_fmadd_ps(xv, av[j], acc[i][j]);
    }
  }
  for (int i = 0; i < ni && i < NI; i++)
    for (int j = 0; j < nj && j < NJ; j++) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* out[rows, :m] = x[rows] @ a[:m].T; blocks of BI x BJ (2 x 8 for one or two rows: decode) */
LP_TARGET static void shrink_avx512(const float *x, int64_t ldx, const float *a, int64_t lda,
                                    int m, int k_len, int rows, float *out, int64_t ldo) {
  const int few = rows <= 2, bi = few ? 2 : BI, bj = few ? 8 : BJ;
  for (int i0 = 0; i0 < rows; i0 += bi) {
    const int ni = rows - i0 < bi ? rows - i0 : bi;
    for (int j0 = 0; j0 < m; j0 += bj) {
      const int nj = m - j0 < bj ? m - j0 : bj;
      if (few)
        dot_block(x + i0 * ldx, ldx, ni, a + j0 * lda, lda, nj, k_len, out + i0 * ldo + j0, ldo,
                  2, 8);
      else
        dot_block(x + i0 * ldx, ldx, ni, a + j0 * lda, lda, nj, k_len, out + i0 * ldo + j0, ldo,
                  BI, BJ);
    }
  }
}

#else
static int has_avx512(void) { return 0; }
#endif

/* The kernel this library was built with and this CPU runs: 1 = AVX-512 shrink, 0 = BLAS. */
int lp_simd_level(void) { return has_avx512(); }

/* out[rows, :m] = x[rows] @ a[:m].T (out's old values are not read): the AVX-512 kernel
 * where allowed, else the BLAS GEMM (column-major: out.T = a . x.T) */
static void shrink_gemm(sgemm_fn gemm, int simd, const float *x, int64_t ldx, const float *a,
                        int64_t k_len, int m, int rows, float *out, int64_t ldo) {
#ifdef LP_X86
  if (simd) {
    shrink_avx512(x, ldx, a, k_len, m, (int)k_len, rows, out, ldo);
    return;
  }
#else
  (void)simd;
#endif
  const int k = (int)k_len, lda = (int)k_len, ldb = (int)ldx, ldc = (int)ldo;
  const float one = 1.0f, zero = 0.0f;
  gemm("T", "N", &m, &rows, &k, &one, a, &lda, x, &ldb, &zero, out, &ldc);
}

/* out[rows, i*R : i*R + r] = x[rows] @ a[slot, i*R : i*R + r].T  (beta 0: out is not read) */
void lp_shrink_f32(sgemm_fn gemm, int simd, int threads, const float *x, int64_t ldx,
                   const float *a, int64_t n_r, int64_t in_f, const int32_t *ranks, int64_t n,
                   int64_t big_r, const int64_t *items, int64_t n_items, float *out, int64_t ldo) {
  simd = simd && has_avx512();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2];
    const int rows = (int)items[3 * it + 1];
    const int32_t *rk = ranks + slot * n;
    int full = 1;
    for (int64_t i = 0; i < n; i++) full &= rk[i] == big_r;
    if (full) { /* every slice at full rank: one GEMM over the stacked rows of A */
      shrink_gemm(gemm, simd, x + start * ldx, ldx, a + slot * n_r * in_f, in_f, (int)n_r, rows,
                  out + start * ldo, ldo);
      continue;
    }
    for (int64_t i = 0; i < n; i++)
      if (rk[i] > 0)
        shrink_gemm(gemm, simd, x + start * ldx, ldx, a + (slot * n_r + i * big_r) * in_f, in_f,
                    rk[i], rows, out + start * ldo + i * big_r, ldo);
  }
}

/* y[rows, cols_i] += scalings[slot, i] * h[rows, i*R : i*R + r] @ b[slot, cols_i, :r].T */
void lp_expand_f32(sgemm_fn gemm, int threads, const float *h, int64_t ldh, const float *b,
                   int64_t out_f, int64_t big_r, const int32_t *ranks, const float *scalings,
                   int64_t n, const int64_t *offsets, const int64_t *items, int64_t n_items,
                   float *y, int64_t ldy) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
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
