/* bf16.c: matrix products with bf16-resident weights and float32
 * activations, accumulated in float32.
 *
 * Dimension legend: W (n_out, n_in) row-major bf16 bits (uint16), row
 * stride n_in; x (T, n_in) float32; out (T, n_out) float32.
 *
 * A bf16 value is the top half of a float32, so widening is a 16-bit shift
 * and exact: the products are those of float32 arithmetic on the
 * bf16-rounded weights (what transformers computes when it runs a bf16
 * checkpoint in float32). AVX512-BF16's dot product is not used: it would
 * round the activations to bf16 as well.
 *
 * Decode (T = 1) is a matrix-vector product, bound by reading W: rows are
 * split over pcasurgery's threads (pool.c), each thread reading its rows
 * one after another (one sequential stream) in whole 32- or 64-byte loads,
 * the bf16 pairs of each 32-bit lane widened by a shift and a mask against
 * a copy of x permuted to match (rows_eo, rows_eo_avx2): FMA in 8 (AVX2) or
 * 16 (AVX-512F) lanes, chosen at run time (the wheel is built without
 * -march). Prefill widens blocks of W's rows into a float32
 * buffer and multiplies them with OpenBLAS's sgemm: the widening costs one
 * pass over W per chunk of T tokens, small against 2 T flops per weight.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "pcasurgery.h"

#if defined(__GNUC__) && !defined(__clang__)
/* GCC's -O2 does not vectorise loops of unknown length (see convert.c) */
#define VECTORISE __attribute__((optimize("tree-vectorize", "vect-cost-model=cheap")))
#else
#define VECTORISE
#endif

#include "simd.h"

static inline float bf16_value(uint16_t h)
{
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* s + the products of elements i..n-1: every kernel's scalar tail */
static inline float dot_tail(float s, const uint16_t *w, const float *x, size_t i, size_t n)
{
    for (; i < n; i++)
        s += bf16_value(w[i]) * x[i];
    return s;
}

static float dot_generic(const uint16_t *w, const float *x, size_t n)
{
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += bf16_value(w[i + k]) * x[i + k];
    float s = 0.0f;
    for (int k = 0; k < 8; k++)
        s += acc[k];
    return dot_tail(s, w, x, i, n);
}

/* out[0..3] = rows w, w + ld, w + 2 ld, w + 3 ld dotted with x. Each row's
 * sum is the single-row kernel's, bit for bit: a row's value never depends
 * on which rows it was computed with (so 1 and 2 threads agree exactly). */
static void dot4_generic(float *out, const uint16_t *w, size_t ld, const float *x, size_t n,
                         const uint16_t *ahead)
{
    (void)ahead;
    for (int r = 0; r < 4; r++)
        out[r] = dot_generic(w + (size_t)r * ld, x, n);
}

#ifdef PCS_X86
/* dot_avx2 and dot4_avx2 (rows longer than EO_MAX, and the AVX2 kernel of
 * earlier versions) keep two accumulators per row (lanes i..i+L-1 and
 * i+L..i+2L-1 of every 2L-element step), then one of L, then the scalar
 * tail. Four rows at once share each load of x and keep four streams of W
 * in flight; `ahead` (the rows 8 further on, or NULL) is prefetched at the
 * same offsets, so the next rows' pages are being read while these are
 * summed (each 2048-wide bf16 row is one 4 KiB page, where the hardware
 * prefetcher stops). */
__attribute__((target("avx2,fma"))) static inline __m256 widen8(const uint16_t *w)
{
    __m128i h = _mm_loadu_si128((const __m128i *)w);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const uint16_t *w, const float *x,
                                                          size_t n)
{
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a);
        b = _mm256_fmadd_ps(widen8(w + i + 8), _mm256_loadu_ps(x + i + 8), b);
    }
    if (i + 8 <= n) {
        a = _mm256_fmadd_ps(widen8(w + i), _mm256_loadu_ps(x + i), a);
        i += 8;
    }
    return dot_tail(pcs_hsum8(_mm256_add_ps(a, b)), w, x, i, n);
}

