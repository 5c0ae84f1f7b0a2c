/* convert.c: tensor storage formats to float32 (checkpoint loading).
 *
 * Dimension legend: n = number of values, t = threads.
 * bf16 is the top half of a float32, so the conversion is a shift and is
 * exact; IEEE half is widened exactly too (subnormals, infinities and NaNs
 * included). Every value is checked for NaN/Inf on the way (an exponent of
 * all ones, tested on the raw bits in the same pass). Sources need no
 * alignment: an unpadded safetensors header leaves 16-bit data at odd
 * addresses, so values are read with memcpy (one unaligned load each).
 * Memory-bound (and page-fault-bound on fresh output memory), so it runs on
 * as many threads as pcasurgery's BLAS uses.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "pcasurgery.h"

static uint16_t load16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint32_t load32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* IEEE 754 binary16 -> binary32, exactly. */
static uint32_t half_bits_to_f32_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) /* inf / nan */
        return sign | 0x7f800000u | (man << 13);
    if (exp == 0) {
        if (man == 0) /* +-0 */
            return sign;
        /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        man &= 0x3ffu;
        return sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
    }
    return sign | ((exp + 127 - 15) << 23) | (man << 13);
}

/* The loops below are written so that the compiler vectorises them (at -O2
 * too): a plain load (through memcpy, any alignment), a shift or a table-free
 * widening, and an OR-reduction of "exponent all ones" flags. */
#define EXP32 0x7f800000u
#if defined(__GNUC__) && !defined(__clang__)
/* GCC's -O2 cost model ("very cheap") does not vectorise loops of unknown
 * length; these are pure integer loops, so vectorising changes no result. */
#define VECTORISE __attribute__((optimize("tree-vectorize", "vect-cost-model=cheap")))
#else
#define VECTORISE
#endif

VECTORISE static uint32_t bf16_block(uint32_t *restrict out, const unsigned char *restrict src, size_t n)
{
    uint32_t special = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)load16(src + 2 * i) << 16;
        out[i] = b;
        special |= (b & EXP32) + 0x00800000u; /* carries into bit 31 iff all ones */
    }
    return special >> 31;
}

VECTORISE static uint32_t f32_block(uint32_t *restrict out, const unsigned char *restrict src, size_t n)
{
    uint32_t special = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = load32(src + 4 * i);
        out[i] = b;
        special |= (b & EXP32) + 0x00800000u;
    }
    return special >> 31;
}

VECTORISE static uint32_t f16_block(uint32_t *restrict out, const unsigned char *restrict src, size_t n)
{
    uint32_t special = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = load16(src + 2 * i);
        out[i] = half_bits_to_f32_bits(h);
        special |= (uint32_t)(h & 0x7c00u) + 0x0400u; /* carries into bit 15 iff all ones */
    }
    return (special >> 15) & 1u;
}

/* out (n) = float32 bits of the n values at src; returns nonzero when any
 * of them is NaN or Inf (the exponent is all ones). */
static int convert_serial(uint32_t *out, const unsigned char *src, size_t n, int dtype)
{
    switch (dtype) {
    case PCS_DTYPE_F32:
        return (int)f32_block(out, src, n);
    case PCS_DTYPE_BF16:
        return (int)bf16_block(out, src, n);
    default: /* PCS_DTYPE_F16 */
        return (int)f16_block(out, src, n);
    }
}

/* Index of the first NaN/Inf of out (n) float32 bits, known to hold one. */
static size_t first_special(const uint32_t *out, size_t n)
{
    size_t i = 0;
    while (i < n && (out[i] & EXP32) != EXP32)
        i++;
    return i;
}

typedef struct {
    uint32_t *out;
    const unsigned char *src;
    size_t n;
    int dtype;
    int special; /* result: NaN/Inf seen in this chunk */
} ConvertJob;

static void *convert_job(void *arg)
{
    ConvertJob *j = arg;
    j->special = convert_serial(j->out, j->src, j->n, j->dtype);
    return NULL;
}

enum { MAX_CONVERT_THREADS = 16, MIN_PER_THREAD = 1 << 20, CHUNK_ALIGN = 1024 };

int pcs_convert_to_f32(float *out, const void *src, size_t n, int dtype, int n_threads,
                       size_t *nonfinite_at)
{
    if (dtype != PCS_DTYPE_F32 && dtype != PCS_DTYPE_F16 && dtype != PCS_DTYPE_BF16)
        return PCS_ERR_ARG;
    const size_t item = dtype == PCS_DTYPE_F32 ? 4 : 2;
    size_t t = n_threads < 1 ? 1 : (size_t)n_threads;
    if (t > MAX_CONVERT_THREADS)
        t = MAX_CONVERT_THREADS;
    if (t > n / MIN_PER_THREAD)
        t = n / MIN_PER_THREAD;
    if (t < 1)
        t = 1;
    /* t chunks of ceil(n / t) values rounded up to CHUNK_ALIGN cover all n
     * (t * chunk >= n); the last chunks may be short or empty. */
    const size_t chunk = ((n / t + (n % t != 0)) + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
    ConvertJob jobs[MAX_CONVERT_THREADS];
    pthread_t tid[MAX_CONVERT_THREADS];
    int started[MAX_CONVERT_THREADS] = {0};
    for (size_t i = 0; i < t; i++) {
        size_t lo = i * chunk < n ? i * chunk : n;
        size_t hi = n - lo > chunk ? lo + chunk : n;
        jobs[i] = (ConvertJob){(uint32_t *)out + lo, (const unsigned char *)src + lo * item,
                               hi - lo, dtype, 0};
    }
    /* jobs 1..t-1 on new threads (or here, if a thread cannot start), job 0 here */
    for (size_t i = 1; i < t; i++) {
        started[i] = pthread_create(&tid[i], NULL, convert_job, &jobs[i]) == 0;
        if (!started[i])
            convert_job(&jobs[i]);
    }
    convert_job(&jobs[0]);
    for (size_t i = 1; i < t; i++)
        if (started[i])
            pthread_join(tid[i], NULL);
    for (size_t i = 0; i < t; i++) {
        if (jobs[i].special) {
            *nonfinite_at = (size_t)(jobs[i].out - (uint32_t *)out) +
                            first_special(jobs[i].out, jobs[i].n);
            return PCS_ERR_NONFINITE;
        }
    }
    return PCS_OK;
}

/* Index of the first NaN/Inf among n bf16 values (exponent all ones), or n
 * when all are finite; a vectorised OR-reduction per block of 4096 values. */
VECTORISE static uint32_t bf16_special(const uint16_t *restrict src, size_t n)
{
    uint32_t special = 0;
    for (size_t i = 0; i < n; i++)
        special |= (uint32_t)(src[i] & 0x7f80u) + 0x0080u; /* carries into bit 15 iff all ones */
    return (special >> 15) & 1u;
}

size_t pcs_bf16_first_nonfinite(const unsigned short *src, size_t n)
{
    enum { BLOCK = 4096 };
    for (size_t b = 0; b < n; b += BLOCK) {
        const size_t m = n - b < BLOCK ? n - b : BLOCK;
        if (bf16_special(src + b, m))
            for (size_t i = b; i < b + m; i++)
                if ((src[i] & 0x7f80u) == 0x7f80u)
                    return i;
    }
    return n;
}
