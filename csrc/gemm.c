/* gemm.c: prefill's matrix product with bf16-resident weights, packing W
 * straight from bf16 (AVX-512F, chosen at run time; other CPUs keep
 * bf16.c's widening + sgemm path, see cpu_gemm).
 *
 * Dimension legend: x (T, K) float32, row stride ldx; W (n, K) bf16 bits,
 * row-major; out (T, n) float32, row stride ldo; a thread computes the
 * columns lo..hi-1 of out (W's rows lo..hi-1).
 *
 * out[t, j] = beta out[t, j] + sum_k x[t, k] W[j, k], in float32 (the
 * widened bf16 values are exact, so the products are those of a float32
 * GEMM on the bf16-rounded weights; the sums run in another order than
 * OpenBLAS's: equal to rounding).
 *
 * Why: the other path (bf16.c) widens W's rows into a float32 buffer and
 * calls OpenBLAS's sgemm, which reads that buffer again to pack it: the
 * weights cross the caches as 2 + 4 + 4 bytes each. Here the packing reads
 * the bf16 rows once and writes the widened panels, which the kernel reads
 * from L2, as BLIS does (Goto's blocking, with W's panels packed whole):
 *   for each chunk of TB tokens:
 *     pack x (TB, K) into tiles [KC-slice][tile][k][MR]       (L3)
 *       (all threads, each its share of the tiles: pcs_gemm_bf16_pack_x)
 *     each thread, for each panel of NR rows of W in its range:
 *       pack them widened, each row read whole, [KC-slice][k][NR] (L2)
 *       for each KC-slice, for each tile of MR tokens:
 *         MR x NR outputs in 24 zmm registers, x broadcast, W loaded
 * A slice of a panel (NR x KC, 96 KB) stays in L2 while the x tiles (MR x
 * KC, 16 KB) pass through L1. Rows read whole, not KC at a time: from a
 * memory-mapped checkpoint (4 KiB pages) that made prefill ~6% faster.
 * x packed once for all threads, not by each: with n threads, a copy each
 * was n times the packing and n times the x in L3 (on 8 threads, 1.25x
 * the CPU time of one shared copy for a 512 x 2048 x 5632 product).
 * Alone on one core (AMD Zen 4) the kernel runs at the FMA peak from
 * cache; the model's prefill is 1.07-1.10x the widening + sgemm path's
 * (benchmarks/RESULTS.md).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pcasurgery.h"
#include "simd.h"

/* MR tokens x NR outputs per kernel call, KC of K at a time */
enum { MR = 8, NR = 48, KC = 512 };

size_t pcs_gemm_bf16_w_floats(size_t K)
{
    return (size_t)NR * K;
}

/* the threads' panels of W: NR rows each */
static size_t panels_floats(size_t K, int n_threads)
{
    return (size_t)(n_threads < 1 ? 1 : n_threads) * NR * K;
}

/* T rounded up to whole tiles of MR tokens */
static size_t tiled(size_t T)
{
    return (T + MR - 1) / MR * MR;
}

size_t pcs_gemm_bf16_scratch(size_t T, size_t K, int n_threads)
{
    return panels_floats(K, n_threads) + (T < 1 ? MR : tiled(T)) * K;
}

size_t pcs_gemm_bf16_tokens(size_t floats, size_t K, int n_threads, size_t T)
{
    const size_t w = panels_floats(K, n_threads);
    if (K == 0 || floats < w)
        return 0;
    const size_t TB = (floats - w) / K / MR * MR;
    return TB > tiled(T) ? tiled(T) : TB;
}

/* 0: the widening + sgemm path; 1: this file's (AVX-512F); -1: not chosen
 * yet (atomic: set while another thread runs a prefill) */
static int use_gemm = -1;

/* AVX-512F, unless PCASURGERY_BF16_KERNEL asks for a narrower kernel. An
 * AVX2 version (4 x 24 outputs in 12 ymm registers, each 8 x 48 block in
 * four calls) ran the TinyLlama-shaped prefill at 0.79x the widening +
 * sgemm path on an AMD Zen 4 (ymm FMAs at the zmm rate): CPUs without
 * AVX-512F keep that path. */
