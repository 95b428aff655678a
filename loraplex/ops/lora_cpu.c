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
 *
 * Also here (AVX-512 only; docs/kernels.md, "On CPU: SiLU*up in C" and the sections after
 * it): the elementwise passes the base model runs too, each with the LoRA work next to it
 * fused in: the gated MLP's activation silu(gate) * up with the gate/up expand
 * (lp_silu_mul_f32, lp_expand_silu_mul_f32), RMSNorm with its residual add and the expand
 * and shrink on either side (lp_add_rms_norm_f32), the rotary embedding with the qkv expand
 * (lp_rotary_f32), at the end of this file.
 */
#include <omp.h>
#include <math.h>
#include <stdint.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n,
                         const int *k, const float *alpha, const float *a, const int *lda,
                         const float *b, const int *ldb, const float *beta, float *c,
                         const int *ldc);

/* An AVX-512 shrink kernel, used when the CPU has AVX-512 and the caller allows it
 * (simd != 0), else the BLAS GEMM. Why: with 16-48 output columns the BLAS GEMM runs well
 * below its square-GEMM rate; blocks of 6 x 4 dot products keep 24 accumulators in registers
 * for 10 loads per 24 FMAs (benchmarks/bench_cpu_parts.py part (g) times both). The expand
 * stays the BLAS GEMM on long items from memory: a kernel that gathers B's 32-column tiles
 * transposed into L1 and walks y's rows per tile is slower there (y read column tile by
 * column tile defeats the prefetchers), but faster on the blocks of at most 32 rows that the
 * norms and the rotary expand in cache (expand_avx512; part (k) times both). */
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


/* exp(x) in float32 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r
 * is exact), exp(r) by a degree-6 polynomial (Cephes' expf coefficients), times 2^n by
 * scalef. x is clamped to [-104, 104], past which the float result is 0 or inf anyway
 * (scalef gives them, denormals included); a NaN stays NaN in the callers (x / (1 + e)). */
LP_TARGET LP_INLINE __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* silu(g) * u, SiLU as torch writes it: g / (1 + exp(-g)) */
LP_TARGET LP_INLINE __m512 silu_mul_vec(__m512 g, __m512 u) {
  const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

LP_TARGET LP_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* out[q, :] = silu(y[q, :I] + dg[q]) * (y[q, I:] + du[q]) for `rows` rows, the deltas read
 * from memory (row stride ldd; NULL: no delta on that half) */
LP_TARGET static void silu_mul_rows(const float *y, int64_t ldy, const float *dg,
                                    const float *du, int64_t ldd, int64_t inter, int64_t rows,
                                    float *out, int64_t ldo) {
  for (int64_t q = 0; q < rows; q++) {
    const float *g = y + q * ldy;
    for (int64_t j = 0; j < inter; j += 16) {
      const __mmask16 m = tail_mask(inter - j);
      __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, g + inter + j);
      if (dg) gv = _mm512_add_ps(gv, _mm512_maskz_loadu_ps(m, dg + q * ldd + j));
      if (du) uv = _mm512_add_ps(uv, _mm512_maskz_loadu_ps(m, du + q * ldd + j));
      _mm512_mask_storeu_ps(out + q * ldo + j, m, silu_mul_vec(gv, uv));
    }
  }
}

/* For NQ rows of an item (pointers clamped past `rows`, nothing stored there):
 *   out[q, j] = silu(y[q, j] + h[q, :rg] . btg[:, j])
 *             * (y[q, I + j] + h[q, R : R + ru] . btu[:, j])
 * btg / btu: the slot's B slices transposed and scaled, [rg, I] and [ru, I]. Each 16-column
 * strip's deltas stay in registers (2 x NQ accumulators) until the activation reads them. */
