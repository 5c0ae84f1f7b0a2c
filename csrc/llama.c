/* llama.c: the Llama forward pass, prefill with sgemm and decode against a
 * KV cache, in the spirit of llama2.c's run.c.
 *
 * Dimension legend:
 *   T  = tokens in this chunk (<= B, the state's max_batch)
 *   P  = position of the chunk's first token (tokens already in the cache)
 *   S  = seq_len, the cache capacity;  C = P + T, the context of the chunk
 *   D  = dim (hidden size), F = hidden_dim (intermediate size), V = vocab
 *   H  = query heads, KV = key/value heads, hd = head_dim, G = H / KV
 *   Dq = H * hd, Dkv = KV * hd
 *
 * Conventions: weights are row-major (out_features, in_features) as in
 * PyTorch and safetensors. RoPE is Hugging Face's "rotate_half" layout:
 * within a head, element i pairs with element i + hd/2. llama2.c and GGUF
 * rotate interleaved pairs (2i, 2i+1) instead; their Wq/Wk rows are permuted
 * to this layout when loaded (pcasurgery/checkpoints.py). A row permutation
 * of Wq or Wk does not change a PCA over its rows.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "pcasurgery.h"
#include "simd.h"

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }
static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* Decode rebuilds a latent K's keys this many positions at a time (a
 * TinyLlama block of keys, 512 x 256 floats, stays in L2 while scored). */
enum { KEY_BLOCK = 512 };

/* *out = a * b; nonzero when the product overflows size_t. */
static int mul_ovf(size_t a, size_t b, size_t *out) { return __builtin_mul_overflow(a, b, out); }

/* Every size the forward pass indexes with or hands to BLAS (32-bit ints)
 * must fit: each dimension and product below is checked, and the first that
 * does not fit is named in *what. */
#define BLAS_MAX ((size_t)INT_MAX)

int pcs_llama_config_check(const PcsLlamaConfig *c, const char **what)
{
    *what = NULL;
    if (c->dim == 0 || c->hidden_dim == 0 || c->n_layers == 0 || c->n_heads == 0 ||
        c->n_kv_heads == 0 || c->head_dim == 0 || c->vocab_size == 0 || c->seq_len == 0)
        return PCS_ERR_ARG;
    if (c->n_heads % c->n_kv_heads != 0 || c->head_dim % 2 != 0)
        return PCS_ERR_ARG;
    const struct { size_t v; const char *name; } dims[] = {
        {c->dim, "hidden_size (dim)"}, {c->hidden_dim, "intermediate_size (hidden_dim)"},
        {c->vocab_size, "vocab_size"}, {c->seq_len, "seq_len (the context)"},
        {c->head_dim, "head_dim"}, {c->n_heads, "n_heads"}, {c->n_kv_heads, "n_kv_heads"},
        {c->n_layers, "n_layers"},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++) {
        if (dims[i].v > BLAS_MAX) {
            *what = dims[i].name;
            return PCS_ERR_TOO_LARGE;
        }
    }
    size_t Dq, Dkv, x;
    if (mul_ovf(c->n_heads, c->head_dim, &Dq) || Dq > BLAS_MAX) {
        *what = "n_heads * head_dim";
        return PCS_ERR_TOO_LARGE;
    }
    if (mul_ovf(c->n_kv_heads, c->head_dim, &Dkv) || Dkv > BLAS_MAX) {
        *what = "n_kv_heads * head_dim";
        return PCS_ERR_TOO_LARGE;
    }
    /* weight matrices are indexed with size_t products: (V, D), (F, D), (Dq, D) */
    if (mul_ovf(c->vocab_size, c->dim, &x) || mul_ovf(x, sizeof(float), &x)) {
        *what = "vocab_size * hidden_size";
        return PCS_ERR_TOO_LARGE;
    }
    if (mul_ovf(c->hidden_dim, c->dim, &x) || mul_ovf(x, sizeof(float), &x) ||
        mul_ovf(Dq, c->dim, &x) || mul_ovf(x, sizeof(float), &x)) {
        *what = "a weight matrix's size";
        return PCS_ERR_TOO_LARGE;
    }
    return PCS_OK;
}

/* Float counts of the state's buffers for B = max_batch tokens per chunk,
 * checked for overflow (the total in bytes too). */
enum { N_STATE_BUFS = 9 };

/* A latent is at most a basis's components plus the mean: min(rows, D) + 1
 * for k and v apart (2 Dkv + 2 together), D + 1 for a basis shared by
 * several layers. */
size_t pcs_llama_max_latent(const PcsLlamaConfig *c)
{
    return max_sz(2 * c->n_kv_heads * c->head_dim + 2, c->dim + 1);
}
size_t pcs_llama_max_q_latent(const PcsLlamaConfig *c) { return c->dim + 1; }

static int state_sizes(size_t n_floats[N_STATE_BUFS], size_t *total, const PcsLlamaConfig *c,
                       size_t B, const char **what)
{
    const size_t S = c->seq_len, D = c->dim, F = c->hidden_dim;
    const size_t Dq = c->n_heads * c->head_dim, Dkv = c->n_kv_heads * c->head_dim;
    const size_t half = c->head_dim / 2;
    size_t cache = 0;
    int ovf = mul_ovf(B, D, &n_floats[0]) |                 /* x */
              mul_ovf(B, max_sz(D, Dq), &n_floats[1]) |     /* xb */
              mul_ovf(B, Dq, &n_floats[2]) |                /* q */
              mul_ovf(B, S, &n_floats[3]) |                 /* att */
              mul_ovf(B, F, &n_floats[4]) |                 /* hb */
              mul_ovf(B, F, &n_floats[5]) |                 /* hb2 */
              mul_ovf(S, half, &n_floats[6]) |              /* rope_cos */
              mul_ovf(S, half, &n_floats[7]) |              /* rope_sin */
              mul_ovf(max_sz(B, c->n_heads), pcs_llama_max_latent(c),
                      &n_floats[8]);                        /* lat */
    if (ovf) {
        *what = "max_batch * the activation width";
        return PCS_ERR_TOO_LARGE;
    }
    /* the largest cache a layout can take (checked here so that every
     * layout's sizes fit: a latent row is at most pcs_llama_max_latent) */
    if (mul_ovf(c->n_layers, S, &cache) ||
        mul_ovf(cache, max_sz(2 * Dkv, pcs_llama_max_latent(c)), &cache) ||
        mul_ovf(cache, sizeof(float), &cache) || cache > (size_t)PTRDIFF_MAX / 2) {
        *what = "n_layers * seq_len * n_kv_heads * head_dim (the KV cache)";
        return PCS_ERR_TOO_LARGE;
    }
    size_t sum = 0;
    for (size_t i = 0; i < N_STATE_BUFS; i++) {
        if (__builtin_add_overflow(sum, n_floats[i], &sum)) {
            *what = "the KV cache and activation buffers";
            return PCS_ERR_TOO_LARGE;
        }
    }
    size_t bytes;
    if (mul_ovf(sum, sizeof(float), &bytes) || bytes > (size_t)PTRDIFF_MAX) {
        *what = "the KV cache and activation buffers";
        return PCS_ERR_TOO_LARGE;
    }
    *total = sum;
    return PCS_OK;
}