__attribute__((target("avx2,fma"))) static void dot4_avx2(float *out, const uint16_t *w,
                                                          size_t ld, const float *x, size_t n,
                                                          const uint16_t *ahead)
{
    const uint16_t *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (ahead && i % 32 == 0) { /* one 64-byte line of each of the next four rows */
            const char *p = (const char *)(ahead + i);
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + 2 * ld, _MM_HINT_T0);
            _mm_prefetch(p + 4 * ld, _MM_HINT_T0);
            _mm_prefetch(p + 6 * ld, _MM_HINT_T0);
        }
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(widen8(w0 + i), x0, a0);
        a1 = _mm256_fmadd_ps(widen8(w1 + i), x0, a1);
        a2 = _mm256_fmadd_ps(widen8(w2 + i), x0, a2);
        a3 = _mm256_fmadd_ps(widen8(w3 + i), x0, a3);
        b0 = _mm256_fmadd_ps(widen8(w0 + i + 8), x1, b0);
        b1 = _mm256_fmadd_ps(widen8(w1 + i + 8), x1, b1);
        b2 = _mm256_fmadd_ps(widen8(w2 + i + 8), x1, b2);
        b3 = _mm256_fmadd_ps(widen8(w3 + i + 8), x1, b3);
    }
    if (i + 8 <= n) {
        const __m256 x0 = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(widen8(w0 + i), x0, a0);
        a1 = _mm256_fmadd_ps(widen8(w1 + i), x0, a1);
        a2 = _mm256_fmadd_ps(widen8(w2 + i), x0, a2);
        a3 = _mm256_fmadd_ps(widen8(w3 + i), x0, a3);
        i += 8;
    }
    out[0] = dot_tail(pcs_hsum8(_mm256_add_ps(a0, b0)), w0, x, i, n);
    out[1] = dot_tail(pcs_hsum8(_mm256_add_ps(a1, b1)), w1, x, i, n);
    out[2] = dot_tail(pcs_hsum8(_mm256_add_ps(a2, b2)), w2, x, i, n);
    out[3] = dot_tail(pcs_hsum8(_mm256_add_ps(a3, b3)), w3, x, i, n);
}

/* Decode's kernels. A row is read in whole 64-byte (AVX-512F) or 32-byte
 * (AVX2) loads, with no cross-lane widening: a 32-bit lane holds the bf16
 * pair (w[2l], w[2l+1]); w[2l] widened is the lane shifted left by 16,
 * w[2l+1] the lane with its low half cleared. x is first copied (on the
 * stack) with each block of 32 (16) elements stored as its even elements,
 * then its odd ones: xp[b + l] = x[b + 2l], xp[b + L + l] = x[b + 2l + 1].
 * The rows are read one at a time, in order, with no software prefetch:
 * each thread's rows are one sequential stream.
 *
 * Measured on an AMD EPYC with AVX-512 (Zen 4), 2 threads, 2.2 GB of bf16
 * in huge pages: this loop read at the cores' raw read rate (a plain
 * 64-byte load-and-add loop), 5-15% above the same loop over float32,
 * where widening 16 at a time with vpmovzxwd ran 10-20% below float32. In
 * a TinyLlama-shaped decode, alternated in one process against the earlier
 * four-rows-at-a-time kernels with the rows 8 ahead prefetched: 1.23x
 * (copied) and 1.38x (memory-mapped) faster with AVX-512F, 1.28x and 1.18x
 * with AVX2 on the same CPU (medians of 8 rounds). Prefetching the whole
 * row 1, 2 or 4 ahead while summing this one made it slower (0.75-0.88x,
 * mapped or copied): the hardware prefetcher does better alone here. */
enum { EO_MAX = 32768 }; /* the longest row with a permuted x (128 KB, on the stack) */

