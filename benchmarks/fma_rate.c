/* fma_rate.c: how many float32 multiply-adds one core issues per ns as
 * vfmadd231ps (16 per zmm instruction) and as AVX512-BF16's vdpbf16ps (32
 * bf16 x bf16 products per instruction, summed in pairs into float32), each
 * alone and the two interleaved (do they share the same pipes?).
 *
 * Why (issue #11, benchmarks/RESULTS.md): prefill with bf16-resident
 * weights keeps float32 activations (logits within 1e-4 of the float32
 * reference). vdpbf16ps multiplies bf16 by bf16, so a float32 activation
 * costs two products (x = hi + lo, both bf16: 16 of its 24 bits) and three
 * for all of them. Where vdpbf16ps issues at the FMA's instruction rate,
 * bf16 arithmetic then runs at float32's rate per product at best.
 *
 * Build and run (x86-64 with AVX-512F; the vdpbf16ps lines need
 * AVX512-BF16 and an assembler that knows it, binutils >= 2.34):
 *   cc -O2 -o /tmp/fma_rate benchmarks/fma_rate.c && /tmp/fma_rate
 */
#include <stdio.h>
#include <time.h>

#define N 100000000L

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* 12 independent accumulators (zmm0-11): more than latency x throughput */
#define BODY(OP)                                                                   \
    OP " %%zmm14, %%zmm15, %%zmm0\n" OP " %%zmm14, %%zmm15, %%zmm1\n"              \
    OP " %%zmm14, %%zmm15, %%zmm2\n" OP " %%zmm14, %%zmm15, %%zmm3\n"              \
    OP " %%zmm14, %%zmm15, %%zmm4\n" OP " %%zmm14, %%zmm15, %%zmm5\n"              \
    OP " %%zmm14, %%zmm15, %%zmm6\n" OP " %%zmm14, %%zmm15, %%zmm7\n"              \
    OP " %%zmm14, %%zmm15, %%zmm8\n" OP " %%zmm14, %%zmm15, %%zmm9\n"              \
    OP " %%zmm14, %%zmm15, %%zmm10\n" OP " %%zmm14, %%zmm15, %%zmm11\n"
#define REGS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
             "xmm10", "xmm11", "xmm14", "xmm15", "cc"
#define ZERO "vpxord %%zmm14, %%zmm14, %%zmm14\nvpxord %%zmm15, %%zmm15, %%zmm15\n"

static double fma_loop(void)
{
    long n = N;
    const double t0 = now();
    __asm__ volatile(ZERO "1:\n" BODY("vfmadd231ps") "dec %0\njnz 1b\n" : "+r"(n) : : REGS);
    return 12.0 * N / (now() - t0) / 1e9;
}

static double dpbf16_loop(void)
{
    long n = N;
    const double t0 = now();
    __asm__ volatile(ZERO "1:\n" BODY("vdpbf16ps") "dec %0\njnz 1b\n" : "+r"(n) : : REGS);
    return 12.0 * N / (now() - t0) / 1e9;
}

static double mixed_loop(void)
{
    long n = N;
    const double t0 = now();
    __asm__ volatile(ZERO "1:\n" BODY("vfmadd231ps") BODY("vdpbf16ps") "dec %0\njnz 1b\n"
                     : "+r"(n) : : REGS);
    return 24.0 * N / (now() - t0) / 1e9;
}

int main(void)
{
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) {
        fprintf(stderr, "fma_rate: this CPU has no AVX-512F\n");
        return 2;
    }
    const int bf16 = __builtin_cpu_supports("avx512bf16");
    for (int rep = 0; rep < 3; rep++) {
        const double f = fma_loop();
        printf("zmm instructions per ns, one core: vfmadd231ps %.2f (%.1f float32 products/ns)",
               f, 16 * f);
        if (bf16) {
            const double d = dpbf16_loop(), m = mixed_loop();
            printf("; vdpbf16ps %.2f (%.1f bf16 products/ns); both interleaved %.2f", d, 32 * d,
                   m);
        }
        printf("\n");
    }
    if (!bf16)
        printf("(no AVX512-BF16 on this CPU: vdpbf16ps not run)\n");
    return 0;
}