/* ------------------------------------------------------------------ state */

int pcs_llama_state_init(PcsLlamaState *s, const PcsLlamaConfig *c, size_t max_batch,
                         const char **what)
{
    memset(s, 0, sizeof(*s));
    int status = pcs_llama_config_check(c, what);
    if (status)
        return status;
    if (max_batch == 0)
        return PCS_ERR_ARG;
    /* a chunk never holds more tokens than the context */
    const size_t B = min_sz(max_batch, c->seq_len), S = c->seq_len;
    const size_t half = c->head_dim / 2;
    size_t n_floats[N_STATE_BUFS], total;
    status = state_sizes(n_floats, &total, c, B, what);
    if (status)
        return status;
    float *block = calloc(total, sizeof(float));
    const size_t L = c->n_layers;
    s->k_cache = calloc(L, sizeof(float *));
    s->v_cache = calloc(L, sizeof(float *));
    s->l_cache = calloc(L, sizeof(float *));
    s->l_width = calloc(L, sizeof(size_t));
    if (!block || !s->k_cache || !s->v_cache || !s->l_cache || !s->l_width) {
        free(block);
        pcs_llama_state_free(s);
        return PCS_ERR_NOMEM;
    }
    float *p = block;
    s->x = p;        p += n_floats[0];
    s->xb = p;       p += n_floats[1];
    s->q = p;        p += n_floats[2];
    s->att = p;      p += n_floats[3];
    s->hb = p;       p += n_floats[4];
    s->hb2 = p;      p += n_floats[5];
    s->rope_cos = p; p += n_floats[6];
    s->rope_sin = p; p += n_floats[7];
    s->lat = p;
    s->block = block;
    s->max_batch = B;
    s->n_cached = 0;
    /* Hugging Face's rotary table: inv_freq_i = theta^(-2i/hd) in float32
     * (or the config's scaled frequencies), angle = pos * inv_freq_i as a
     * float32 product, then cos/sin. */
    for (size_t i = 0; i < half; i++) {
        float inv_freq = c->rope_inv_freq ? c->rope_inv_freq[i]
                         : (float)(1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->head_dim));
        for (size_t pos = 0; pos < S; pos++) {
            float angle = (float)pos * inv_freq;
            s->rope_cos[pos * half + i] = (float)cos((double)angle);
            s->rope_sin[pos * half + i] = (float)sin((double)angle);
        }
    }
    return PCS_OK;
}

int pcs_llama_state_bf16(PcsLlamaState *s, const PcsLlamaConfig *c)
{
    if (s->wbuf)
        return PCS_OK;
    /* the widest input and the most rows any matrix has: (V or F or Dq or D) x (D or F or Dq) */
    const size_t width = max_sz(max_sz(c->dim, c->hidden_dim), c->n_heads * c->head_dim);
    const size_t rows = max_sz(c->vocab_size, width);
    size_t n = (size_t)PCS_BF16_BUF;
    if (n / width > rows) /* a small model: all of its largest matrix */
        n = rows * width;
    if (n < width)        /* one row at least */
        n = width;
    /* gemm.c's scratch for 512 tokens at a time on up to eight threads, at
     * least (20 MB for TinyLlama's shapes, 52 MB for Llama-3.1-8B's) */
    if (n < pcs_gemm_bf16_scratch(512, width, 8))
        n = pcs_gemm_bf16_scratch(512, width, 8);
    s->wbuf = malloc(n * sizeof(float)); /* sizes checked at init: (V, D), (F, D) fit */
    s->wbuf_floats = s->wbuf ? n : 0;
    return s->wbuf ? PCS_OK : PCS_ERR_NOMEM;
}

void pcs_llama_state_free(PcsLlamaState *s)
{
    free(s->cache_block);
    free(s->k_cache);
    free(s->v_cache);
    free(s->l_cache);
    free(s->l_width);
    free(s->wbuf);
    free(s->kq_cache);
    free(s->att2);
    free(s->block);
    memset(s, 0, sizeof(*s));
}

/* Latent width of a layer (floats per token of its latent rows). */
static size_t latent_width(const PcsLlamaLayer *L)
{
    return (L->k_down ? L->k_rank : 0) + (L->v_down ? L->v_rank : 0);
}

size_t pcs_llama_cache_width(const PcsLlamaState *s, const PcsLlamaConfig *c, size_t l)
{
    const size_t Dkv = c->n_kv_heads * c->head_dim;
    return (s->k_cache[l] ? Dkv : 0) + (s->v_cache[l] ? Dkv : 0) + s->l_width[l];
}

