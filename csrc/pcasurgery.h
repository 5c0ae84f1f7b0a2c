/* pcasurgery.h: status codes, structs and prototypes shared by the C core.
 *
 * The kernels (pca.c: stacked PCA; llama.c: the forward pass; convert.c:
 * checkpoint dtypes; core.c: status strings and BLAS threads) know nothing
 * about Python: plain pointers, size_t sizes, outputs first, inputs const.
 * module.c is the only file that includes Python.h and the NumPy headers.
 */
#ifndef PCASURGERY_H
#define PCASURGERY_H

#include <stddef.h>

/* ---- status codes: 0 ok, negative = failure, pcs_status_str() names them */
enum {
    PCS_OK = 0,
    PCS_ERR_NOMEM = -1,       /* malloc failed */
    PCS_ERR_NONFINITE = -2,   /* NaN or Inf in an input matrix */
    PCS_ERR_TOO_LARGE = -3,   /* a size does not fit LAPACK's 32-bit int */
    PCS_ERR_NO_CONVERGE = -4, /* LAPACK eigensolver did not converge (info>0) */
    PCS_ERR_LAPACK_ARG = -5,  /* LAPACK rejected an argument (info<0): our bug */
    PCS_ERR_ZERO_VARIANCE = -6, /* every centered entry is zero */
    PCS_ERR_ARG = -7          /* a size or pointer argument is invalid */
};

const char *pcs_status_str(int status);

/* ---- PCA of row-stacked matrices (pca.c)
 *
 * Dimension legend:
 *   M = number of stacked input matrices
 *   n = total rows = samples (sum of the rows of the M matrices)
 *   d = columns = features (the model's input dimension)
 *   r = min(n, d) = number of components computed
 *   k = number of components used by project / reconstruct, k <= r
 */

enum { PCS_PRECISION_DOUBLE = 0, PCS_PRECISION_SINGLE = 1 };
/* AUTO: the Gram route (eigenproblem of X X^T, n x n) when n < d, else the
 * covariance route (X^T X, d x d). Both are valid for any shape. */
enum { PCS_SOLVER_AUTO = 0, PCS_SOLVER_GRAM = 1, PCS_SOLVER_COVARIANCE = 2 };

typedef struct {
    const float *data; /* (rows, d) row-major, row stride ld floats */
    size_t rows;
    size_t ld;         /* >= d */
} PcsMatrix;

/* Where a non-finite value was found (filled on PCS_ERR_NONFINITE). */
typedef struct {
    size_t matrix, row, col;
} PcsWhere;

/* Fit a PCA on the M matrices stacked by rows: every eigenvalue, and the
 * k leading components only.
 *   components (r, d)  capacity; the first k rows are filled: principal axes,
 *                      descending variance, svd_flip signs
 *   eigvals    (r)     squared singular values of the (centered) stack,
 *                      i.e. sum over samples of the squared scores, descending
 *   mean       (d)     column mean of the stack (zeros when !center)
 *   total      (1)     squared Frobenius norm of the (centered) stack, in double
 *   k_out      (1)     k, the number of components computed:
 *                      keep_var in (0, 1): the fewest whose cumulative ratio
 *                      exceeds keep_var (scikit-learn's rule); keep_var >= 1:
 *                      all r; keep_var <= 0: keep_k (0 = all r)
 * precision: PCS_PRECISION_DOUBLE keeps the eigensolve in double (every
 *   eigenvalue above ~1e-10 of the largest to ~1e-10 relative accuracy);
 *   PCS_PRECISION_SINGLE rounds the Gram/covariance matrix to float32 first
 *   (faster; eigenvalues accurate to ~1e-7 of the largest only).
 * solver: PCS_SOLVER_* (which symmetric eigenproblem).
 * Memory: allocates its own workspace; the caller's buffers are outputs only. */
int pcs_pca_fit(float *components, double *eigvals, float *mean, double *total,
                size_t *k_out, const PcsMatrix *mats, size_t n_mats, size_t d,
                int center, int precision, int solver, size_t keep_k,
                double keep_var, PcsWhere *where);

/* Z (n, k) = (X (n, d) - mean (d)) @ C_k^T (d, k); Z has row stride ldz.
 * Checks X while centering it: PCS_ERR_NONFINITE with *where filled. */
int pcs_pca_project(float *Z, size_t ldz, const float *X, size_t ldx,
                    const float *mean, const float *C, size_t n, size_t d,
                    size_t k, PcsWhere *where);