LP_TARGET LP_INLINE void silu_mul_block(const float *h, int64_t ldh, int64_t big_r, int rg,
                                        int ru, const float *btg, const float *btu,
                                        int64_t inter, const float *y, int64_t ldy, float *out,
                                        int64_t ldo, int rows, const int NQ) {
  const float *hr[8];
  for (int q = 0; q < NQ; q++) hr[q] = h + (q < rows ? q : rows - 1) * ldh;
  for (int64_t j = 0; j < inter; j += 16) {
    const __mmask16 m = tail_mask(inter - j);
    __m512 ag[8], au[8];
    for (int q = 0; q < NQ; q++) ag[q] = au[q] = _mm512_setzero_ps();
    for (int k = 0; k < rg; k++) {
      const __m512 bv = _mm512_maskz_loadu_ps(m, btg + k * inter + j);
      for (int q = 0; q < NQ; q++) ag[q] = _mm512_fmadd_ps(_mm512_set1_ps(hr[q][k]), bv, ag[q]);
    }
    for (int k = 0; k < ru; k++) {
      const __m512 bv = _mm512_maskz_loadu_ps(m, btu + k * inter + j);
      for (int q = 0; q < NQ; q++)
        au[q] = _mm512_fmadd_ps(_mm512_set1_ps(hr[q][big_r + k]), bv, au[q]);
    }
    for (int q = 0; q < NQ && q < rows; q++) {
      const float *g = y + q * ldy + j;
      const __m512 gv = _mm512_add_ps(_mm512_maskz_loadu_ps(m, g), ag[q]);
      const __m512 uv = _mm512_add_ps(_mm512_maskz_loadu_ps(m, g + inter), au[q]);
      _mm512_mask_storeu_ps(out + q * ldo + j, m, silu_mul_vec(gv, uv));
    }
  }
}

/* bt[k, j] = alpha * b[j, k] for k < r, j < inter (b's rows have stride big_r) */
static void transpose_scaled(const float *b, int64_t big_r, int r, int64_t inter, float alpha,
                             float *bt) {
  for (int64_t j0 = 0; j0 < inter; j0 += 64) {
    const int64_t j1 = j0 + 64 < inter ? j0 + 64 : inter;
    for (int k = 0; k < r; k++)
      for (int64_t j = j0; j < j1; j++) bt[k * inter + j] = alpha * b[j * big_r + k];
  }
}

/* One item's rows through silu_mul_block, 8 at a time (then 4, then 2). */
LP_TARGET static void silu_mul_item(const float *h, int64_t ldh, int64_t big_r, int rg, int ru,
                                    const float *btg, const float *btu, int64_t inter,
                                    const float *y, int64_t ldy, float *out, int64_t ldo,
                                    int64_t rows) {
  for (int64_t q0 = 0; q0 < rows;) {
    const int64_t left = rows - q0;
    const float *hq = h + q0 * ldh, *yq = y + q0 * ldy;
    float *oq = out + q0 * ldo;
    if (left >= 8) {
      silu_mul_block(hq, ldh, big_r, rg, ru, btg, btu, inter, yq, ldy, oq, ldo, 8, 8);
      q0 += 8;
    } else if (left >= 4) {
      silu_mul_block(hq, ldh, big_r, rg, ru, btg, btu, inter, yq, ldy, oq, ldo, (int)left, 4);
      q0 += 4;
    } else {
      silu_mul_block(hq, ldh, big_r, rg, ru, btg, btu, inter, yq, ldy, oq, ldo, (int)left, 2);
      q0 += 2;
    }
  }
}

/* The expand on AVX-512 CPUs, for blocks of LP_EXPAND_MIN_ROWS to LP_EXPAND_MAX_ROWS rows (the
 * norms' and the rotary's blocks, in cache) and ranks up to LP_EXPAND_MAX_R:
 * y[q, j] += alpha * sum_k h[q, k] * b[j, k] for q < rows, j < m, k < r (b's rows have stride
 * big_r). Why: with a rank-16 inner dimension the BLAS GEMM runs far below its square-GEMM
 * rate on a 32-row block; on longer items from memory (128 rows) it is the faster one
 * (benchmarks/bench_cpu_parts.py part (k) times both). Per 32 columns, b's [32, r] tile is
 * gathered transposed into bt [r][32] (L1), then 4 rows at a time take r steps of 2 loads of
 * bt and 4 broadcasts of h for 8 FMAs into registers, and y is read and written once
 * (alpha * acc + y, one FMA, as the GEMM scales its sum). */