int pcs_llama_state_layout(PcsLlamaState *s, const PcsLlamaConfig *c, const PcsLlamaWeights *w,
                           const char **what)
{
    const size_t L = c->n_layers, S = c->seq_len, Dkv = c->n_kv_heads * c->head_dim;
    const size_t B = s->max_batch;
    *what = NULL;
    size_t cache = 0, lat_k = 0, lat_q = 0, rk_max = 0;
    for (size_t l = 0; l < L; l++) {
        const PcsLlamaLayer *Ly = &w->layers[l];
        if ((Ly->k_up && (!Ly->k_down || Ly->k_rank == 0)) ||
            (Ly->v_up && !Ly->v_down && !Ly->k_down) || (Ly->v_down && (!Ly->v_up || !Ly->v_rank)) ||
            (Ly->k_down && !Ly->k_up) || latent_width(Ly) > pcs_llama_max_latent(c) ||
            (Ly->q_up && (!Ly->q_down || Ly->q_rank == 0 || Ly->q_rank > pcs_llama_max_q_latent(c))))
            return PCS_ERR_ARG;
        /* sizes fit: state_sizes checked L * S * max(2 Dkv, max latent) floats */
        cache += S * ((Ly->k_up ? 0 : Dkv) + (Ly->v_up ? 0 : Dkv) + latent_width(Ly));
        lat_k |= Ly->k_up != NULL;
        if (Ly->k_up && Ly->k_rank > rk_max)
            rk_max = Ly->k_rank;
        lat_q |= Ly->q_up != NULL;
    }
    size_t kbuf = lat_k ? S * Dkv : 0, hatt = 0, total;
    size_t qlat = 0, kpack = rk_max * Dkv; /* rk_max <= max latent: no overflow (sizes checked) */
    if (mul_ovf(c->n_heads, S, &hatt) || /* decode's attention weights, every head */
        (lat_q && mul_ovf(B, c->dim + 1, &qlat)) ||
        __builtin_add_overflow(cache, kbuf, &total) || __builtin_add_overflow(total, hatt, &total) ||
        __builtin_add_overflow(total, qlat, &total) || __builtin_add_overflow(total, kpack, &total) ||
        total > (size_t)PTRDIFF_MAX / sizeof(float)) {
        *what = "the KV cache and latent buffers";
        return PCS_ERR_TOO_LARGE;
    }
    float *block = calloc(total ? total : 1, sizeof(float));
    if (!block)
        return PCS_ERR_NOMEM;
    free(s->cache_block);
    s->cache_block = block;
    float *p = block;
    for (size_t l = 0; l < L; l++) {
        const PcsLlamaLayer *Ly = &w->layers[l];
        s->k_cache[l] = Ly->k_up ? NULL : p;
        p += Ly->k_up ? 0 : S * Dkv;
        s->v_cache[l] = Ly->v_up ? NULL : p;
        p += Ly->v_up ? 0 : S * Dkv;
        s->l_width[l] = latent_width(Ly);
        s->l_cache[l] = s->l_width[l] ? p : NULL;
        p += S * s->l_width[l];
    }
    s->kbuf = kbuf ? p : NULL;
    p += kbuf;
    s->hatt = hatt ? p : NULL;
    p += hatt;
    s->qlat = qlat ? p : NULL;
    p += qlat;
    s->kpack = kpack ? p : NULL;
    s->kpack_rank = rk_max;
    s->n_cached = 0;
    return PCS_OK;
}

/* Does the state's cache layout match w's latents? */
static int layout_matches(const PcsLlamaState *s, const PcsLlamaConfig *c, const PcsLlamaWeights *w)
{
    if (!s->cache_block)
        return 0;
    for (size_t l = 0; l < c->n_layers; l++) {
        const PcsLlamaLayer *Ly = &w->layers[l];
        if ((s->k_cache[l] == NULL) != (Ly->k_up != NULL) ||
            (s->v_cache[l] == NULL) != (Ly->v_up != NULL) || s->l_width[l] != latent_width(Ly) ||
            (Ly->k_up && (!s->kbuf || !s->kpack || Ly->k_rank > s->kpack_rank)) || !s->hatt ||
            (Ly->q_up && !s->qlat))
            return 0;
    }
    return 1;
}

int pcs_llama_set_quant(PcsLlamaState *s, const PcsLlamaConfig *c, const PcsKvQuant *q)
{
    const int bits[3] = {q->k_bits, q->v_bits, q->latent_bits};
    for (int i = 0; i < 3; i++)
        if (bits[i] < 0 || bits[i] > 8)
            return PCS_ERR_ARG;
    if (((q->k_bits || q->v_bits) && q->group == 0) || (q->latent_bits && q->latent_group == 0))
        return PCS_ERR_ARG;
    const int per_channel = q->k_bits && q->k_per_channel;
    if (per_channel && !s->kq_cache) {
        const size_t Dkv = c->n_kv_heads * c->head_dim;
        /* sizes already checked by state_init: (L S Dkv) and (B S) fit */
        float *kq = calloc(c->n_layers * c->seq_len * Dkv, sizeof(float));
        float *att2 = calloc(s->max_batch * c->seq_len, sizeof(float));
        if (!kq || !att2) {
            free(kq);
            free(att2);
            return PCS_ERR_NOMEM;
        }
        s->kq_cache = kq;
        s->att2 = att2;
    } else if (!per_channel) {
        free(s->kq_cache);
        free(s->att2);
        s->kq_cache = s->att2 = NULL;
    }
    s->quant = *q;
    s->quant.k_per_channel = per_channel;
    return PCS_OK;
}

/* ---------------------------------------------------------------- kernels */

/* out (T, D) = x (T, D) / rms(x) * w (D); rms in double, as HF does in fp32 */
static void rmsnorm_forward(float *out, const float *x, const float *w, size_t T, size_t D,
                            float eps)
{
    for (size_t t = 0; t < T; t++) {
        const float *xt = x + t * D;
        float *ot = out + t * D;
        double ss = 0.0;
        for (size_t j = 0; j < D; j++)
            ss += (double)xt[j] * xt[j];
        float inv = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
        for (size_t j = 0; j < D; j++)
            ot[j] = w[j] * (xt[j] * inv);
    }
}

typedef struct {
    float *out;
    const float *W, *x;
    size_t n_out, n_in;
    float beta;
} GemvJob;

/* A thread's range of W's rows (pcs_thread_rows), through OpenBLAS's
 * single-threaded sgemv. */
static void gemv_task(void *arg, int id, int n)
{
    const GemvJob *j = arg;
    size_t lo, hi;
    pcs_thread_rows(j->n_out, id, n, &lo, &hi);
    if (hi > lo)
        pcs_cblas_sgemv(PcsRowMajor, PcsNoTrans, (pcs_blasint)(hi - lo), (pcs_blasint)j->n_in,
                        1.0f, j->W + lo * j->n_in, (pcs_blasint)j->n_in, j->x, 1, j->beta,
                        j->out + lo, 1);
}

/* out (T, n_out) = beta * out + x (T, n_in) @ W^T, W (n_out, n_in) float32;
 * ldo / ldx are row strides. One token: a gemv (bandwidth-bound decode),
 * its rows split over pcasurgery's threads when the step runs there
 * (s->on_pool: OpenBLAS is single-threaded meanwhile). Several: an sgemm,
 * on OpenBLAS's threads, or with s->pool_prefill one single-threaded sgemm
 * per pool thread on its range of W's rows (OpenBLAS's idle workers spin
 * for a while after each call, and two sets of threads taking turns on two
 * cores cost a bf16 prefill ~20%). */
static void matmul_f32(float *out, size_t ldo, const float *x, size_t ldx, const float *W,
                       size_t T, size_t n_in, size_t n_out, float beta, const PcsLlamaState *s)
{
    if (T == 1 && s->on_pool) {
        GemvJob j = {out, W, x, n_out, n_in, beta};
        /* small products are not worth waking a thread for (~10 us) */
        pcs_parallel(gemv_task, &j, n_out * n_in < ((size_t)1 << 16) ? 1 : s->n_threads);
        return;
    }
    if (T > 1 && s->pool_prefill) {
        pcs_matmul_rows(out, ldo, x, ldx, W, T, n_in, n_out, beta,
                        T * n_out * n_in < ((size_t)1 << 16) ? 1 : s->n_threads);
        return;
    }
    if (T == 1)
        pcs_cblas_sgemv(PcsRowMajor, PcsNoTrans, (pcs_blasint)n_out, (pcs_blasint)n_in, 1.0f,
                        W, (pcs_blasint)n_in, x, 1, beta, out, 1);
    else
        pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)T, (pcs_blasint)n_out,
                        (pcs_blasint)n_in, 1.0f, x, (pcs_blasint)ldx, W, (pcs_blasint)n_in,
                        beta, out, (pcs_blasint)ldo);
}