/* Xhat (n, d) = Z (n, k) @ C_k (k, d) + mean (d)   when mean != NULL,
 * Xhat (n, d) += Z (n, k) @ C_k (k, d)             when mean == NULL
 * (the second form adds components k0..k1 to an existing reconstruction, so a
 * sweep over increasing k costs one full-rank product in total). */
int pcs_pca_reconstruct(float *Xhat, size_t ldxhat, const float *Z, size_t ldz,
                        const float *C, const float *mean, size_t n, size_t d,
                        size_t k);

/* ---- the Llama forward pass (llama.c)
 *
 * Dimension legend: D = dim, F = hidden_dim, V = vocab_size, S = seq_len,
 * H = n_heads, KV = n_kv_heads, hd = head_dim, Dq = H*hd, Dkv = KV*hd,
 * L = n_layers, B = max_batch (tokens per prefill chunk).
 */
typedef struct {
    size_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size;
    size_t seq_len;    /* S: context (and KV cache) capacity */
    float rms_eps;
    double rope_theta;
    /* RoPE's inverse frequencies (hd/2), read by state_init only: NULL for
     * theta^(-2i/hd); scaled RoPE (Llama 3's, linear) passes its own. */
    const float *rope_inv_freq;
    /* Mistral's sliding window: position p attends to keys p-W+1..p only
     * (0: no window). */
    size_t sliding_window;
} PcsLlamaConfig;

/* A weight matrix, row-major (out, in): float32, or bf16 bits (uint16)
 * that the kernels widen to float32 as they read them (bf16.c). */
typedef struct {
    const void *data;
    int bf16;
} PcsMat;

/* One decoder layer's weights, row-major (out, in); borrowed from arrays
 * that the caller keeps alive. */
typedef struct {
    const float *attn_norm; /* (D) */
    PcsMat wq;              /* (Dq, D) */
    PcsMat wk;              /* (Dkv, D) */
    PcsMat wv;              /* (Dkv, D) */
    PcsMat wo;              /* (D, Dq) */
    const float *ffn_norm;  /* (D) */
    PcsMat w_gate;          /* (F, D) */
    PcsMat w_up;            /* (F, D) */
    PcsMat w_down;          /* (D, F) */
    /* Optional latent K/V (the cache then holds latents, not K and V).
     * K latent when k_up is set: K = k_up c_K, c_K = k_down x, k_down
     * (rk, D), k_up (Dkv, rk). V latent when v_up is set: V = v_up c_V with
     * c_V = v_down x, v_down (rv, D), v_up (Dkv, rv); or, when v_down is
     * NULL, c_V = c_K (one latent shared by K and V, v_up (Dkv, rk)). A
     * projection without its latent (k_up or v_up NULL) uses wk / wv and a
     * dense cache. The layer's latent cache row is [c_K | c_V] (c_K alone
     * when shared), rounded when PcsKvQuant.latent_bits. */
    const float *k_down, *k_up, *v_down, *v_up;
    size_t k_rank, v_rank;
    /* Optional factored Q (q_up NULL: q = wq x): q = q_up (q_down x),
     * q_down (rq, D), q_up (Dq, rq). */
    const float *q_down, *q_up;
    size_t q_rank;
    /* Optional biases (NULL: none): bq (Dq), bk, bv (Dkv) as Qwen2 and
     * Llama's attention_bias have, bo (D) Llama's only. bk and bv are added
     * after the projection, latent or not: a bias is not part of W's rows
     * and stays dense under surgery. */
    const float *bq, *bk, *bv, *bo;
} PcsLlamaLayer;

typedef struct {
    PcsMat tok_emb;          /* (V, D) */
    const float *final_norm; /* (D) */
    PcsMat lm_head;          /* (V, D), may equal tok_emb (tied) */
    PcsLlamaLayer *layers;   /* (L) */
} PcsLlamaWeights;

/* Simulated cache quantisation (quant.c's asymmetric min/max groups with
 * float16 scale and minimum); 0 bits = not quantised. */
typedef struct {
    int k_bits, v_bits;   /* the K / V cache, 1..8 */
    size_t group;         /* values per group: along a token's row, or tokens
                             per group for per-channel K */
    int k_per_channel;    /* K per channel over groups of `group` tokens, as
                             KIVI: a query sees complete groups quantised and
                             its own, still open, group exact */
    int latent_bits;      /* the latent of latent K/V layers, per token */
    size_t latent_group;  /* latent values per group */
} PcsKvQuant;