#define LP_EXPAND_MAX_R 64
#define LP_EXPAND_MIN_ROWS 8
#define LP_EXPAND_MAX_ROWS 32
LP_TARGET static void expand_avx512(const float *h, int64_t ldh, const float *b, int64_t big_r,
                                    int r, float alpha, int m, int rows, float *y,
                                    int64_t ldy) {
  float bt[LP_EXPAND_MAX_R * 32] __attribute__((aligned(64)));
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                           5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)big_r));
  const __m512 va = _mm512_set1_ps(alpha);
  for (int j0 = 0; j0 < m; j0 += 32) {
    const __mmask16 m0 = tail_mask(m - j0), m1 = tail_mask(m - j0 - 16 > 0 ? m - j0 - 16 : 0);
    const float *b0 = b + (int64_t)j0 * big_r, *b1 = b0 + 16 * big_r;
    for (int k = 0; k < r; k++) { /* bt[k] = b[j0 : j0 + 32, k] */
      _mm512_store_ps(bt + k * 32,
                      _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, lane, b0 + k, 4));
      _mm512_store_ps(bt + k * 32 + 16,
                      m1 ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, lane, b1 + k, 4)
                         : _mm512_setzero_ps());
    }
    for (int q0 = 0; q0 < rows; q0 += 4) {
      const float *hr[4];
      for (int i = 0; i < 4; i++) hr[i] = h + (q0 + i < rows ? q0 + i : rows - 1) * ldh;
      __m512 acc[4][2];
      for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      for (int k = 0; k < r; k++) {
        const __m512 v0 = _mm512_load_ps(bt + k * 32), v1 = _mm512_load_ps(bt + k * 32 + 16);
        for (int i = 0; i < 4; i++) {
          const __m512 hv = _mm512_set1_ps(hr[i][k]);
          acc[i][0] = _mm512_fmadd_ps(hv, v0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(hv, v1, acc[i][1]);
        }
      }
      for (int i = 0; i < 4 && q0 + i < rows; i++) {
        float *yr = y + (q0 + i) * ldy + j0;
        _mm512_mask_storeu_ps(yr, m0, _mm512_fmadd_ps(va, acc[i][0],
                                                      _mm512_maskz_loadu_ps(m0, yr)));
        if (m1)
          _mm512_mask_storeu_ps(yr + 16, m1, _mm512_fmadd_ps(va, acc[i][1],
                                                             _mm512_maskz_loadu_ps(m1, yr + 16)));
      }
    }
  }
}

/* RMSNorm with its residual add, in one pass per row (the base model's on CPU float32:
 * elementwise.cpu_rms_norm, which the LoRA path below extends):
 *   x[q] += res[q] (res NULL: no add; x is then only read)
 *   out[q] = (x[q] * (1 / sqrt(mean(x[q]^2) + eps))) * w
 * rounded as torch's float32 RMSNorm rounds (the sum of squares is summed in another order:
 * within an ulp or two of torch's). */
LP_TARGET static void add_rms_rows(float *x, int64_t ldx, const float *res, int64_t ldr,
                                   const float *w, float eps, int64_t hidden, int64_t rows,
                                   float *out, int64_t ldo) {
  for (int64_t q = 0; q < rows; q++) {
    float *xr = x + q * ldx;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < hidden; j += 16) {
      const __mmask16 m = tail_mask(hidden - j);
      __m512 v = _mm512_maskz_loadu_ps(m, xr + j);
      if (res) {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + q * ldr + j));
        _mm512_mask_storeu_ps(xr + j, m, v);
      }
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)hidden
                                                   + eps));
    for (int64_t j = 0; j < hidden; j += 16) {
      const __mmask16 m = tail_mask(hidden - j);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), inv);
      _mm512_mask_storeu_ps(out + q * ldo + j, m,
                            _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + j)));
    }
  }
}

