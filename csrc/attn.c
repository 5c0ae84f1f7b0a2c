/* attn.c: decode's attention for one query token against every cached
 * position, on pcasurgery's threads (pool.c), with dense keys or with keys
 * rebuilt from a latent; and the attention-weighted values.
 *
 * Dimension legend: H query heads in KV groups of G = H / KV, head size hd,
 * Dkv = KV hd; C positions; a latent K of rk floats per position (the
 * first rk columns of the cache's latent rows, row stride ld).
 *
 * Scores: att[h, j] = scale * q_h . k_{g(h), j}, k_j the cached key (dense)
 * or rope_j(k_up c_j + bk) (latent: Palu's reconstruction; RoPE sits
 * between k_up and the scores, so k_up cannot be absorbed into the query).
 * The positions are split over the threads. A thread takes BLOCK positions
 * at a time and, per head group, rebuilds their keys TILE rows at a time in
 * a register-blocked FMA kernel (TILE x 16 outputs, k_up packed into
 * 16-wide panels by pcs_attn_pack), adds the bias, rotates them and scores
 * them eight keys per head at a time while they are in L1: rebuilt keys are
 * never written to memory, and no BLAS call packs them again.
 *
 * Values: out = att V per head group, or att c_V (the latents, V's
 * up-projection absorbed), tiles of TILE heads x 16 columns split over the
 * threads, with the same FMA kernel.
 *
 * Why not OpenBLAS (the path llama.c keeps for other CPUs and head sizes):
 * its sgemm ran the rebuild at half of peak on these shapes, and its idle
 * workers spin, so that pool.c's threads (bf16 gemv) and OpenBLAS's shared
 * the two cores in every decode step (bf16 decode at a 2048-token context
 * measured 1.7x faster with all of it on pool.c's threads).
 *
 * AVX2+FMA only (chosen at run time), head sizes a multiple of 16 up to
 * PCS_ATTN_MAX_HD; pcs_attn_supported() says when, and llama.c uses its
 * OpenBLAS path otherwise (or after pcs_attn_set_kernel("blas")). Sums run
 * in a different order from the BLAS path's: equal to rounding, not to the
 * bit.
 */
#include <stdlib.h>
#include <string.h>

#include "pcasurgery.h"
#include "simd.h"

/* TILE rows x PANEL columns: the FMA kernel's block (12 accumulators);
 * BLOCK positions: what a thread rebuilds and scores at a time (L1);
 * POS_BLOCK positions: what the weighted sums take at a time (L2) */
enum { TILE = 6, PANEL = 16, BLOCK = 4 * TILE, POS_BLOCK = 256 };

/* -1: not chosen yet; 0: BLAS; 1: this file's kernel (where the CPU has it);
 * atomic: attn_kernel() may set it while another thread decodes */
static int use_kernel = -1;