static int cpu_gemm(void)
{
#ifdef PCS_X86
    __builtin_cpu_init();
    const char *k = getenv("PCASURGERY_BF16_KERNEL");
    if (k && (strcmp(k, "generic") == 0 || strcmp(k, "avx2+fma") == 0))
        return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int pcs_gemm_bf16_set(const char *name)
{
    return pcs_switch_set(&use_gemm, name, "sgemm", cpu_gemm);
}

int pcs_gemm_bf16_on(void)
{
    return pcs_switch_get(&use_gemm, "PCASURGERY_BF16_PREFILL", "sgemm", pcs_gemm_bf16_set);
}

const char *pcs_gemm_bf16_name(void)
{
    return pcs_gemm_bf16_on() ? "avx512f" : "sgemm";
}

#ifdef PCS_X86
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

/* the 8 x 8 block r transposed in registers */
AVX2 static inline void transpose8(__m256 r[8])
{
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* dst[k * ld + i] = src[i][k] for eight rows (NULL: a row of zeros), k < kc:
 * float32 rows (x), or bf16 rows widened (W) */
AVX2 static void pack8_f32(float *dst, size_t ld, const float *const src[8], size_t kc)
{
    size_t k = 0;
    for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; i++)
            r[i] = src[i] ? _mm256_loadu_ps(src[i] + k) : _mm256_setzero_ps();
        transpose8(r);
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(dst + (k + (size_t)i) * ld, r[i]);
    }
    for (; k < kc; k++)
        for (int i = 0; i < 8; i++)
            dst[k * ld + (size_t)i] = src[i] ? src[i][k] : 0.0f;
}

AVX2 static void pack8_bf16(float *dst, size_t ld, const uint16_t *const src[8], size_t kc)
{
    size_t k = 0;
    for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; i++) {
            if (!src[i]) {
                r[i] = _mm256_setzero_ps();
                continue;
            }
            const __m128i h = _mm_loadu_si128((const __m128i *)(src[i] + k));
            r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        transpose8(r);
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(dst + (k + (size_t)i) * ld, r[i]);
    }
    for (; k < kc; k++)
        for (int i = 0; i < 8; i++) {
            const uint32_t u = src[i] ? (uint32_t)src[i][k] << 16 : 0;
            memcpy(dst + k * ld + (size_t)i, &u, sizeof u);
        }
}

/* out (rows <= MR, cols <= 16 nj) = beta out + xp (kc, MR) . wp (kc, NR
 * stride; its first 16 nj columns): nj zmm columns for each of 8 tokens
 * (8 nj accumulators, 24 at most), x broadcast from the packed tile */
AVX512 static inline __attribute__((always_inline)) void
kernel(int nj, float *out, size_t ldo, const float *xp, const float *wp, size_t kc, float beta,
       size_t rows, size_t cols)
{
    const __m512 z = _mm512_setzero_ps();
    __m512 c00 = z, c01 = z, c02 = z, c10 = z, c11 = z, c12 = z, c20 = z, c21 = z, c22 = z;
    __m512 c30 = z, c31 = z, c32 = z, c40 = z, c41 = z, c42 = z, c50 = z, c51 = z, c52 = z;
    __m512 c60 = z, c61 = z, c62 = z, c70 = z, c71 = z, c72 = z;
    for (size_t k = 0; k < kc; k++, wp += NR, xp += MR) {
        const __m512 b0 = _mm512_loadu_ps(wp);
        const __m512 b1 = nj > 1 ? _mm512_loadu_ps(wp + 16) : z;
        const __m512 b2 = nj > 2 ? _mm512_loadu_ps(wp + 32) : z;
        __m512 a;
#define PCS_ROW(i)                                            \
    a = _mm512_set1_ps(xp[i]);                                \
    c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0);                \
    if (nj > 1)                                               \
        c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1);            \
    if (nj > 2)                                               \
        c##i##2 = _mm512_fmadd_ps(a, b2, c##i##2);
        PCS_ROW(0)
        PCS_ROW(1)
        PCS_ROW(2)
        PCS_ROW(3)
        PCS_ROW(4)
        PCS_ROW(5)
        PCS_ROW(6)
        PCS_ROW(7)
#undef PCS_ROW
    }
    /* columns 16 j.. of the tile: a mask for the last, partial group */
    __mmask16 m[3];
    for (int j = 0; j < 3; j++) {
        const size_t left = cols > (size_t)(16 * j) ? cols - (size_t)(16 * j) : 0;
        m[j] = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    }
    const __m512 vb = _mm512_set1_ps(beta);
#define PCS_PUT(i, j)                                                                      \
    if (nj > j) {                                                                          \
        float *o = out + (size_t)(i) * ldo + 16 * j;                                       \
        const __m512 v = beta == 0.0f ? c##i##j                                            \
                                      : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m[j], o), \
                                                        c##i##j);                          \
        _mm512_mask_storeu_ps(o, m[j], v);                                                 \
    }