/* Rotary embedding in place, in Hugging Face Llama's half-split layout, for `rows` rows of
 * `heads` heads of d values (head stride ldhd):
 *   x[q, h] = x[q, h] * cos[q] + rotate_half(x[q, h]) * sin[q],  rotate_half(v) = (-v2, v1)
 * each product rounded, then the sum, as torch's ops round them (bit for bit: the library is
 * built with -ffp-contract=off, so no FMA fuses them). cos / sin: one row of d per row of x. */
LP_TARGET static void rotary_rows(float *x, int64_t ldx, int64_t heads, int64_t ldhd,
                                  int64_t d, const float *cos, int64_t ldc, const float *sin,
                                  int64_t lds, int64_t rows) {
  const int64_t half = d / 2;
  for (int64_t q = 0; q < rows; q++) {
    const float *c = cos + q * ldc, *s = sin + q * lds;
    for (int64_t hd = 0; hd < heads; hd++) {
      float *v = x + q * ldx + hd * ldhd;
      for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = tail_mask(half - j);
        const __m512 v1 = _mm512_maskz_loadu_ps(m, v + j);
        const __m512 v2 = _mm512_maskz_loadu_ps(m, v + half + j);
        const __m512 r1 = _mm512_sub_ps(
            _mm512_mul_ps(v1, _mm512_maskz_loadu_ps(m, c + j)),
            _mm512_mul_ps(v2, _mm512_maskz_loadu_ps(m, s + j)));
        const __m512 r2 = _mm512_add_ps(
            _mm512_mul_ps(v2, _mm512_maskz_loadu_ps(m, c + half + j)),
            _mm512_mul_ps(v1, _mm512_maskz_loadu_ps(m, s + half + j)));
        _mm512_mask_storeu_ps(v + j, m, r1);
        _mm512_mask_storeu_ps(v + half + j, m, r2);
      }
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

/* One item's shrink: out[rows, i*R : i*R + r] = x[rows] @ a[slot, i*R : i*R + r].T (x and out
 * already point at the item's first row) */
static void shrink_item(sgemm_fn gemm, int simd, const float *x, int64_t ldx, const float *a,
                        int64_t n_r, int64_t in_f, const int32_t *rk, int64_t n, int64_t big_r,
                        int rows, float *out, int64_t ldo) {
  int full = 1;
  for (int64_t i = 0; i < n; i++) full &= rk[i] == big_r;
  if (full) { /* every slice at full rank: one GEMM over the stacked rows of A */
    shrink_gemm(gemm, simd, x, ldx, a, in_f, (int)n_r, rows, out, ldo);
    return;
  }
  for (int64_t i = 0; i < n; i++)
    if (rk[i] > 0)
      shrink_gemm(gemm, simd, x, ldx, a + i * big_r * in_f, in_f, rk[i], rows, out + i * big_r,
                  ldo);
}

/* out[rows, i*R : i*R + r] = x[rows] @ a[slot, i*R : i*R + r].T  (beta 0: out is not read) */
void lp_shrink_f32(sgemm_fn gemm, int simd, int threads, const float *x, int64_t ldx,
                   const float *a, int64_t n_r, int64_t in_f, const int32_t *ranks, int64_t n,
                   int64_t big_r, const int64_t *items, int64_t n_items, float *out, int64_t ldo) {
  simd = simd && has_avx512();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2];
    shrink_item(gemm, simd, x + start * ldx, ldx, a + slot * n_r * in_f, n_r, in_f,
                ranks + slot * n, n, big_r, (int)items[3 * it + 1], out + start * ldo, ldo);
  }
}