/* Everything a forward pass writes, carved from one allocation (kq_cache
 * and att2 only while per-channel K quantisation is on). */
typedef struct {
    size_t max_batch;  /* B */
    size_t n_cached;   /* positions 0..n_cached-1 of the cache are valid */
    /* set per chunk: a decode step runs all of its parallel work on
     * pcasurgery's threads (pool.c: gemv, attention in attn.c) and none on
     * OpenBLAS's (pcs_blas_threads_off) */
    int on_pool;
    /* a prefill chunk (T > 1) runs its weight products, attention and
     * SwiGLU on pcasurgery's threads too, each thread's sgemm
     * single-threaded (not with calibration or per-channel K quantisation) */
    int pool_prefill;
    int n_threads;     /* the chunk's thread count (OpenBLAS's at its start) */
    float *x;          /* (B, D) residual stream */
    float *xb;         /* (B, max(D, Dq)) normed input, attention output */
    float *q;          /* (B, Dq) */
    float *att;        /* (B, S) one head's attention weights */
    float *hb, *hb2;   /* (B, F) MLP gate / up */
    float *rope_cos;   /* (S, hd/2) */
    float *rope_sin;   /* (S, hd/2) */
    float *lat;        /* (max(B, H), max latent) attention-weighted latents (absorbed V) */
    /* The cache, laid out for the weights' latents (pcs_llama_state_layout):
     * per layer a dense K (S, Dkv) and V (S, Dkv), or NULL where the layer's
     * K or V is latent, and the latent rows (S, l_width[l]) or NULL. */
    float **k_cache, **v_cache, **l_cache;
    size_t *l_width;
    float *kbuf;       /* (S, Dkv) keys rebuilt from latents (a latent K layer) */
    float *kpack;      /* (kpack_rank, Dkv) a layer's k_up packed for attn.c, or NULL */
    size_t kpack_rank; /* the largest k_rank of a latent K layer */
    float *hatt;       /* (H, S) decode: every head's attention weights */
    float *qlat;       /* (B, D + 1) latent of a factored Q */
    void *cache_block;
    PcsKvQuant quant;
    float *kq_cache;   /* (L, S, Dkv) K of complete token groups, quantised */
    float *att2;       /* (B, S) scores against kq_cache */
    /* calibration (NULL when off): per layer, the attention input h after
     * RMSNorm: sigma (L, D, D) += h h^T (upper triangle), sum (L, D) += h */
    double *calib_sigma, *calib_sum;
    float *calib_tmp;  /* (D, D) */
    /* bf16 weights in prefill: blocks of rows widened to float32 for
     * sgemm, wbuf_floats floats (PCS_BF16_BUF, or less for a small model;
     * at least one row); NULL until pcs_llama_state_bf16 */
    float *wbuf;
    size_t wbuf_floats;
    void *block;
} PcsLlamaState;

enum { PCS_BF16_BUF = 1 << 22 }; /* 16 MB: blocks big enough for sgemm to run at speed */

/* PCS_ERR_ARG for a zero size, n_heads not a multiple of n_kv_heads or an
 * odd head_dim; PCS_ERR_TOO_LARGE, with the quantity named in *what, when a
 * size or product does not fit the 32-bit BLAS or size_t. */
int pcs_llama_config_check(const PcsLlamaConfig *c, const char **what);
/* max_batch is capped at seq_len (a chunk never holds more tokens). */
int pcs_llama_state_init(PcsLlamaState *s, const PcsLlamaConfig *c, size_t max_batch,
                         const char **what);
void pcs_llama_state_free(PcsLlamaState *s);
/* Run tokens (T) at positions P..P+T-1 (P <= n_cached; P + T <= S), append
 * their keys and values to the cache, and write logits: (T, V) when
 * all_logits, else (1, V) for the last token. Allocates nothing. */
int pcs_llama_forward(float *logits, PcsLlamaState *s, const PcsLlamaConfig *c,
                      const PcsLlamaWeights *w, const int *tokens, size_t T, size_t P,
                      int all_logits);

/* (Re)allocate the cache for w's latents: dense K and V where a layer has
 * none, latent rows where it has them (and the key, attention and Q-latent
 * scratch they need). Clears the cache (n_cached = 0). PCS_ERR_ARG for
 * latent ranks out of range or a V latent shared with a K that has none;
 * PCS_ERR_TOO_LARGE (with *what); PCS_ERR_NOMEM. On error the state is
 * unchanged. */