/* The same for a weight that may be bf16 (bf16.c: widened as it is read;
 * decode on pcasurgery's threads, prefill through sgemm on widened blocks). */
static void matmul_forward(float *out, size_t ldo, const float *x, size_t ldx, PcsMat W,
                           size_t T, size_t n_in, size_t n_out, float beta,
                           const PcsLlamaState *s)
{
    if (!W.bf16)
        matmul_f32(out, ldo, x, ldx, (const float *)W.data, T, n_in, n_out, beta, s);
    else if (T == 1)
        pcs_gemv_bf16(out, (const unsigned short *)W.data, x, n_out, n_in, beta,
                      s->n_threads);
    else
        pcs_matmul_bf16(out, ldo, x, ldx, (const unsigned short *)W.data, T, n_in, n_out, beta,
                        s->wbuf, s->wbuf_floats, s->n_threads, s->pool_prefill);
}

/* One head u (hd) rotated by the angles' cos/sin (hd/2), pairs i0..hd/2-1:
 * element i pairs with i + hd/2. Products and sums rounded one by one (no
 * FMA), so every version gives the same bits. */
static void rope_pairs(float *u, const float *cs, const float *sn, size_t half, size_t i0)
{
    for (size_t i = i0; i < half; i++) {
        float a = u[i], b = u[i + half];
        u[i] = a * cs[i] - b * sn[i];
        u[i + half] = b * cs[i] + a * sn[i];
    }
}

static void rope_head(float *u, const float *cs, const float *sn, size_t half)
{
    rope_pairs(u, cs, sn, half, 0);
}

#ifdef PCS_X86
__attribute__((target("avx2"))) static void rope_head_avx2(float *u, const float *cs,
                                                           const float *sn, size_t half)
{
    rope_pairs(u, cs, sn, half, pcs_rope_avx2(u, cs, sn, half));
}

static int have_avx2(void)
{
    static int v = -1; /* benign race: every thread computes the same */
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2");
    }
    return v;
}
#endif

/* Rotate every head of v (T, n_heads * hd) in place, token t at position P + t. */
static void rope_forward(float *v, const PcsLlamaState *s, size_t T, size_t P, size_t n_heads,
                         size_t hd)
{
    const size_t half = hd / 2;
    void (*rot)(float *, const float *, const float *, size_t) = rope_head;
#ifdef PCS_X86
    if (have_avx2())
        rot = rope_head_avx2;
#endif
    for (size_t t = 0; t < T; t++) {
        const float *cs = s->rope_cos + (P + t) * half; /* (hd/2) */
        const float *sn = s->rope_sin + (P + t) * half;
        for (size_t h = 0; h < n_heads; h++)
            rot(v + (t * n_heads + h) * hd, cs, sn, half);
    }
}

/* e^x for softmax and SiLU: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a
 * degree-6 polynomial in r, times 2^n), each product and sum rounded one by
 * one, so that the AVX2 version below (8 lanes) gives the same bits as this
 * one; within 1 ulp of e^x (tests/test_attn.py). NaN stays NaN; e^x is +Inf
 * above 88.3763 (e^x is within 1.5x of FLT_MAX there) and 0 below -87.3365
 * (where it would be subnormal). */
#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365447505531f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f /* ln 2 = C1 - C2, C1 exact in 9 bits: n * C1 is exact */
#define EXP_C2 -2.12194440e-4f
static const float exp_poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static float exp_f32(float x)
{
    if (!(x >= EXP_LO)) /* NaN or tiny */
        return x != x ? x : 0.0f;
    if (x > EXP_HI)
        return INFINITY;
    const float fx = floorf(x * EXP_LOG2E + 0.5f);
    float r = x - fx * EXP_C1;
    r = r - fx * EXP_C2;
    const float z = r * r;
    float y = exp_poly[0];
    for (int i = 1; i < 6; i++)
        y = y * r + exp_poly[i];
    y = y * z + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

#ifdef PCS_X86
__attribute__((target("avx2"))) static inline __m256 exp8_avx2(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi); /* NaN -> lo */
    const __m256 fx = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)),
                                                    _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C1)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(EXP_C2)));
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_set1_ps(exp_poly[0]);
    for (int i = 1; i < 6; i++)
        y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(exp_poly[i]));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), r), _mm256_set1_ps(1.0f));
    const __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
    /* the scalar version's special cases: below lo 0, above hi +Inf, NaN kept */
    y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* a[i] = e^(a[i] - m), i < n; returns how many it did (a multiple of 8) */
__attribute__((target("avx2"))) static size_t exp_sub_avx2(float *a, size_t n, float m)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(a + i, exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(a + i),
                                                        _mm256_set1_ps(m))));
    return i;
}

/* hb[i] = hb[i] / (1 + e^-hb[i]) * hb2[i], i < n; returns how many it did */
__attribute__((target("avx2"))) static size_t swiglu_avx2(float *hb, const float *hb2, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(hb + i);
        const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 q = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(hb + i, _mm256_mul_ps(q, _mm256_loadu_ps(hb2 + i)));
    }
    return i;
}
#endif

void pcs_exp_sub(float *a, size_t n, float m, int simd)
{
    size_t i = 0;
#ifdef PCS_X86
    if (simd && have_avx2())
        i = exp_sub_avx2(a, n, m);
#else
    (void)simd;
#endif
    for (; i < n; i++)
        a[i] = exp_f32(a[i] - m);
}

/* Causal softmax of att (T, C) rows (row stride ld) in place: row t sees
 * columns <= P + t, and with a sliding window W > 0 only the last W of them
 * (columns > P + t - W, as transformers' sliding_window_overlay). */
static void softmax_causal(float *att, size_t ld, size_t T, size_t C, size_t P, size_t W)
{
    for (size_t t = 0; t < T; t++) {
        float *a = att + t * ld;
        const size_t n = P + t + 1; /* visible columns: lo..n-1 */
        const size_t lo = W && n > W ? n - W : 0;
        float mx = a[lo];
        for (size_t j = lo + 1; j < n; j++)
            mx = a[j] > mx ? a[j] : mx;
        pcs_exp_sub(a + lo, n - lo, mx, 1);
        double sum = 0.0;
        for (size_t j = lo; j < n; j++)
            sum += a[j];
        float inv = (float)(1.0 / sum);
        for (size_t j = 0; j < lo; j++)
            a[j] = 0.0f;
        for (size_t j = lo; j < n; j++)
            a[j] *= inv;
        for (size_t j = n; j < C; j++)
            a[j] = 0.0f;
    }
}