/* One block of an item: y[rows, cols_i] += scalings[i] * h[rows, i*R : i*R + r] @
 * b[cols_i, :r].T for each slice i (b, ranks and scalings already at the item's slot; h and y
 * at its first row): the AVX-512 kernel where allowed (simd) and the block is long enough,
 * else the BLAS GEMM */
static void expand_rows(sgemm_fn gemm, int simd, const float *h, int64_t ldh, const float *b,
                        int64_t big_r, const int32_t *rk, const float *sc, int64_t n,
                        const int64_t *offsets, int rows, float *y, int64_t ldy) {
  const int lda = (int)big_r, ldb = (int)ldh, ldc = (int)ldy;
  const float one = 1.0f;
  for (int64_t i = 0; i < n; i++) {
    const int r = rk[i], m = (int)(offsets[i + 1] - offsets[i]);
    if (r <= 0 || m <= 0) continue;
#ifdef LP_X86
    if (simd && rows >= LP_EXPAND_MIN_ROWS && rows <= LP_EXPAND_MAX_ROWS &&
        r <= LP_EXPAND_MAX_R) {
      expand_avx512(h + i * big_r, ldh, b + offsets[i] * big_r, big_r, r, sc[i], m, rows,
                    y + offsets[i], ldy);
      continue;
    }
#else
    (void)simd;
#endif
    gemm("T", "N", &m, &rows, &r, &sc[i], b + offsets[i] * big_r, &lda, h + i * big_r, &ldb,
         &one, y + offsets[i], &ldc);
  }
}

/* y[rows, cols_i] += scalings[slot, i] * h[rows, i*R : i*R + r] @ b[slot, cols_i, :r].T */
void lp_expand_f32(sgemm_fn gemm, int simd, int threads, const float *h, int64_t ldh,
                   const float *b, int64_t out_f, int64_t big_r, const int32_t *ranks,
                   const float *scalings, int64_t n, const int64_t *offsets,
                   const int64_t *items, int64_t n_items, float *y, int64_t ldy) {
  simd = simd && has_avx512();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2];
    expand_rows(gemm, simd, h + start * ldh, ldh, b + slot * out_f * big_r, big_r,
                ranks + slot * n, scalings + slot * n, n, offsets, (int)items[3 * it + 1],
                y + start * ldy, ldy);
  }
}


/* The gated MLP's activation, out[rows] = silu(y[rows, :I]) * y[rows, I:] (the base model's
 * on CPU float32: elementwise.cpu_silu_mul). Returns -1 without writing when this CPU
 * lacks AVX-512 (its exp is vectorised here). */
int lp_silu_mul_f32(int threads, const float *y, int64_t ldy, int64_t inter, int64_t rows,
                    float *out, int64_t ldo) {
#ifdef LP_X86
  if (!has_avx512()) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
  for (int64_t q0 = 0; q0 < rows; q0 += 16)
    silu_mul_rows(y + q0 * ldy, ldy, NULL, NULL, 0, inter, rows - q0 < 16 ? rows - q0 : 16,
                  out + q0 * ldo, ldo);
  return 0;
#else
  (void)threads; (void)y; (void)ldy; (void)inter; (void)rows; (void)out; (void)ldo;
  return -1;
#endif
}

/* The gate/up projection's LoRA expand fused into that activation:
 *   out[rows, :] = silu(y[rows, :I] + dg) * (y[rows, I:] + du)
 *   dg = scalings[slot, 0] * h[rows, :r0] @ b[slot, :I, :r0].T   (du: slice 1, rows I..2I of b)
 * for the items' rows; items of slot -1 get the activation alone. Why: the unfused expand
 * reads and rewrites all of y ([T, 2I], the largest activation of a layer) only for the
 * activation to read it once more. Here an item of LP_FUSED_ROWS rows or more first transposes (and
 * scales) its slot's B into a per-thread scratch, [r, I] per half, so that a 16-column strip
 * of the delta is r FMAs of a broadcast h value by one row of it, for 8 rows at once, in
 * registers, and the activation then reads y once. A shorter item (decode: one or two rows
 * per sequence) would spend more on that transpose than on its rows: it gets its delta from
 * the BLAS GEMM into a small scratch instead. `scratch`: lp_fused_scratch_floats(inter,
 * big_r) floats per thread. Returns -1 without writing when this CPU lacks AVX-512 (the caller
 * then runs the unfused expand and the activation). */
