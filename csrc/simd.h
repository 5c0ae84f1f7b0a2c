/* simd.h: the AVX2 helpers that more than one kernel file uses (bf16.c,
 * attn.c, llama.c). x86-64 with GCC or Clang only; each function carries
 * its own target attribute, so the files are built without -march. */
#ifndef PCS_SIMD_H
#define PCS_SIMD_H

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <stddef.h>
#define PCS_X86 1

/* The sum of a's eight lanes. */
__attribute__((target("avx2,fma"))) static inline float pcs_hsum8(__m256 a)
{
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
}

/* One head u rotated by cos/sin (half each), element i with i + half, for
 * pairs 0..(half / 8) * 8 - 1; returns the first pair not done (the caller's
 * scalar tail). Products and sums rounded one by one (no FMA), so the
 * scalar and vector versions give the same bits. */
__attribute__((target("avx2"))) static inline size_t pcs_rope_avx2(float *u, const float *cs,
                                                                   const float *sn, size_t half)
{
    size_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 a = _mm256_loadu_ps(u + i), b = _mm256_loadu_ps(u + half + i);
        const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(sn + i);
        _mm256_storeu_ps(u + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(u + half + i, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
    }
    return i;
}
#endif

#endif /* PCS_SIMD_H */