#define PCS_STORE(i)    \
    if (rows > (i)) {   \
        PCS_PUT(i, 0)   \
        PCS_PUT(i, 1)   \
        PCS_PUT(i, 2)   \
    }
    PCS_STORE(0)
    PCS_STORE(1)
    PCS_STORE(2)
    PCS_STORE(3)
    PCS_STORE(4)
    PCS_STORE(5)
    PCS_STORE(6)
    PCS_STORE(7)
#undef PCS_STORE
#undef PCS_PUT
}

AVX512 static void kernel1(float *out, size_t ldo, const float *xp, const float *wp, size_t kc,
                           float beta, size_t rows, size_t cols)
{
    kernel(1, out, ldo, xp, wp, kc, beta, rows, cols);
}

AVX512 static void kernel2(float *out, size_t ldo, const float *xp, const float *wp, size_t kc,
                           float beta, size_t rows, size_t cols)
{
    kernel(2, out, ldo, xp, wp, kc, beta, rows, cols);
}

AVX512 static void kernel3(float *out, size_t ldo, const float *xp, const float *wp, size_t kc,
                           float beta, size_t rows, size_t cols)
{
    kernel(3, out, ldo, xp, wp, kc, beta, rows, cols);
}

/* out (rows <= MR, cols <= NR) from a packed tile and panel */
static void block(float *out, size_t ldo, const float *xp, const float *wp, size_t kc,
                  float beta, size_t rows, size_t cols)
{
    if (cols > 32)
        kernel3(out, ldo, xp, wp, kc, beta, rows, cols);
    else if (cols > 16)
        kernel2(out, ldo, xp, wp, kc, beta, rows, cols);
    else
        kernel1(out, ldo, xp, wp, kc, beta, rows, cols);
}

void pcs_gemm_bf16_pack_x(float *xpack, size_t TB, const float *x, size_t ldx, size_t K,
                          size_t tb, int id, int n)
{
    size_t lo, hi; /* this thread's share of the tiles */
    pcs_thread_rows(tiled(tb) / MR, id, n, &lo, &hi);
    for (size_t t = lo * MR; t < hi * MR; t += MR)
        for (size_t k0 = 0; k0 < K; k0 += KC) {
            const size_t kc = K - k0 < KC ? K - k0 : KC;
            const float *src[MR];
            for (size_t i = 0; i < MR; i++)
                src[i] = t + i < tb ? x + (t + i) * ldx + k0 : NULL;
            pack8_f32(xpack + k0 * TB + t * kc, MR, src, kc);
        }
}

void pcs_gemm_bf16_rows(float *out, size_t ldo, const float *xpack, size_t TB, size_t tb,
                        size_t K, const unsigned short *W, size_t lo, size_t hi, float beta,
                        float *wpack)
{
    const uint16_t *Wb = (const uint16_t *)W;
    for (size_t j = lo; j < hi; j += NR) {
        const size_t cols = hi - j < NR ? hi - j : NR;
        /* eight of the panel's rows at a time, each read whole (zero rows
         * past cols) */
        for (size_t r = 0; r < NR; r += 8)
            for (size_t k0 = 0; k0 < K; k0 += KC) {
                const uint16_t *src[8];
                for (size_t i = 0; i < 8; i++)
                    src[i] = r + i < cols ? Wb + (j + r + i) * K + k0 : NULL;
                pack8_bf16(wpack + k0 * NR + r, NR, src, K - k0 < KC ? K - k0 : KC);
            }
        for (size_t k0 = 0; k0 < K; k0 += KC) {
            const size_t kc = K - k0 < KC ? K - k0 : KC;
            const float b = k0 == 0 ? beta : 1.0f;
            for (size_t t = 0; t < tb; t += MR)
                block(out + t * ldo + j, ldo, xpack + k0 * TB + t * kc, wpack + k0 * NR, kc, b,
                      tb - t < MR ? tb - t : MR, cols);
        }
    }
}
#else
/* never called: cpu_gemm() is 0 */
void pcs_gemm_bf16_pack_x(float *xpack, size_t TB, const float *x, size_t ldx, size_t K,
                          size_t tb, int id, int n)
{
    (void)xpack, (void)TB, (void)x, (void)ldx, (void)K, (void)tb, (void)id, (void)n;
}

void pcs_gemm_bf16_rows(float *out, size_t ldo, const float *xpack, size_t TB, size_t tb,
                        size_t K, const unsigned short *W, size_t lo, size_t hi, float beta,
                        float *wpack)
{
    (void)out, (void)ldo, (void)xpack, (void)TB, (void)tb, (void)K, (void)W, (void)lo, (void)hi;
    (void)beta, (void)wpack;
}
#endif