#define LP_FUSED_ROWS 8
#define LP_SHRINK_ROWS 32
/* floats of scratch each thread of lp_expand_silu_mul_f32 needs (the caller allocates them
 * once: no allocation per call) */
int64_t lp_fused_scratch_floats(int64_t inter, int64_t big_r) {
  return 2 * inter * (big_r + LP_FUSED_ROWS);
}

int lp_expand_silu_mul_f32(sgemm_fn gemm, int threads, const float *h, int64_t ldh,
                           const float *b, int64_t inter, int64_t big_r, const int32_t *ranks,
                           const float *scalings, const int64_t *items, int64_t n_items,
                           const float *y, int64_t ldy, float *out, int64_t ldo,
                           float *scratch, const float *a2, int64_t n_r2, const int32_t *ranks2,
                           int64_t n2, int64_t big_r2, float *h2, int64_t ldh2, int simd) {
#ifdef LP_X86
  if (!has_avx512()) return -1;
  simd = simd && has_avx512();
#pragma omp parallel num_threads(threads) if (n_items > 1)
  {
    /* this thread's scratch: bt [2][R][I], the transposed halves of B; d [LP_FUSED_ROWS][2I],
     * a short item's delta */
    float *bt = scratch + omp_get_thread_num() * lp_fused_scratch_floats(inter, big_r);
    float *d = bt + 2 * big_r * inter;
    int64_t have = -1; /* the slot whose B is in bt */
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; it++) {
      const int64_t start = items[3 * it], slot = items[3 * it + 2], len = items[3 * it + 1];
      if (slot < 0) { /* rows without an adapter: the activation alone, as lp_silu_mul_f32 */
        silu_mul_rows(y + start * ldy, ldy, NULL, NULL, 0, inter, len, out + start * ldo, ldo);
        continue;
      }
      const int r[2] = {ranks[slot * 2] > 0 ? ranks[slot * 2] : 0,
                        ranks[slot * 2 + 1] > 0 ? ranks[slot * 2 + 1] : 0};
      const float *bs = b + slot * 2 * inter * big_r; /* [2I, R] */
      if (len < LP_FUSED_ROWS) {
        const float *half[2] = {NULL, NULL};
        for (int i = 0; i < 2; i++) {
          if (!r[i]) continue;
          const int m = (int)inter, n = (int)len, lda = (int)big_r, ldb = (int)ldh,
                    ldc = (int)(2 * inter);
          const float zero = 0.0f;
          gemm("T", "N", &m, &n, &r[i], &scalings[slot * 2 + i], bs + i * inter * big_r, &lda,
               h + start * ldh + i * big_r, &ldb, &zero, d + i * inter, &ldc);
          half[i] = d + i * inter;
        }
        silu_mul_rows(y + start * ldy, ldy, half[0], half[1], 2 * inter, inter, len,
                      out + start * ldo, ldo);
        if (a2)
          shrink_item(gemm, simd, out + start * ldo, ldo, a2 + slot * n_r2 * inter, n_r2, inter,
                      ranks2 + slot * n2, n2, big_r2, (int)len, h2 + start * ldh2, ldh2);
        continue;
      }
      if (slot != have) {
        for (int i = 0; i < 2; i++)
          if (r[i])
            transpose_scaled(bs + i * inter * big_r, big_r, r[i], inter, scalings[slot * 2 + i],
                             bt + i * big_r * inter);
        have = slot;
      }
      /* LP_SHRINK_ROWS rows at a time, so that the next projection's shrink (a2) finds
       * them in cache */
      for (int64_t q0 = 0; q0 < len; q0 += LP_SHRINK_ROWS) {
        const int64_t q = start + q0, nq = len - q0 < LP_SHRINK_ROWS ? len - q0 : LP_SHRINK_ROWS;
        silu_mul_item(h + q * ldh, ldh, big_r, r[0], r[1], bt, bt + big_r * inter, inter,
                      y + q * ldy, ldy, out + q * ldo, ldo, nq);
        if (a2)
          shrink_item(gemm, simd, out + q * ldo, ldo, a2 + slot * n_r2 * inter, n_r2, inter,
                      ranks2 + slot * n2, n2, big_r2, (int)nq, h2 + q * ldh2, ldh2);
      }
    }
  }
  return 0;
