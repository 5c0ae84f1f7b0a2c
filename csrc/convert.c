/* convert.c: tensor storage formats to float32 (checkpoint loading).
 *
 * Dimension legend: n = number of values.
 * bf16 is the top half of a float32, so the conversion is a shift and is
 * exact; IEEE half is widened exactly too (subnormals, infinities and NaNs
 * included). Memory-bound (and page-fault-bound on fresh output memory), so
 * it runs on as many threads as pcasurgery's BLAS uses.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "pcasurgery.h"

/* out (n) = float32 of the n little-endian bf16 values at src */
static void bf16_to_f32(float *out, const uint16_t *src, size_t n)
{
    uint32_t *o = (uint32_t *)out;
    for (size_t i = 0; i < n; i++)
        o[i] = (uint32_t)src[i] << 16;
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

static void f16_to_f32(float *out, const uint16_t *src, size_t n)
{
    uint32_t *o = (uint32_t *)out;
    for (size_t i = 0; i < n; i++)
        o[i] = half_bits_to_f32_bits(src[i]);
}

static int convert_serial(float *out, const void *src, size_t n, int dtype)
{
    switch (dtype) {
    case PCS_DTYPE_F32:
        memcpy(out, src, n * sizeof(float));
        return PCS_OK;
    case PCS_DTYPE_BF16:
        bf16_to_f32(out, (const uint16_t *)src, n);
        return PCS_OK;
    case PCS_DTYPE_F16:
        f16_to_f32(out, (const uint16_t *)src, n);
        return PCS_OK;
    default:
        return PCS_ERR_ARG;
    }
}

typedef struct {
    float *out;
    const char *src;
    size_t n;
    int dtype;
} ConvertJob;

static void *convert_job(void *arg)
{
    ConvertJob *j = arg;
    convert_serial(j->out, j->src, j->n, j->dtype);
    return NULL;
}

enum { MAX_CONVERT_THREADS = 16, MIN_PER_THREAD = 1 << 20 };

int pcs_convert_to_f32(float *out, const void *src, size_t n, int dtype, int n_threads)
{
    if (dtype != PCS_DTYPE_F32 && dtype != PCS_DTYPE_F16 && dtype != PCS_DTYPE_BF16)
        return PCS_ERR_ARG;
    const size_t item = dtype == PCS_DTYPE_F32 ? 4 : 2;
    size_t t = n_threads < 1 ? 1 : (size_t)n_threads;
    if (t > MAX_CONVERT_THREADS)
        t = MAX_CONVERT_THREADS;
    if (t > n / MIN_PER_THREAD)
        t = n / MIN_PER_THREAD;
    if (t <= 1)
        return convert_serial(out, src, n, dtype);
    ConvertJob jobs[MAX_CONVERT_THREADS];
    pthread_t tid[MAX_CONVERT_THREADS];
    size_t chunk = (n / t + 1023) & ~(size_t)1023, started = 0;
    for (size_t i = 0; i < t; i++) {
        size_t lo = i * chunk < n ? i * chunk : n;
        size_t hi = lo + chunk < n ? lo + chunk : n;
        jobs[i] = (ConvertJob){out + lo, (const char *)src + lo * item, hi - lo, dtype};
    }
    /* jobs 1..t-1 on new threads (or here, if a thread cannot start), job 0 here */
    for (size_t i = 1; i < t; i++) {
        if (pthread_create(&tid[i], NULL, convert_job, &jobs[i]) == 0)
            started |= (size_t)1 << i;
        else
            convert_job(&jobs[i]);
    }
    convert_job(&jobs[0]);
    for (size_t i = 1; i < t; i++)
        if (started & ((size_t)1 << i))
            pthread_join(tid[i], NULL);
    return PCS_OK;
}