typedef struct {
    float *att;
    size_t H, S, C, P, W;
} SoftmaxJob;

static void softmax_task(void *arg, int id, int n)
{
    const SoftmaxJob *j = arg;
    for (size_t h = j->H * (size_t)id / (size_t)n; h < j->H * (size_t)(id + 1) / (size_t)n; h++)
        softmax_causal(j->att + h * j->S, j->S, 1, j->C, j->P, j->W);
}

/* Decode's softmax: att (H, S), one row per head over columns 0..C-1 (the
 * query at position P), heads split over n_threads of pool.c's threads. */
static void softmax_heads(float *att, size_t H, size_t S, size_t C, size_t P, size_t W,
                          int n_threads)
{
    SoftmaxJob j = {att, H, S, C, P, W};
    pcs_parallel(softmax_task, &j, H * C >= 4096 ? n_threads : 1);
}

/* x (T, n) row stride ld += b (n) on every row; nothing when b is NULL. */
static void add_bias(float *x, size_t ld, const float *b, size_t T, size_t n)
{
    if (!b)
        return;
    for (size_t t = 0; t < T; t++)
        for (size_t j = 0; j < n; j++)
            x[t * ld + j] += b[j];
}

/* sigma_l (D, D) += xb^T xb (its upper triangle), sum_l (D) += the rows of
 * xb (T, D). A full sgemm: OpenBLAS's ssyrk measured ~3x slower here. */
static void calib_accumulate(PcsLlamaState *s, const float *xb, size_t T, size_t D, size_t l)
{
    float *tmp = s->calib_tmp; /* (D, D) */
    pcs_cblas_sgemm(PcsRowMajor, PcsTrans, PcsNoTrans, (pcs_blasint)D, (pcs_blasint)D,
                    (pcs_blasint)T, 1.0f, xb, (pcs_blasint)D, xb, (pcs_blasint)D, 0.0f, tmp,
                    (pcs_blasint)D);
    double *sg = s->calib_sigma + l * D * D, *sm = s->calib_sum + l * D;
    for (size_t i = 0; i < D; i++)
        for (size_t j = i; j < D; j++)
            sg[i * D + j] += tmp[i * D + j];
    for (size_t t = 0; t < T; t++)
        for (size_t j = 0; j < D; j++)
            sm[j] += xb[t * D + j];
}

/* The layer's new latent rows: lc rows P..P+T-1 (row stride lw) = [xb
 * k_down^T | xb v_down^T], each part rounded as a cache at latent_bits
 * would hold it. */
static void latent_append(float *lc, size_t lw, const PcsLlamaState *s, const PcsLlamaLayer *L,
                          const float *xb, size_t T, size_t D)
{
    const PcsKvQuant *Qz = &s->quant;
    size_t off = 0;
    const float *down[2] = {L->k_down, L->v_down};
    const size_t rank[2] = {L->k_rank, L->v_rank};
    for (int i = 0; i < 2; i++) {
        if (!down[i])
            continue;
        matmul_f32(lc + off, lw, xb, D, down[i], T, D, rank[i], 0.0f, s);
        if (Qz->latent_bits)
            pcs_fake_quant_rows(lc + off, T, rank[i], lw, Qz->latent_bits, Qz->latent_group);
        off += rank[i];
    }
}

/* Keys of positions j0..j0+n-1 rebuilt from the cached latents: kbuf rows
 * j0.. (n, Dkv) = lc[j0.., 0:rk] k_up^T (+ bk), rotated. One sgemm per
 * range: RoPE sits between k_up and the scores, so k_up cannot be absorbed
 * into the query (Palu's reconstruction). */
static void latent_keys(float *kbuf, const float *lc, size_t lw, const PcsLlamaState *s,
                        const PcsLlamaLayer *L, size_t j0, size_t n, size_t KV, size_t hd)
{
    const size_t Dkv = KV * hd;
    float *kb = kbuf + j0 * Dkv; /* rows j0..j0+n-1 */
    matmul_f32(kb, Dkv, lc + j0 * lw, lw, L->k_up, n, L->k_rank, Dkv, 0.0f, s);
    add_bias(kb, Dkv, L->bk, n, Dkv);
    rope_forward(kb, s, n, j0, KV, hd);
}

/* Per-channel K (KIVI): a query at position p sees the keys of complete
 * groups before its own, [0, G floor(p / G)), as quantised (kq) and the
 * rest exact. att (T, C) holds the exact scores; their first columns are
 * replaced by the scores against kq (hd, row stride Dkv). */
static void closed_groups_scores(float *att, float *att2, const float *qh, const float *kqh,
                                 size_t T, size_t P, size_t C, size_t hd, size_t Dq, size_t Dkv,
                                 float scale, size_t G)
{
    const size_t bmax = (P + T - 1) / G * G; /* the last row's boundary */
    if (bmax == 0)
        return;
    if (T == 1)
        pcs_cblas_sgemv(PcsRowMajor, PcsNoTrans, (pcs_blasint)bmax, (pcs_blasint)hd, scale, kqh,
                        (pcs_blasint)Dkv, qh, 1, 0.0f, att2, 1);
    else
        pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)T, (pcs_blasint)bmax,
                        (pcs_blasint)hd, scale, qh, (pcs_blasint)Dq, kqh, (pcs_blasint)Dkv, 0.0f,
                        att2, (pcs_blasint)bmax);
    for (size_t t = 0; t < T; t++) {
        const size_t b = (P + t) / G * G;
        memcpy(att + t * C, att2 + t * bmax, b * sizeof(float));
    }
}

/* Prefill attention on pcasurgery's threads: each thread takes a range of
 * the chunk's query rows, sized so that every range holds about the same
 * share of the causal triangle, and runs every head over it with
 * single-threaded OpenBLAS calls. A range [t0, t1) needs columns up to
 * P + t1 only; its rows of att (T, C), of the output and of lat are its
 * own. */
typedef struct {
    float *att, *out, *lat;          /* (T, C); (T, Dq); (T, rv) a latent V's */
    const float *q, *keys, *vc, *lc; /* (T, Dq); (C, Dkv); (C, Dkv) or NULL; latents */
    const float *v_up, *bv;          /* a latent V's up-projection (Dkv, rv), bias */
    size_t T, P, C, H, G, hd, Dq, Dkv, lw, voff, rv, W;
    float scale;
} PrefillAttnJob;