int pcs_llama_state_layout(PcsLlamaState *s, const PcsLlamaConfig *c, const PcsLlamaWeights *w,
                           const char **what);
/* Floats per token of layer l's cache: 2 Dkv dense, the latent width, or a mix. */
size_t pcs_llama_cache_width(const PcsLlamaState *s, const PcsLlamaConfig *c, size_t l);

/* Allocate the state's bf16 widening buffer (once; PCS_ERR_NOMEM). Needed
 * before a forward pass over any bf16 weight. */
int pcs_llama_state_bf16(PcsLlamaState *s, const PcsLlamaConfig *c);

/* Set the cache quantisation; allocates kq_cache/att2 for per-channel K
 * (frees them otherwise). PCS_ERR_ARG for bits outside 0..8 or a zero group
 * with bits set; PCS_ERR_NOMEM. The cache is not cleared. */
int pcs_llama_set_quant(PcsLlamaState *s, const PcsLlamaConfig *c, const PcsKvQuant *q);
/* The largest k_rank + v_rank allowed, max(2 Dkv + 2, D + 1) (the width of `lat`). */
size_t pcs_llama_max_latent(const PcsLlamaConfig *c);
/* The largest q_rank allowed: D + 1. */
size_t pcs_llama_max_q_latent(const PcsLlamaConfig *c);

/* ---- simulated quantisation (quant.c): in place, x <- dequant(quant(x)) */
float pcs_round_f16(float x);
/* x (T, n) row stride ld: each row in groups of g values; bits 1..8 */
void pcs_fake_quant_rows(float *x, size_t T, size_t n, size_t ld, int bits, size_t g);
/* x (T, n) row stride ld: each column over the T rows as one group */
void pcs_fake_quant_cols(float *x, size_t T, size_t n, size_t ld, int bits);

/* ---- activation-aware bases (calib.c) */
/* M (n, n) = W Σ W^T in double, W (n, d) the rows of the stacked mats,
 * Σ (d, d) symmetric. PCS_ERR_NONFINITE with *where for a NaN/Inf in W. */
int pcs_weighted_gram(double *M, const PcsMatrix *mats, size_t n_mats, size_t d,
                      const double *sigma, PcsWhere *where);
/* S (n, n) in place: the upper triangle (diagonal included) times scale,
 * mirrored into the lower one. */
void pcs_symmetrize_upper(double *S, size_t n, double scale);
/* Eigen-decomposition of symmetric A (n, n) (upper triangle read):
 * vals (n) descending, vecs (n, n) row-major whose column i is the
 * eigenvector of vals[i], its largest-magnitude entry positive. */
int pcs_sym_eig(double *vals, double *vecs, const double *A, size_t n);

/* ---- checkpoint storage formats (convert.c) */
enum { PCS_DTYPE_F32 = 0, PCS_DTYPE_F16 = 1, PCS_DTYPE_BF16 = 2 };
/* out (n) float32 = the n little-endian values of `dtype` at src (no
 * alignment needed), split over up to n_threads threads. Every value is
 * converted; PCS_ERR_NONFINITE when some are NaN or Inf, with the index of
 * the first in *nonfinite_at. */
int pcs_convert_to_f32(float *out, const void *src, size_t n, int dtype, int n_threads,
                       size_t *nonfinite_at);

/* ---- threads for the core's own kernels (pool.c): fn(arg, id, n) for id
 * 0..n-1, id 0 on the calling thread, the others on persistent workers */
typedef void (*pcs_task_fn)(void *arg, int id, int n);
void pcs_parallel(pcs_task_fn fn, void *arg, int n);
/* Thread id's rows [*lo, *hi) of n_rows split over n threads in contiguous,
 * 8-row aligned ranges (threads share no cache line of a float output). */
static inline void pcs_thread_rows(size_t n_rows, int id, int n, size_t *lo, size_t *hi)
{
    size_t per = (n_rows + (size_t)n - 1) / (size_t)n;
    per = (per + 7) / 8 * 8;
    *lo = (size_t)id * per < n_rows ? (size_t)id * per : n_rows;
    *hi = *lo + per < n_rows ? *lo + per : n_rows;
}

/* ---- bf16-resident weights (bf16.c): W (n_out, n_in) bf16 bits */
/* out (n_out) = beta * out + W x (n_in), rows split over n_threads */
void pcs_gemv_bf16(float *out, const unsigned short *W, const float *x, size_t n_out,
                   size_t n_in, float beta, int n_threads);
