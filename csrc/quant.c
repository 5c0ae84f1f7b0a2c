/* quant.c: simulated KV-cache quantisation, asymmetric uniform ("min/max").
 *
 * A group of values x_1..x_g is stored as b-bit integers q_i =
 * round((x_i - mn) / scale), clamped to [0, 2^b - 1], with scale =
 * (mx - mn) / (2^b - 1) and mn kept as float16 each (4 bytes per group, as
 * KIVI and llama.cpp's Q4_1 store them). The kernels here quantise and
 * dequantise in place: x <- q * scale + mn, with scale and mn rounded to
 * float16 exactly as they would be stored, so the error is the error of the
 * stored cache.
 *
 * Dimension legend: T = rows (tokens), n = values per row, ld = row stride,
 * g = values per group along a row.
 */
#include <math.h>
#include <stddef.h>

#include "pcasurgery.h"

/* x rounded to the nearest float16 value (ties to even), saturating at the
 * largest finite one; subnormals keep a step of 2^-24. */
float pcs_round_f16(float x)
{
    if (!isfinite(x))
        return x;
    float a = fabsf(x);
    if (a >= 65504.0f)
        return x < 0 ? -65504.0f : 65504.0f;
    if (a < 6.103515625e-05f) /* subnormal float16: multiples of 2^-24 */
        return ldexpf(nearbyintf(ldexpf(x, 24)), -24);
    int e;
    float m = frexpf(x, &e);                        /* |m| in [0.5, 1) */
    return ldexpf(nearbyintf(ldexpf(m, 11)), e - 11); /* 11 significant bits */
}

/* Quantise-dequantise x[0], x[stride], ..., x[(n-1) stride] as one group. */
static void fake_quant_group(float *x, size_t n, size_t stride, int bits)
{
    float mn = x[0], mx = x[0];
    for (size_t i = 1; i < n; i++) {
        float v = x[i * stride];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    const float levels = (float)((1u << bits) - 1u);
    const float lo = pcs_round_f16(mn);
    const float scale = pcs_round_f16((mx - lo) / levels);
    if (!(scale > 0.0f)) { /* a constant group: every value becomes the stored minimum */
        for (size_t i = 0; i < n; i++)
            x[i * stride] = lo;
        return;
    }
    const float inv = 1.0f / scale;
    for (size_t i = 0; i < n; i++) {
        float q = nearbyintf((x[i * stride] - lo) * inv);
        q = q < 0.0f ? 0.0f : (q > levels ? levels : q);
        x[i * stride] = q * scale + lo;
    }
}

/* x (T, n), row stride ld: each row in groups of g consecutive values (the
 * last group of a row may be shorter). bits in [1, 8]. */
void pcs_fake_quant_rows(float *x, size_t T, size_t n, size_t ld, int bits, size_t g)
{
    for (size_t t = 0; t < T; t++)
        for (size_t j = 0; j < n; j += g)
            fake_quant_group(x + t * ld + j, n - j < g ? n - j : g, 1, bits);
}

/* x (T, n), row stride ld: each column over the T rows as one group (KIVI's
 * per-channel key quantisation, one group of T tokens). */
void pcs_fake_quant_cols(float *x, size_t T, size_t n, size_t ld, int bits)
{
    for (size_t j = 0; j < n; j++)
        fake_quant_group(x + j, T, ld, bits);
}