/* The first row of thread id's range: work before row t is P t + t (t+1) / 2 */
static size_t prefill_row(const PrefillAttnJob *j, int id, int n)
{
    if (id >= n)
        return j->T;
    const double p = (double)j->P + 0.5, total = (double)j->P * (double)j->T +
                                                 (double)j->T * ((double)j->T + 1.0) / 2.0;
    const double t = sqrt(p * p + 2.0 * total * id / n) - p;
    const size_t r = (size_t)(t + 0.5);
    return r < j->T ? r : j->T;
}

static void prefill_attn_task(void *arg, int id, int n)
{
    const PrefillAttnJob *j = arg;
    const size_t t0 = prefill_row(j, id, n), t1 = prefill_row(j, id + 1, n);
    if (t1 <= t0)
        return;
    const size_t nr = t1 - t0, Cc = j->P + t1;
    float *a = j->att + t0 * j->C; /* (nr, Cc), row stride C */
    for (size_t h = 0; h < j->H; h++) {
        const size_t g = h / j->G;
        float *oh = j->out + t0 * j->Dq + h * j->hd; /* (nr, hd), row stride Dq */
        pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)nr, (pcs_blasint)Cc,
                        (pcs_blasint)j->hd, j->scale, j->q + t0 * j->Dq + h * j->hd,
                        (pcs_blasint)j->Dq, j->keys + g * j->hd, (pcs_blasint)j->Dkv, 0.0f, a,
                        (pcs_blasint)j->C);
        softmax_causal(a, j->C, nr, Cc, j->P + t0, j->W);
        if (j->vc) {
            pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)nr,
                            (pcs_blasint)j->hd, (pcs_blasint)Cc, 1.0f, a, (pcs_blasint)j->C,
                            j->vc + g * j->hd, (pcs_blasint)j->Dkv, 0.0f, oh, (pcs_blasint)j->Dq);
        } else { /* u (nr, rv) = att c_V; out_h = u v_up_g^T (+ bv_g) */
            float *u = j->lat + t0 * j->rv;
            pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)nr,
                            (pcs_blasint)j->rv, (pcs_blasint)Cc, 1.0f, a, (pcs_blasint)j->C,
                            j->lc + j->voff, (pcs_blasint)j->lw, 0.0f, u, (pcs_blasint)j->rv);
            pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)nr,
                            (pcs_blasint)j->hd, (pcs_blasint)j->rv, 1.0f, u, (pcs_blasint)j->rv,
                            j->v_up + g * j->hd * j->rv, (pcs_blasint)j->rv, 0.0f, oh,
                            (pcs_blasint)j->Dq);
            add_bias(oh, j->Dq, j->bv ? j->bv + g * j->hd : NULL, nr, j->hd);
        }
    }
}

typedef struct {
    float *hb;
    const float *hb2;
    size_t n;
} SwigluJob;

void pcs_swiglu(float *hb, const float *hb2, size_t n, int simd)
{
    size_t i = 0;
#ifdef PCS_X86
    if (simd && have_avx2())
        i = swiglu_avx2(hb, hb2, n);
#else
    (void)simd;
#endif
    for (; i < n; i++) {
        const float g = hb[i];
        hb[i] = g / (1.0f + exp_f32(-g)) * hb2[i];
    }
}

static void swiglu_range(float *hb, const float *hb2, size_t lo, size_t hi)
{
    pcs_swiglu(hb + lo, hb2 + lo, hi - lo, 1);
}

static void swiglu_task(void *arg, int id, int n)
{
    const SwigluJob *j = arg;
    swiglu_range(j->hb, j->hb2, j->n * (size_t)id / (size_t)n, j->n * (size_t)(id + 1) / (size_t)n);
}

/* One chunk of T <= B tokens at positions P..P+T-1.
 * logits (T or 1, V): every row when all_logits, else the last token's. */