/* xp = x with each block of 2L elements stored as its evens, then its odds */
static void eo_permute(float *xp, const float *x, size_t n, size_t L)
{
    for (size_t b = 0; b + 2 * L <= n; b += 2 * L)
        for (size_t l = 0; l < L; l++) {
            xp[b + l] = x[b + 2 * l];
            xp[b + L + l] = x[b + 2 * l + 1];
        }
}

__attribute__((target("avx512f"))) static float dot_eo(const uint16_t *w, const float *xp,
                                                       const float *x, size_t n)
{
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i v0 = _mm512_loadu_si512((const void *)(w + i));
        const __m512i v1 = _mm512_loadu_si512((const void *)(w + i + 32));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)),
                             _mm512_loadu_ps(xp + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
                             _mm512_loadu_ps(xp + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)),
                             _mm512_loadu_ps(xp + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, hi)),
                             _mm512_loadu_ps(xp + i + 48), a3);
    }
    if (i + 32 <= n) {
        const __m512i v0 = _mm512_loadu_si512((const void *)(w + i));
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)),
                             _mm512_loadu_ps(xp + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, hi)),
                             _mm512_loadu_ps(xp + i + 16), a1);
        i += 32;
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
    return dot_tail(_mm512_reduce_add_ps(s), w, x, i, n);
}

/* The same with AVX2 (the CPUs without AVX-512F): 16 bf16 per 32-byte load,
 * xp's blocks of 32 as above, each half a 16-element block's evens then odds */
__attribute__((target("avx2,fma"))) static float dot_eo_avx2(const uint16_t *w, const float *xp,
                                                             const float *x, size_t n)
{
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + i));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
                             _mm256_loadu_ps(xp + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)),
                             _mm256_loadu_ps(xp + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)),
                             _mm256_loadu_ps(xp + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, hi)),
                             _mm256_loadu_ps(xp + i + 24), a3);
    }
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
    return dot_tail(pcs_hsum8(s), w, x, i, n);
}

/* rows lo..hi-1 of W (n_in wide) dotted with x, into out (beta: as gemv),
 * by dot_eo or dot_eo_avx2 (L: 16 or 8 lanes) */
typedef float (*dot_eo_fn)(const uint16_t *, const float *, const float *, size_t);

static void rows_eo_with(dot_eo_fn dot, size_t L, float *out, const uint16_t *W, size_t n_in,
                         const float *x, size_t lo, size_t hi, float beta)
{
    float xp[EO_MAX] __attribute__((aligned(64)));
    eo_permute(xp, x, n_in, L);
    for (size_t r = lo; r < hi; r++) {
        const float v = dot(W + r * n_in, xp, x, n_in);
        out[r] = beta == 0.0f ? v : beta * out[r] + v;
    }
}

static void rows_eo(float *out, const uint16_t *W, size_t n_in, const float *x, size_t lo,
                    size_t hi, float beta)
{
    rows_eo_with(dot_eo, 16, out, W, n_in, x, lo, hi, beta);
}

static void rows_eo_avx2(float *out, const uint16_t *W, size_t n_in, const float *x, size_t lo,
                         size_t hi, float beta)
{
    rows_eo_with(dot_eo_avx2, 8, out, W, n_in, x, lo, hi, beta);
}
#endif

typedef float (*dot_fn)(const uint16_t *, const float *, size_t);
typedef void (*dot4_fn)(float *, const uint16_t *, size_t, const float *, size_t,
                        const uint16_t *);

/* rows lo..hi-1 of the product (a kernel that reads rows in its own way) */
typedef void (*rows_fn)(float *, const uint16_t *, size_t, const float *, size_t, size_t, float);

typedef void (*widen_fn)(uint32_t *restrict, const uint16_t *restrict, size_t);

typedef struct {
    dot_fn dot;
    dot4_fn dot4;
    const char *name;
    rows_fn rows;   /* or NULL: dot4 then dot, as gemv_task does */
    widen_fn widen; /* prefill's widening of W's rows */
} Kernels;