static int cpu_has_kernel(void)
{
#ifdef PCS_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int pcs_attn_set_kernel(const char *name)
{
    return pcs_switch_set(&use_kernel, name, "blas", cpu_has_kernel);
}

int pcs_attn_pool(void)
{
    return pcs_switch_get(&use_kernel, "PCASURGERY_ATTN_KERNEL", "blas", pcs_attn_set_kernel);
}

int pcs_attn_supported(size_t hd)
{
    return pcs_attn_pool() && hd % PANEL == 0 && hd >= PANEL && hd <= PCS_ATTN_MAX_HD;
}

const char *pcs_attn_kernel(void)
{
    return pcs_attn_supported(PANEL) ? "avx2+fma" : "blas";
}

void pcs_attn_pack(float *pack, const float *k_up, size_t Dkv, size_t rk)
{
    for (size_t p = 0; p < Dkv / PANEL; p++)
        for (size_t d = 0; d < PANEL; d++) {
            const float *src = k_up + (p * PANEL + d) * rk;
            float *dst = pack + p * rk * PANEL + d;
            for (size_t k = 0; k < rk; k++)
                dst[k * PANEL] = src[k];
        }
}

#ifdef PCS_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* out rows i (TILE, PANEL), row stride ldo, = sum_k a[i][k] * b[k][0:16],
 * b's rows ldb apart: six latents times a packed panel of k_up^T (rk, 16),
 * or six heads' attention weights times 16 columns of V or of the latents. */
AVX2 static void panel_6x16(float *out, size_t ldo, const float *const a[TILE],
                            const float *bp, size_t ldb, size_t rk, int acc)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    if (acc) { /* out += the products */
        c00 = _mm256_loadu_ps(out), c01 = _mm256_loadu_ps(out + 8);
        c10 = _mm256_loadu_ps(out + ldo), c11 = _mm256_loadu_ps(out + ldo + 8);
        c20 = _mm256_loadu_ps(out + 2 * ldo), c21 = _mm256_loadu_ps(out + 2 * ldo + 8);
        c30 = _mm256_loadu_ps(out + 3 * ldo), c31 = _mm256_loadu_ps(out + 3 * ldo + 8);
        c40 = _mm256_loadu_ps(out + 4 * ldo), c41 = _mm256_loadu_ps(out + 4 * ldo + 8);
        c50 = _mm256_loadu_ps(out + 5 * ldo), c51 = _mm256_loadu_ps(out + 5 * ldo + 8);
    }
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
#define PCS_ROW(ai, r0, r1)                          \
    x = _mm256_broadcast_ss(ai + k);                 \
    r0 = _mm256_fmadd_ps(x, b0, r0);                 \
    r1 = _mm256_fmadd_ps(x, b1, r1)
    for (size_t k = 0; k < rk; k++, bp += ldb) {
        const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
        __m256 x;
        PCS_ROW(a0, c00, c01);
        PCS_ROW(a1, c10, c11);
        PCS_ROW(a2, c20, c21);
        PCS_ROW(a3, c30, c31);
        PCS_ROW(a4, c40, c41);
        PCS_ROW(a5, c50, c51);
    }
#undef PCS_ROW
    _mm256_storeu_ps(out, c00);
    _mm256_storeu_ps(out + 8, c01);
    _mm256_storeu_ps(out + ldo, c10);
    _mm256_storeu_ps(out + ldo + 8, c11);
    _mm256_storeu_ps(out + 2 * ldo, c20);
    _mm256_storeu_ps(out + 2 * ldo + 8, c21);
    _mm256_storeu_ps(out + 3 * ldo, c30);
    _mm256_storeu_ps(out + 3 * ldo + 8, c31);
    _mm256_storeu_ps(out + 4 * ldo, c40);
    _mm256_storeu_ps(out + 4 * ldo + 8, c41);
    _mm256_storeu_ps(out + 5 * ldo, c50);
    _mm256_storeu_ps(out + 5 * ldo + 8, c51);
}

/* k (hd) += bias (hd, or NULL), then rotated by cos/sin (hd/2), element i
 * with i + hd/2: products and sums rounded one by one, as llama.c's RoPE. */
AVX2 static void bias_rope(float *k, const float *bias, const float *cs, const float *sn,
                           size_t hd)
{
    const size_t half = hd / 2;
    if (bias)
        for (size_t i = 0; i < hd; i += 8)
            _mm256_storeu_ps(k + i, _mm256_add_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(bias + i)));
    pcs_rope_avx2(k, cs, sn, half); /* half % 8 == 0: hd is a multiple of 16 */
}

/* att[h * lda + j] = scale * q_h . k for the G heads q (G, hd) of one group
 * and one key k (hd). */
AVX2 static void score_key(float *att, size_t lda, size_t j, const float *q, size_t G,
                           const float *k, size_t hd, float scale)
{
    for (size_t h = 0; h < G; h++) {
        const float *qh = q + h * hd;
        __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k));
        __m256 s1 = _mm256_mul_ps(_mm256_loadu_ps(qh + 8), _mm256_loadu_ps(k + 8));
        for (size_t i = PANEL; i < hd; i += PANEL) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i + 8), _mm256_loadu_ps(k + i + 8), s1);
        }
        att[h * lda + j] = scale * pcs_hsum8(_mm256_add_ps(s0, s1));
    }
}