static void forward_chunk(float *logits, PcsLlamaState *s, const PcsLlamaConfig *c,
                          const PcsLlamaWeights *w, const int *tokens, size_t T, size_t P,
                          int all_logits)
{
    const size_t D = c->dim, F = c->hidden_dim, V = c->vocab_size, S = c->seq_len;
    const size_t H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, G = H / KV;
    const size_t Dq = H * hd, Dkv = KV * hd, C = P + T;
    const float scale = 1.0f / sqrtf((float)hd);
    const PcsKvQuant *Qz = &s->quant;
    float *x = s->x;     /* (T, D) */
    float *xb = s->xb;   /* (T, max(D, Dq)) */
    float *q = s->q;     /* (T, Dq) */
    float *att = s->att; /* (T, C) */
    float *hb = s->hb;   /* (T, F) */
    float *hb2 = s->hb2; /* (T, F) */

    /* a decode step runs on pcasurgery's threads where attn.c's kernels do
     * (not with per-channel K quantisation: its scores need the BLAS path) */
    s->on_pool = T == 1 && pcs_attn_supported(hd) && !(Qz->k_bits && Qz->k_per_channel);
    s->pool_prefill = T > 1 && pcs_attn_pool() && !(Qz->k_bits && Qz->k_per_channel) &&
                      !s->calib_sigma;
    s->n_threads = s->on_pool || s->pool_prefill ? pcs_blas_threads_off() : pcs_get_num_threads();
    for (size_t t = 0; t < T; t++) {
        const size_t row = (size_t)tokens[t] * D;
        if (w->tok_emb.bf16)
            pcs_widen_bf16(x + t * D, (const unsigned short *)w->tok_emb.data + row, D, 1);
        else
            memcpy(x + t * D, (const float *)w->tok_emb.data + row, D * sizeof(float));
    }

    for (size_t l = 0; l < c->n_layers; l++) {
        const PcsLlamaLayer *L = &w->layers[l];
        float *kc = s->k_cache[l]; /* (S, Dkv) dense K, or NULL: K latent */
        float *vc = s->v_cache[l]; /* (S, Dkv) dense V, or NULL: V latent */
        float *lc = s->l_cache[l]; /* (S, lw) latent rows [c_K | c_V], or NULL */
        const size_t lw = s->l_width[l];
        /* V's latent: its columns of the latent rows and its width */
        const size_t voff = L->v_down && L->k_down ? L->k_rank : 0;
        const size_t rv = L->v_down ? L->v_rank : L->k_rank;

        /* attention: q, k, v; K and V (or their latents) go straight into
         * the cache rows P.. */
        rmsnorm_forward(xb, x, L->attn_norm, T, D, c->rms_eps);
        if (s->calib_sigma)
            calib_accumulate(s, xb, T, D, l);
        if (L->q_up) {
            matmul_f32(s->qlat, L->q_rank, xb, D, L->q_down, T, D, L->q_rank, 0.0f, s);
            matmul_f32(q, Dq, s->qlat, L->q_rank, L->q_up, T, L->q_rank, Dq, 0.0f, s);
        } else
            matmul_forward(q, Dq, xb, D, L->wq, T, D, Dq, 0.0f, s);
        add_bias(q, Dq, L->bq, T, Dq);
        rope_forward(q, s, T, P, H, hd);
        if (lc)
            latent_append(lc + P * lw, lw, s, L, xb, T, D);
        const float *keys; /* (C, Dkv): the dense cache, or rebuilt from the latents */
        float *kq = NULL;  /* (S, Dkv) per-channel quantised K of complete groups */
        if (kc) {
            float *kt = kc + P * Dkv; /* (T, Dkv) */
            matmul_forward(kt, Dkv, xb, D, L->wk, T, D, Dkv, 0.0f, s);
            add_bias(kt, Dkv, L->bk, T, Dkv);
            rope_forward(kt, s, T, P, KV, hd);
            if (Qz->k_bits && !Qz->k_per_channel)
                pcs_fake_quant_rows(kt, T, Dkv, Dkv, Qz->k_bits, Qz->group);
            if (Qz->k_bits && Qz->k_per_channel) {
                const size_t G = Qz->group;
                kq = s->kq_cache + l * S * Dkv;
                for (size_t g0 = P / G * G; g0 + G <= C; g0 += G) { /* groups completed now */
                    memcpy(kq + g0 * Dkv, kc + g0 * Dkv, G * Dkv * sizeof(float));
                    pcs_fake_quant_cols(kq + g0 * Dkv, G, Dkv, Dkv, Qz->k_bits);
                }
            }
            keys = kc;
        } else {
            if (T > 1) /* decode rebuilds them block by block below */
                latent_keys(s->kbuf, lc, lw, s, L, 0, C, KV, hd);
            keys = s->kbuf;
        }
        if (vc) {
            float *vt = vc + P * Dkv; /* (T, Dkv) */
            matmul_forward(vt, Dkv, xb, D, L->wv, T, D, Dkv, 0.0f, s);
            add_bias(vt, Dkv, L->bv, T, Dkv);
            if (Qz->v_bits)
                pcs_fake_quant_rows(vt, T, Dkv, Dkv, Qz->v_bits, Qz->group);
        }

        if (s->on_pool) {
            /* decode on pcasurgery's threads (attn.c): the scores (a latent
             * K's keys rebuilt, rotated and scored in L1, never stored),
             * the softmax per head, then the values: out (H, hd) = att V,
             * per head group; or, V latent, its up-projection absorbed:
             * u (H, rv) = att c_V for every head at once (they share the
             * latent), then out_h = v_up_g u_h (+ bv_g), v_up applied once
             * per head, not once per position. */
            if (!kc)
                pcs_attn_pack(s->kpack, L->k_up, Dkv, L->k_rank);
            const PcsAttnScores sc = {
                .att = s->hatt, .lda = S, .q = q, .H = H, .KV = KV, .hd = hd, .C = C,
                .scale = scale, .keys = kc, .lat = kc ? NULL : lc, .ld = kc ? Dkv : lw,
                .rk = L->k_rank, .pack = s->kpack, .bias = L->bk, .rope_cos = s->rope_cos,
                .rope_sin = s->rope_sin};
            pcs_attn_scores(&sc, s->n_threads);
            softmax_heads(s->hatt, H, S, C, P, c->sliding_window, s->n_threads);
            const PcsAttnWeighted wv = {
                .out = vc ? xb : s->lat, .ldo = vc ? hd : rv, .a = s->hatt, .lda = S,
                .b = vc ? vc : lc + voff, .ldb = vc ? Dkv : lw, .bstep = vc ? hd : 0, .M = H,
                .N = vc ? hd : rv, .C = C, .G = vc ? G : H};
            pcs_attn_weighted(&wv, s->n_threads);
            for (size_t g = 0; !vc && g < KV; g++) { /* small: this thread */
                float *og = xb + g * G * hd; /* (G, hd) */
                pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)G,
                                (pcs_blasint)hd, (pcs_blasint)rv, 1.0f, s->lat + g * G * rv,
                                (pcs_blasint)rv, L->v_up + g * hd * rv, (pcs_blasint)rv, 0.0f, og,
                                (pcs_blasint)hd);
                add_bias(og, hd, L->bv ? L->bv + g * hd : NULL, G, hd);
            }
        } else if (s->pool_prefill) {
            const PrefillAttnJob pj = {
                .att = att, .out = xb, .lat = s->lat, .q = q, .keys = keys, .vc = vc, .lc = lc,
                .v_up = L->v_up, .bv = L->bv, .T = T, .P = P, .C = C, .H = H, .G = G, .hd = hd,
                .Dq = Dq, .Dkv = Dkv, .lw = lw, .voff = voff, .rv = rv,
                .W = c->sliding_window, .scale = scale};
            pcs_parallel(prefill_attn_task, (void *)&pj, s->n_threads);
        } else if (T == 1 && !kq) {
            /* decode on OpenBLAS: per key/value head g, its G query heads'
             * scores (G, C) in one product, then their outputs (G, hd) in
             * one more: the keys and values (or latents) are read once per
             * head group. A latent K's keys are rebuilt KEY_BLOCK positions
             * at a time, each block scored while it is in cache; a latent
             * V's up-projection is absorbed as above. */
            const size_t nb = kc ? C : KEY_BLOCK;
            for (size_t j0 = 0; j0 < C; j0 += nb) {
                const size_t n = min_sz(nb, C - j0);
                if (!kc)
                    latent_keys(s->kbuf, lc, lw, s, L, j0, n, KV, hd);
                for (size_t g = 0; g < KV; g++)
                    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)G,
                                    (pcs_blasint)n, (pcs_blasint)hd, scale, q + g * G * hd,
                                    (pcs_blasint)hd, keys + j0 * Dkv + g * hd, (pcs_blasint)Dkv,
                                    0.0f, s->hatt + g * G * S + j0, (pcs_blasint)S);
            }
            softmax_heads(s->hatt, H, S, C, P, c->sliding_window, 1);
            if (!vc) /* every head attends over the same latent: u (H, rv) = att c_V */
                pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)H,
                                (pcs_blasint)rv, (pcs_blasint)C, 1.0f, s->hatt, (pcs_blasint)S,
                                lc + voff, (pcs_blasint)lw, 0.0f, s->lat, (pcs_blasint)rv);
            for (size_t g = 0; g < KV; g++) {
                float *og = xb + g * G * hd; /* (G, hd) */
                if (vc)
                    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)G,
                                    (pcs_blasint)hd, (pcs_blasint)C, 1.0f, s->hatt + g * G * S,
                                    (pcs_blasint)S, vc + g * hd, (pcs_blasint)Dkv, 0.0f, og,
                                    (pcs_blasint)hd);
                else {
                    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)G,
                                    (pcs_blasint)hd, (pcs_blasint)rv, 1.0f, s->lat + g * G * rv,
                                    (pcs_blasint)rv, L->v_up + g * hd * rv, (pcs_blasint)rv, 0.0f,
                                    og, (pcs_blasint)hd);
                    add_bias(og, hd, L->bv ? L->bv + g * hd : NULL, G, hd);
                }
            }
        } else {
            /* per query head h (key/value head h / G): att = q_h K^T * scale,
             * causal softmax, out_h = att V (or, V latent, (att c_V) v_up_g^T
             * + bv_g); out_h lands in xb (T, Dq). */
            for (size_t h = 0; h < H; h++) {
                const size_t g = h / G;
                const float *qh = q + h * hd;        /* (T, hd), row stride Dq */
                const float *kh = keys + g * hd;     /* (C, hd), row stride Dkv */
                float *oh = xb + h * hd;             /* (T, hd), row stride Dq */
                if (T == 1) {
                    pcs_cblas_sgemv(PcsRowMajor, PcsNoTrans, (pcs_blasint)C, (pcs_blasint)hd,
                                    scale, kh, (pcs_blasint)Dkv, qh, 1, 0.0f, att, 1);
                } else {
                    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsTrans, (pcs_blasint)T,
                                    (pcs_blasint)C, (pcs_blasint)hd, scale, qh, (pcs_blasint)Dq,
                                    kh, (pcs_blasint)Dkv, 0.0f, att, (pcs_blasint)C);
                }
                if (kq)
                    closed_groups_scores(att, s->att2, qh, kq + g * hd, T, P, C, hd, Dq, Dkv,
                                         scale, Qz->group);
                softmax_causal(att, C, T, C, P, c->sliding_window);
                if (vc) {
                    const float *vh = vc + g * hd; /* (C, hd), row stride Dkv */
                    if (T == 1) {
                        pcs_cblas_sgemv(PcsRowMajor, PcsTrans, (pcs_blasint)C, (pcs_blasint)hd,
                                        1.0f, vh, (pcs_blasint)Dkv, att, 1, 0.0f, oh, 1);
                    } else {
                        pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)T,
                                        (pcs_blasint)hd, (pcs_blasint)C, 1.0f, att,
                                        (pcs_blasint)C, vh, (pcs_blasint)Dkv, 0.0f, oh,
                                        (pcs_blasint)Dq);
                    }
                } else {
                    /* u (T, rv) = att c_V; out_h = u v_up_g^T (T, hd) */
                    pcs_cblas_sgemm(PcsRowMajor, PcsNoTrans, PcsNoTrans, (pcs_blasint)T,
                                    (pcs_blasint)rv, (pcs_blasint)C, 1.0f, att, (pcs_blasint)C,
                                    lc + voff, (pcs_blasint)lw, 0.0f, s->lat, (pcs_blasint)rv);
                    matmul_f32(oh, Dq, s->lat, rv, L->v_up + g * hd * rv, T, rv, hd, 0.0f, s);
                    add_bias(oh, Dq, L->bv ? L->bv + g * hd : NULL, T, hd);
                }
            }
        }
        /* x += out @ Wo^T (+ bo) */
        matmul_forward(x, D, xb, Dq, L->wo, T, Dq, D, 1.0f, s);
        add_bias(x, D, L->bo, T, D);

        /* SwiGLU MLP: x += W_down (silu(W_gate xn) * W_up xn) */
        rmsnorm_forward(xb, x, L->ffn_norm, T, D, c->rms_eps);
        matmul_forward(hb, F, xb, D, L->w_gate, T, D, F, 0.0f, s);
        matmul_forward(hb2, F, xb, D, L->w_up, T, D, F, 0.0f, s);
        if (s->pool_prefill) {
            SwigluJob sj = {hb, hb2, T * F};
            pcs_parallel(swiglu_task, &sj, s->n_threads);
        } else
            swiglu_range(hb, hb2, 0, T * F);
        matmul_forward(x, D, hb, F, L->w_down, T, F, D, 1.0f, s);
    }

    /* final norm and the classifier, for every row or only the last */
    if (all_logits) {
        rmsnorm_forward(xb, x, w->final_norm, T, D, c->rms_eps);
        matmul_forward(logits, V, xb, D, w->lm_head, T, D, V, 0.0f, s);
    } else {
        rmsnorm_forward(xb, x + (T - 1) * D, w->final_norm, 1, D, c->rms_eps);
        matmul_forward(logits, V, xb, D, w->lm_head, 1, D, V, 0.0f, s);
    }
    if (s->on_pool || s->pool_prefill)
        pcs_blas_threads_on();
}