#else
  (void)gemm; (void)threads; (void)h; (void)ldh; (void)b; (void)inter; (void)big_r;
  (void)ranks; (void)scalings; (void)items; (void)n_items; (void)y; (void)ldy; (void)out;
  (void)ldo; (void)scratch; (void)a2; (void)n_r2; (void)ranks2; (void)n2; (void)big_r2;
  (void)h2; (void)ldh2; (void)simd;
  return -1;
#endif
}

/* RMSNorm with its residual add (add_rms_rows) over `rows` rows; with LoRA work items, the
 * adds of the LoRA deltas on either side of it as well (lora_cpu.lora_add_rms_norm):
 *   before: the delta of the projection that wrote x (the attention's o or the MLP's down),
 *     x[rows] += scalings[slot] * h[rows, :r] @ b[slot, :, :r].T  (b NULL: none), expand_rows
 *     (as lp_expand_f32), on LP_SHRINK_ROWS rows at a time, which the add and the
 *     norm then read from cache (the unfused expand reads and rewrites all of x first);
 *   after: the shrink of the projection that reads out (the next qkv or gate/up),
 *     h2[rows] = out[rows] @ a2[slot].T  (a2 NULL: none), on each block the norm just wrote.
 * items NULL: the norm alone, over all rows; else every row is in one item, items of slot -1
 * get the norm alone. Returns -1 without writing when this CPU lacks AVX-512. */
int lp_add_rms_norm_f32(sgemm_fn gemm, int threads, int simd, float *x, int64_t ldx,
                        const float *res, int64_t ldr, const float *w, float eps, int64_t hidden,
                        int64_t rows, float *out, int64_t ldo, const int64_t *items,
                        int64_t n_items, const float *h, int64_t ldh, const float *b,
                        int64_t big_r, const int32_t *ranks, const float *scalings,
                        const float *a2, int64_t n_r2, const int32_t *ranks2, int64_t n2,
                        int64_t big_r2, float *h2, int64_t ldh2) {
#ifdef LP_X86
  if (!has_avx512()) return -1;
  simd = simd && has_avx512();
  const int64_t one_slice[2] = {0, hidden};
  if (!items) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t q0 = 0; q0 < rows; q0 += 16)
      add_rms_rows(x + q0 * ldx, ldx, res ? res + q0 * ldr : NULL, ldr, w, eps, hidden,
                   rows - q0 < 16 ? rows - q0 : 16, out + q0 * ldo, ldo);
    return 0;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2], len = items[3 * it + 1];
    const int r = slot >= 0 && b ? ranks[slot] : 0;
    for (int64_t q0 = 0; q0 < len; q0 += LP_SHRINK_ROWS) {
      const int64_t q = start + q0;
      const int nq = (int)(len - q0 < LP_SHRINK_ROWS ? len - q0 : LP_SHRINK_ROWS);
      if (r > 0)
        expand_rows(gemm, simd, h + q * ldh, ldh, b + slot * hidden * big_r, big_r,
                    ranks + slot, scalings + slot, 1, one_slice, nq, x + q * ldx, ldx);
      add_rms_rows(x + q * ldx, ldx, res ? res + q * ldr : NULL, ldr, w, eps, hidden, nq,
                   out + q * ldo, ldo);
      if (slot >= 0 && a2)
        shrink_item(gemm, simd, out + q * ldo, ldo, a2 + slot * n_r2 * hidden, n_r2, hidden,
                    ranks2 + slot * n2, n2, big_r2, nq, h2 + q * ldh2, ldh2);
    }
  }
  return 0;