/* a[i] = e^(a[i] - m) (llama.c's softmax), and hb[i] = SiLU(hb[i]) * hb2[i]
 * (its SwiGLU), i < n: 8 lanes at a time on AVX2 CPUs when simd is 1, the
 * same bits as one at a time (simd 0). */
void pcs_exp_sub(float *a, size_t n, float m, int simd);
void pcs_swiglu(float *hb, const float *hb2, size_t n, int simd);
/* dst (n) float32 = the bf16 values src (n) */
void pcs_widen_bf16(float *dst, const unsigned short *src, size_t n, int n_threads);
/* out (T, n_out) row stride ldo = beta * out + x (T, n_in) W^T, W widened
 * into buf (buf_floats floats, at least n_in) a slab at a time for sgemm.
 * pool: W's rows split over n_threads of pool.c's threads, each with its
 * part of buf and single-threaded sgemm calls (the caller has OpenBLAS
 * single-threaded, pcs_blas_threads_off), or gemm.c's product where
 * pcs_gemm_bf16_on() and buf holds its scratch for 64 tokens (or T) at a
 * time (pcs_gemm_bf16_scratch);
 * else this thread alone, its sgemm calls on OpenBLAS's threads. */
void pcs_matmul_bf16(float *out, size_t ldo, const float *x, size_t ldx,
                     const unsigned short *W, size_t T, size_t n_in, size_t n_out, float beta,
                     float *buf, size_t buf_floats, int n_threads, int pool);
/* The same for float32 W on pool.c's threads: each thread's range of rows
 * one single-threaded sgemm (the caller has OpenBLAS single-threaded). */
void pcs_matmul_rows(float *out, size_t ldo, const float *x, size_t ldx, const float *W,
                     size_t T, size_t n_in, size_t n_out, float beta, int n_threads);
/* "avx512f", "avx2+fma" or "generic": the dot product chosen at run time */
const char *pcs_bf16_kernel(void);

/* ---- prefill's product that packs bf16 W itself (gemm.c, AVX-512F)
 * Only where pcs_gemm_bf16_on() said 1 (the CPU has AVX-512F): the caller
 * decides once per product, so that switching paths meanwhile changes none
 * of it. A chunk of tb <= TB tokens at a time: */
/* thread id of n's share of the chunk's rows x (tb, K), row stride ldx,
 * packed into xpack (pcs_gemm_bf16_scratch's x part: TB rows, a multiple
 * of 8): the threads pack a chunk's rows together, whole tiles of 8 */
void pcs_gemm_bf16_pack_x(float *xpack, size_t TB, const float *x, size_t ldx, size_t K,
                          size_t tb, int id, int n);
/* out[:, lo:hi] (tb rows, stride ldo) = beta * out + x W[lo:hi]^T on this
 * thread, from the chunk's packed x; W (n, K) bf16 bits; wpack: this
 * thread's pcs_gemm_bf16_w_floats(K) of scratch */
void pcs_gemm_bf16_rows(float *out, size_t ldo, const float *xpack, size_t TB, size_t tb,
                        size_t K, const unsigned short *W, size_t lo, size_t hi, float beta,
                        float *wpack);
/* scratch floats: each thread's panel of W; T tokens of x at a time shared
 * by n_threads; and the tokens per chunk that floats of scratch allow (a
 * multiple of 8, at most T rounded up to 8; 0: not even the panels fit) */
size_t pcs_gemm_bf16_w_floats(size_t K);
size_t pcs_gemm_bf16_scratch(size_t T, size_t K, int n_threads);
size_t pcs_gemm_bf16_tokens(size_t floats, size_t K, int n_threads, size_t T);
/* 1 when pcs_matmul_bf16 uses it: AVX-512F, unless PCASURGERY_BF16_KERNEL
 * names a narrower kernel, PCASURGERY_BF16_PREFILL=sgemm, or after
 * pcs_gemm_bf16_set("sgemm"); name: "avx512f" or "sgemm" */
int pcs_gemm_bf16_on(void);
const char *pcs_gemm_bf16_name(void);
/* "sgemm": the widening + sgemm path; "auto" (or NULL): gemm.c's where the
 * CPU has AVX-512F. PCS_ERR_ARG for any other name. */
int pcs_gemm_bf16_set(const char *name);

/* Index of the first NaN/Inf of n bf16 values, or n when all are finite
 * (convert.c). */