int pcs_llama_forward(float *logits, PcsLlamaState *s, const PcsLlamaConfig *c,
                      const PcsLlamaWeights *w, const int *tokens, size_t T, size_t P,
                      int all_logits)
{
    if (T == 0 || P > s->n_cached || P + T > c->seq_len)
        return PCS_ERR_ARG;
    if (!s->wbuf) { /* bf16 weights need the widening buffer (pcs_llama_state_bf16) */
        int bf16 = w->tok_emb.bf16 || w->lm_head.bf16;
        for (size_t l = 0; l < c->n_layers && !bf16; l++) {
            const PcsLlamaLayer *L = &w->layers[l];
            bf16 = L->wq.bf16 || L->wk.bf16 || L->wv.bf16 || L->wo.bf16 || L->w_gate.bf16 ||
                   L->w_up.bf16 || L->w_down.bf16;
        }
        if (bf16)
            return PCS_ERR_ARG;
    }
    for (size_t t = 0; t < T; t++)
        if (tokens[t] < 0 || (size_t)tokens[t] >= c->vocab_size)
            return PCS_ERR_ARG;
    if (!layout_matches(s, c, w)) /* the cache must be laid out for these latents */
        return PCS_ERR_ARG;
    const size_t B = s->max_batch, V = c->vocab_size;
    for (size_t t0 = 0; t0 < T; t0 += B) {
        size_t n = T - t0 < B ? T - t0 : B;
        /* without all_logits each chunk writes its last row to logits (1, V)
         * and the final chunk's is the one that stays */
        forward_chunk(all_logits ? logits + t0 * V : logits, s, c, w, tokens + t0, n, P + t0,
                      all_logits);
        s->n_cached = P + t0 + n;
    }
    return PCS_OK;
}