static void widen_generic(uint32_t *restrict d, const uint16_t *restrict src, size_t n);
#ifdef PCS_X86
static void widen_avx512(uint32_t *restrict d, const uint16_t *restrict src, size_t n);
static void widen_avx2(uint32_t *restrict d, const uint16_t *restrict src, size_t n);
#endif

/* The widest kernel this CPU runs. PCASURGERY_BF16_KERNEL=generic or
 * avx2+fma asks for a narrower one (for tests and comparisons); a kernel the
 * CPU lacks, or any other value, is ignored. */
static Kernels pick_kernels(void)
{
    const char *want = getenv("PCASURGERY_BF16_KERNEL");
    if (want && strcmp(want, "generic") == 0)
        return (Kernels){dot_generic, dot4_generic, "generic", NULL, widen_generic};
#ifdef PCS_X86
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    /* AVX-512F CPUs have AVX2+FMA, whose kernels take rows longer than EO_MAX */
    if (__builtin_cpu_supports("avx512f") && avx2 && !(want && strcmp(want, "avx2+fma") == 0))
        return (Kernels){dot_avx2, dot4_avx2, "avx512f", rows_eo, widen_avx512};
    if (avx2)
        return (Kernels){dot_avx2, dot4_avx2, "avx2+fma", rows_eo_avx2, widen_avx2};
#endif
    return (Kernels){dot_generic, dot4_generic, "generic", NULL, widen_generic};
}

static const Kernels *kernels(void)
{
    /* the first callers may all pick (the same kernels); a reader sees the
     * table only once it is written */
    static Kernels k;
    static int ready;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
        k = pick_kernels();
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    return &k;
}

const char *pcs_bf16_kernel(void)
{
    return kernels()->name;
}

/* ------------------------------------------------------------- decode */

typedef struct {
    float *out;
    const uint16_t *W;
    const float *x;
    size_t n_in, n_out;
    float beta;
    const Kernels *k;
} GemvJob;

static void gemv_task(void *arg, int id, int n)
{
    const GemvJob *j = arg;
    size_t lo, hi;
    pcs_thread_rows(j->n_out, id, n, &lo, &hi);
    if (j->k->rows && j->n_in <= EO_MAX) {
        j->k->rows(j->out, j->W, j->n_in, j->x, lo, hi, j->beta);
        return;
    }
    float d[4];
    size_t r = lo;
    for (; r + 4 <= hi; r += 4) {
        const uint16_t *ahead = r + 12 <= hi ? j->W + (r + 8) * j->n_in : NULL;
        j->k->dot4(d, j->W + r * j->n_in, j->n_in, j->x, j->n_in, ahead);
        for (int q = 0; q < 4; q++)
            j->out[r + q] = j->beta == 0.0f ? d[q] : j->beta * j->out[r + q] + d[q];
    }
    for (; r < hi; r++) {
        float v = j->k->dot(j->W + r * j->n_in, j->x, j->n_in);
        j->out[r] = j->beta == 0.0f ? v : j->beta * j->out[r] + v;
    }
}

void pcs_gemv_bf16(float *out, const unsigned short *W, const float *x, size_t n_out, size_t n_in,
                   float beta, int n_threads)
{
    GemvJob j = {out, W, x, n_in, n_out, beta, kernels()};
    /* small products are not worth waking threads for (~10 us each) */
    if (n_out * n_in < ((size_t)1 << 16))
        n_threads = 1;
    pcs_parallel(gemv_task, &j, n_threads);
}

/* ------------------------------------------------------------ prefill */

typedef struct {
    float *dst;
    const uint16_t *src;
    size_t n;
} WidenJob;

VECTORISE static void widen_generic(uint32_t *restrict d, const uint16_t *restrict src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        d[i] = (uint32_t)src[i] << 16;
}