/* att[0..7] = scale * q . k[i] for eight keys (hd each): eight sums of
 * 8-lane products, reduced together into one vector (one store). */
AVX2 static void score_8keys(float *att, const float *q, const float *const k[8], size_t hd,
                             float scale)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (size_t d = 0; d < hd; d += 8) {
        const __m256 x = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[0] + d), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[1] + d), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[2] + d), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[3] + d), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[4] + d), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[5] + d), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[6] + d), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[7] + d), a7);
    }
    /* lanes: hadd pairs within 128-bit halves, then the halves added */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                   _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(att, _mm256_mul_ps(_mm256_set1_ps(scale), r));
}

/* The scores of positions j..j+m-1 (m <= BLOCK) for group g's heads, keys
 * at k[i] (hd each): eight positions at a time, then one by one. */
AVX2 static void score_block(const PcsAttnScores *a, size_t g, size_t j, size_t m,
                             const float *const k[BLOCK])
{
    const size_t hd = a->hd, G = a->H / a->KV;
    const float *qg = a->q + g * G * hd;
    float *att = a->att + g * G * a->lda;
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (size_t h = 0; h < G; h++)
            score_8keys(att + h * a->lda + j + i, qg + h * hd, k + i, hd, a->scale);
    for (; i < m; i++)
        score_key(att, a->lda, j + i, qg, G, k[i], hd, a->scale);
}

AVX2 static void scores_range(const PcsAttnScores *a, size_t j0, size_t j1)
{
    const size_t hd = a->hd, half = hd / 2;
    float kt[BLOCK * PCS_ATTN_MAX_HD]; /* a block's rebuilt keys of one group (BLOCK, hd) */
    const float *k[BLOCK];
    for (size_t j = j0; j < j1; j += BLOCK) {
        const size_t m = j1 - j < BLOCK ? j1 - j : BLOCK;
        for (size_t g = 0; g < a->KV; g++) {
            if (!a->lat) { /* dense: the cached (rotated) keys */
                for (size_t i = 0; i < m; i++)
                    k[i] = a->keys + (j + i) * a->ld + g * hd;
                score_block(a, g, j, m, k);
                continue;
            }
            for (size_t i0 = 0; i0 < m; i0 += TILE) { /* rebuilt TILE rows at a time */
                const float *rows[TILE]; /* a short tile repeats its last row */
                for (size_t i = 0; i < TILE; i++)
                    rows[i] = a->lat + (j + (i0 + i < m ? i0 + i : m - 1)) * a->ld;
                for (size_t p = 0; p < hd / PANEL; p++)
                    panel_6x16(kt + i0 * hd + p * PANEL, hd, rows,
                               a->pack + (g * hd / PANEL + p) * a->rk * PANEL, PANEL, a->rk, 0);
            }
            for (size_t i = 0; i < m; i++) {
                k[i] = kt + i * hd;
                bias_rope(kt + i * hd, a->bias ? a->bias + g * hd : NULL,
                          a->rope_cos + (j + i) * half, a->rope_sin + (j + i) * half, hd);
            }
            score_block(a, g, j, m, k);
        }
    }
}

static void scores_task(void *arg, int id, int n)
{
    const PcsAttnScores *a = arg;
    /* ranges of whole blocks, so that only the last one is short */
    const size_t blocks = (a->C + BLOCK - 1) / BLOCK;
    const size_t b0 = blocks * (size_t)id / (size_t)n, b1 = blocks * (size_t)(id + 1) / (size_t)n;
    const size_t j1 = b1 * BLOCK < a->C ? b1 * BLOCK : a->C;
    if (b0 * BLOCK < j1)
        scores_range(a, b0 * BLOCK, j1);
}

/* One tile of pcs_attn_weighted over positions j0..j1-1: rows r0..r0+m-1
 * (m <= TILE, one group), columns n0..n0+w-1 (w <= PANEL); the first
 * positions set out, the next ones add to it. */