size_t pcs_bf16_first_nonfinite(const unsigned short *src, size_t n);

/* ---- decode's attention scores (attn.c) */
enum { PCS_ATTN_MAX_HD = 256 };
/* att[h * lda + j] = scale * q_h . k_{h / G, j} for heads h < H and
 * positions j < C. Keys: dense, keys + j * ld (Dkv, already rotated); or,
 * lat set, rebuilt: rope_j(k_up c_j + bias), c_j = lat + j * ld (rk
 * floats), k_up given as pack (pcs_attn_pack), rope tables (S, hd/2). */
typedef struct {
    float *att;
    size_t lda;
    const float *q; /* (H, hd), rotated */
    size_t H, KV, hd, C;
    float scale;
    const float *keys, *lat;
    size_t ld, rk;
    const float *pack, *bias, *rope_cos, *rope_sin;
} PcsAttnScores;
/* Whether steps run on pool.c's threads at all (AVX2+FMA, and
 * PCASURGERY_ATTN_KERNEL / pcs_attn_set_kernel not "blas"): decode where
 * pcs_attn_supported, and prefill chunks (llama.c's pool_prefill). */
int pcs_attn_pool(void);
/* Whether pcs_attn_scores runs here for head size hd (AVX2+FMA, hd a
 * multiple of 16 up to PCS_ATTN_MAX_HD, PCASURGERY_ATTN_KERNEL not "blas"). */
int pcs_attn_supported(size_t hd);
/* "avx2+fma" or "blas": what decode's attention scores run on */
const char *pcs_attn_kernel(void);
/* "blas": use the BLAS path from now on; "auto" or NULL: the kernel where
 * the CPU has it. PCS_ERR_ARG for any other name. The first call of
 * pcs_attn_supported reads PCASURGERY_ATTN_KERNEL when this was not called. */
int pcs_attn_set_kernel(const char *name);
/* pack (Dkv / 16, rk, 16) = k_up (Dkv, rk) in 16-row panels, transposed */
void pcs_attn_pack(float *pack, const float *k_up, size_t Dkv, size_t rk);
/* The scores, split over up to n_threads threads (pool.c); only where
 * pcs_attn_supported(hd). */
void pcs_attn_scores(const PcsAttnScores *a, int n_threads);
/* out (M, N) row stride ldo = a (M, C) row stride lda times b_g (C, N) row
 * stride ldb, where row r of a belongs to group g = r / G (G divides M) and
 * b_g = b + g * bstep: the attention weights of decode times the values
 * (G heads per KV group, bstep hd) or times the latents (G = M, bstep 0).
 * Tiles of rows and 16 columns split over up to n_threads threads; only
 * where pcs_attn_supported. */
typedef struct {
    float *out;
    size_t ldo;
    const float *a;
    size_t lda;
    const float *b;
    size_t ldb, bstep;
    size_t M, N, C, G;
} PcsAttnWeighted;
void pcs_attn_weighted(const PcsAttnWeighted *a, int n_threads);

/* ---- threads (core.c): OpenBLAS's count, which pool.c's jobs follow */
void pcs_set_num_threads(int n);
int pcs_get_num_threads(void);
/* OpenBLAS's own threads off (its count 1) for a decode step that runs its
 * parallel work on pool.c's threads and calls OpenBLAS single-threaded from
 * each: OpenBLAS's idle workers spin, and would share the cores with
 * pool.c's. Returns the count the step may use (the one before). Steps in
 * several threads nest: the last one's _on puts the count back, and
 * meanwhile get/set_num_threads read and set that saved count. Another
 * caller's OpenBLAS products run single-threaded during a step (slower,
 * not different). */
int pcs_blas_threads_off(void);
/* A kernel switch (attn.c, gemm.c) in *slot: -1 not chosen yet, 0 the path
 * named `off`, else cpu()'s answer (what this CPU runs). set: name `off`
 * or "auto" (NULL) stores it (PCS_ERR_ARG for any other name); get: the
 * slot, chosen first from the environment variable env (its value `off`,
 * else "auto") through set. Atomic: either may run while another thread
 * reads the slot. */
int pcs_switch_set(int *slot, const char *name, const char *off, int (*cpu)(void));
int pcs_switch_get(int *slot, const char *env, const char *off, int (*set)(const char *));
void pcs_blas_threads_on(void);
const char *pcs_blas_config(void);
const char *pcs_blas_library(void); /* path of the loaded BLAS, or NULL */

#endif /* PCASURGERY_H */