#ifdef PCS_X86
/* the same in 16 (8) lanes: the baseline build's vectorised loop is SSE2,
 * 4 at a time (a bf16 prefill 1.5-2% faster with these, medians of 8
 * alternated rounds, AMD EPYC Zen 4) */
__attribute__((target("avx512f"))) static void widen_avx512(uint32_t *restrict d,
                                                            const uint16_t *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_si512((void *)(d + i), _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    widen_generic(d + i, src + i, n - i);
}

__attribute__((target("avx2"))) static void widen_avx2(uint32_t *restrict d,
                                                       const uint16_t *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_si256((__m256i *)(d + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    widen_generic(d + i, src + i, n - i);
}
#endif

static void widen_range(uint32_t *restrict d, const uint16_t *restrict src, size_t n)
{
    kernels()->widen(d, src, n);
}

static void widen_task(void *arg, int id, int n)
{
    const WidenJob *j = arg;
    size_t per = (j->n + (size_t)n - 1) / (size_t)n;
    size_t lo = (size_t)id * per, hi = lo + per;
    if (lo > j->n)
        lo = j->n;
    if (hi > j->n)
        hi = j->n;
    widen_range((uint32_t *)j->dst + lo, j->src + lo, hi - lo);
}

void pcs_widen_bf16(float *dst, const unsigned short *src, size_t n, int n_threads)
{
    WidenJob j = {dst, src, n};
    if (n < ((size_t)1 << 16))
        n_threads = 1;
    pcs_parallel(widen_task, &j, n_threads);
}

typedef struct {
    float *out;
    size_t ldo;
    const float *x;
    size_t ldx;
    const uint16_t *W;  /* bf16 weights, or NULL: */
    const float *Wf;    /* float32 weights, not widened */
    size_t T, n_in, n_out, per; /* per: each thread's floats of buf */
    float beta;
    float *buf;
    int gemm;           /* bf16 W by gemm.c's product (pcs_gemm_bf16_rows): */
    float *xpack;       /* the chunk's x packed, shared (after each thread's panel) */
    size_t TB, tb;      /* tokens per chunk; this chunk's (x, out: its first row) */
} MatmulJob;

/* A slab's width is at least SLAB_MIN columns of W (or all of them). */
enum { SLAB_MIN = 512 };

/* widen rows r0..r0+R-1, columns k0..k0+kb-1 of W (n_in wide) into d (R, kb) */
static void widen_block(uint32_t *d, const uint16_t *W, size_t n_in, size_t r0, size_t R,
                        size_t k0, size_t kb)
{
    if (kb == n_in) {
        widen_range(d, W + r0 * n_in, R * n_in);
        return;
    }
    for (size_t r = 0; r < R; r++)
        widen_range(d + r * kb, W + (r0 + r) * n_in + k0, kb);
}

/* A thread's range of W's rows, by sgemm (single-threaded on pool.c's
 * threads). Float32 W: all of its rows in one call. Bf16 W: all of its rows
 * at once, widened into the thread's part of buf, in slabs of columns where
 * they don't fit (each slab one call adding into out). Slabs of columns
 * rather than blocks of rows: OpenBLAS packs x once per call, and a whole x
 * per block of rows cost a bf16 prefill ~8%; a slab packs only its columns
 * of x. Only where even SLAB_MIN columns don't fit are the rows taken in
 * blocks. */
static void matmul_task(void *arg, int id, int n)
{
    const MatmulJob *j = arg;
    size_t lo, hi;
    pcs_thread_rows(j->n_out, id, n, &lo, &hi);
    if (j->gemm) {
        pcs_gemm_bf16_rows(j->out, j->ldo, j->xpack, j->TB, j->tb, j->n_in, j->W, lo, hi,
                           j->beta, j->buf + (size_t)id * pcs_gemm_bf16_w_floats(j->n_in));
        return;
    }
    size_t R = hi - lo, kb = j->n_in;
    if (j->W && R * kb > j->per) {
        kb = j->per / R / 64 * 64;
        if (kb < SLAB_MIN) {
            kb = j->n_in < SLAB_MIN ? j->n_in : SLAB_MIN;
            R = j->per / kb; /* >= 1: per >= n_in >= kb */
        }
    }
    uint32_t *buf = j->W ? (uint32_t *)(j->buf + (size_t)id * j->per) : NULL;
    for (size_t r0 = lo; r0 < hi; r0 += R) {
        const size_t nr = hi - r0 < R ? hi - r0 : R;
        for (size_t k0 = 0; k0 < j->n_in; k0 += kb) {
            const size_t nk = j->n_in - k0 < kb ? j->n_in - k0 : kb;
            const float *b; /* (nr, nk), row stride ldb */
            size_t ldb = j->n_in;
            if (j->W) {
                widen_block(buf, j->W, j->n_in, r0, nr, k0, nk);
                b = (const float *)buf;
                ldb = nk;
            } else
                b = j->Wf + r0 * j->n_in + k0;
            pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)j->T,
                            (pcs_blasint)nr, (pcs_blasint)nk, 1.0f, j->x + k0,
                            (pcs_blasint)j->ldx, b, (pcs_blasint)ldb, k0 == 0 ? j->beta : 1.0f,
                            j->out + r0, (pcs_blasint)j->ldo);
        }
    }
}

/* gemm.c's product: each thread packs its share of the chunk's x into the
 * shared xpack */
static void pack_x_task(void *arg, int id, int n)
{
    const MatmulJob *j = arg;
    pcs_gemm_bf16_pack_x(j->xpack, j->TB, j->x, j->ldx, j->n_in, j->tb, id, n);
}

void pcs_matmul_bf16(float *out, size_t ldo, const float *x, size_t ldx, const unsigned short *W,
                     size_t T, size_t n_in, size_t n_out, float beta, float *buf,
                     size_t buf_floats, int n_threads, int pool)
{
    /* pool: pool.c's threads, each with its part of buf; else this thread
     * alone, its sgemm calls on OpenBLAS's threads */
    if (n_threads < 1 || !pool || buf_floats / (size_t)n_threads < n_in)
        n_threads = 1; /* each thread needs a row of buf at least */
    MatmulJob j = {out, ldo, x, ldx, W, NULL, T, n_in, n_out, buf_floats / (size_t)n_threads,
                   beta, buf, 0, NULL, 0, 0};
    /* gemm.c's product where the scratch holds 64 tokens at a time (fewer
     * would repack W too often), or all T */
    j.TB = pool && pcs_gemm_bf16_on() ? pcs_gemm_bf16_tokens(buf_floats, n_in, n_threads, T) : 0;
    if (j.TB >= (T < 64 ? T : 64) && j.TB > 0) {
        /* a chunk of TB tokens at a time: the threads pack its x together
         * (one copy in the caches, each tile once), then each multiplies
         * its rows of W */
        j.gemm = 1;
        j.xpack = buf + (size_t)n_threads * pcs_gemm_bf16_w_floats(n_in);
        for (size_t t0 = 0; t0 < T; t0 += j.TB) {
            j.tb = T - t0 < j.TB ? T - t0 : j.TB;
            j.x = x + t0 * ldx;
            j.out = out + t0 * ldo;
            pcs_parallel(pack_x_task, &j, n_threads);
            pcs_parallel(matmul_task, &j, n_threads);
        }
        return;
    }
    pcs_parallel(matmul_task, &j, n_threads);
}

void pcs_matmul_rows(float *out, size_t ldo, const float *x, size_t ldx, const float *W,
                     size_t T, size_t n_in, size_t n_out, float beta, int n_threads)
{
    MatmulJob j = {out, ldo, x, ldx, NULL, W, T, n_in, n_out, 0, beta, NULL, 0, NULL, 0, 0};
    pcs_parallel(matmul_task, &j, n_threads);
}