#else
  (void)gemm; (void)threads; (void)simd; (void)x; (void)ldx; (void)res; (void)ldr; (void)w;
  (void)eps; (void)hidden; (void)rows; (void)out; (void)ldo; (void)items; (void)n_items;
  (void)h; (void)ldh; (void)b; (void)big_r; (void)ranks; (void)scalings; (void)a2;
  (void)n_r2; (void)ranks2; (void)n2; (void)big_r2; (void)h2; (void)ldh2;
  return -1;
#endif
}

/* Rotary embedding in place (rotary_rows) over `rows` rows of x (lora_cpu.lora_rotary_, the
 * base model's on CPU float32 as well); with LoRA work items, first the expand of the
 * projection whose output x is a view of (qkv: y, of which x is the q and k heads),
 *   y[rows, cols_i] += scalings[slot, i] * h[rows, i*R : i*R + r] @ b[slot, cols_i, :r].T
 * (b NULL: none), on LP_SHRINK_ROWS rows at a time, which the rotary then reads from cache
 * (the unfused expand reads and rewrites all of y first). items NULL: the rotary alone, over
 * all rows; else every row is in one item (slot -1: the rotary alone). Returns -1 without
 * writing when this CPU lacks AVX-512. */
int lp_rotary_f32(sgemm_fn gemm, int simd, int threads, float *x, int64_t ldx, int64_t heads,
                  int64_t ldhd, int64_t d, int64_t rows, const float *cos, int64_t ldc,
                  const float *sin, int64_t lds, const int64_t *items, int64_t n_items,
                  float *y, int64_t ldy, const float *h, int64_t ldh, const float *b,
                  int64_t out_f, int64_t big_r, const int32_t *ranks, const float *scalings,
                  int64_t n, const int64_t *offsets) {
#ifdef LP_X86
  if (!has_avx512()) return -1;
  simd = simd && has_avx512();
  if (!items) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t q0 = 0; q0 < rows; q0 += 16)
      rotary_rows(x + q0 * ldx, ldx, heads, ldhd, d, cos + q0 * ldc, ldc, sin + q0 * lds, lds,
                  rows - q0 < 16 ? rows - q0 : 16);
    return 0;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
  for (int64_t it = 0; it < n_items; it++) {
    const int64_t start = items[3 * it], slot = items[3 * it + 2], len = items[3 * it + 1];
    for (int64_t q0 = 0; q0 < len; q0 += LP_SHRINK_ROWS) {
      const int64_t q = start + q0;
      const int nq = (int)(len - q0 < LP_SHRINK_ROWS ? len - q0 : LP_SHRINK_ROWS);
      if (slot >= 0 && b)
        expand_rows(gemm, simd, h + q * ldh, ldh, b + slot * out_f * big_r, big_r,
                    ranks + slot * n, scalings + slot * n, n, offsets, nq, y + q * ldy, ldy);
      rotary_rows(x + q * ldx, ldx, heads, ldhd, d, cos + q * ldc, ldc, sin + q * lds, lds, nq);
    }
  }
  return 0;
#else
  (void)gemm; (void)simd; (void)threads; (void)x; (void)ldx; (void)heads; (void)ldhd; (void)d;
  (void)rows; (void)cos; (void)ldc; (void)sin; (void)lds; (void)items; (void)n_items; (void)y;
  (void)ldy;
  (void)h; (void)ldh; (void)b; (void)out_f; (void)big_r; (void)ranks; (void)scalings; (void)n;
  (void)offsets;
  return -1;
#endif
}
