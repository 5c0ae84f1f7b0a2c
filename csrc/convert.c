/* convert.c: tensor storage formats to float32 (checkpoint loading).
 *
 * Dimension legend: n = number of values.
 * bf16 is the top half of a float32, so the conversion is a shift and is
 * exact; IEEE half is widened exactly too (subnormals, infinities and NaNs
 * included). Memory-bound: ~1 s for TinyLlama's 1.1e9 values on one core.
 */
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

int pcs_convert_to_f32(float *out, const void *src, size_t n, int dtype)
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