AVX2 static void weighted_tile(const PcsAttnWeighted *a, size_t r0, size_t m, size_t n0, size_t w,
                               size_t j0, size_t j1)
{
    const float *b = a->b + r0 / a->G * a->bstep + j0 * a->ldb;
    float *out = a->out + r0 * a->ldo + n0;
    if (w == PANEL) {
        const float *rows[TILE];
        for (size_t i = 0; i < TILE; i++)
            rows[i] = a->a + (r0 + (i < m ? i : m - 1)) * a->lda + j0;
        float t[TILE * PANEL]; /* the tile, its rows past m unused */
        for (size_t i = 0; i < m && j0 > 0; i++)
            memcpy(t + i * PANEL, out + i * a->ldo, PANEL * sizeof(float));
        panel_6x16(t, PANEL, rows, b + n0, a->ldb, j1 - j0, j0 > 0);
        for (size_t i = 0; i < m; i++)
            memcpy(out + i * a->ldo, t + i * PANEL, PANEL * sizeof(float));
        return;
    }
    for (size_t i = 0; i < m; i++) /* the last columns, fewer than a panel */
        for (size_t c = 0; c < w; c++) {
            const float *ai = a->a + (r0 + i) * a->lda;
            float s = j0 > 0 ? out[i * a->ldo + c] : 0.0f;
            for (size_t j = j0; j < j1; j++)
                s += ai[j] * b[(j - j0) * a->ldb + n0 + c];
            out[i * a->ldo + c] = s;
        }
}

/* A thread's tiles, POS_BLOCK positions at a time: a block's rows of b are
 * read from memory by its first tile and from cache by the others. */
static void weighted_task(void *arg, int id, int n)
{
    const PcsAttnWeighted *a = arg;
    const size_t rt = (a->G + TILE - 1) / TILE, ct = (a->N + PANEL - 1) / PANEL;
    const size_t tiles = a->M / a->G * rt * ct;
    const size_t t0 = tiles * (size_t)id / (size_t)n, t1 = tiles * (size_t)(id + 1) / (size_t)n;
    for (size_t j0 = 0; j0 < a->C; j0 += POS_BLOCK) {
        const size_t j1 = a->C - j0 < POS_BLOCK ? a->C : j0 + POS_BLOCK;
        for (size_t t = t0; t < t1; t++) {
            const size_t g = t / (rt * ct), r = t / ct % rt, cp = t % ct;
            const size_t r0 = g * a->G + r * TILE, n0 = cp * PANEL;
            weighted_tile(a, r0, a->G - r * TILE < TILE ? a->G - r * TILE : TILE, n0,
                          a->N - n0 < PANEL ? a->N - n0 : PANEL, j0, j1);
        }
    }
}
#endif

void pcs_attn_weighted(const PcsAttnWeighted *a, int n_threads)
{
#ifdef PCS_X86
    const size_t tiles = a->M / a->G * ((a->G + TILE - 1) / TILE) * ((a->N + PANEL - 1) / PANEL);
    size_t n = n_threads > 1 ? (size_t)n_threads : 1;
    if (a->C * a->M * a->N < ((size_t)1 << 16)) /* not worth waking a thread for */
        n = 1;
    if (n > tiles)
        n = tiles;
    pcs_parallel(weighted_task, (void *)a, (int)n);
#else
    (void)a;
    (void)n_threads;
#endif
}

void pcs_attn_scores(const PcsAttnScores *a, int n_threads)
{
#ifdef PCS_X86
    /* two blocks a thread at least (a latent block is ~20 us of work, a
     * wake-up ~10 us) */
    const size_t blocks = (a->C + BLOCK - 1) / BLOCK;
    size_t n = n_threads > 1 ? (size_t)n_threads : 1;
    if (n > blocks / 2)
        n = blocks / 2 ? blocks / 2 : 1;
    pcs_parallel(scores_task, (void *)a, (int)n);
#else
    (void)a;
    (void)n_threads;
#endif
}
