/* What Endor's three CPU extensions (decompress.c, fused.c, quant.c) share, included first by
 * each: the includes, whether x86 SIMD paths are compiled, the ISA numbering and the choice of
 * ISAs made once at import, the thread runner, and the `supported()` entry point.
 *
 * Each extension keeps its own CPU feature tests (its AVX2 and AVX-512 paths use different
 * instructions) and passes them to SET_SUPPORTED_ISAS. */
#ifndef ENDOR_CPU_COMMON_H
#define ENDOR_CPU_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* x86 SIMD paths, compiled with per-function target attributes and chosen at run time.
 * ENDOR_PORTABLE_ONLY builds what a non-x86 machine gets (the scalar path), to check it here. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(ENDOR_PORTABLE_ONLY)
#define ENDOR_X86 1
#include <immintrin.h>
#else
#define ENDOR_X86 0
#endif

#define TILE 4096 /* elements per tile (docs/FORMAT.md) */
#define MAX_THREADS 256

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int supported_isas; /* bit i set iff ISA i runs here; set once at import */

/* AVX2_OK, AVX512_OK: expressions of CPU_HAS("feature") tests. */
#if ENDOR_X86
#define CPU_HAS(feature) __builtin_cpu_supports(feature)
#define SET_SUPPORTED_ISAS(AVX2_OK, AVX512_OK)                                                 \
    do {                                                                                       \
        __builtin_cpu_init();                                                                  \
        supported_isas = 1 << ISA_SCALAR | ((AVX2_OK) ? 1 << ISA_AVX2 : 0) |                   \
                         ((AVX512_OK) ? 1 << ISA_AVX512 : 0);                                  \
    } while (0)
#else
#define SET_SUPPORTED_ISAS(AVX2_OK, AVX512_OK) (supported_isas = 1 << ISA_SCALAR)
#endif

/* `threads` within [1, min(work, MAX_THREADS)]: no more threads than units of work. */
static inline int clamp_threads(int threads, int64_t work) {
    if (threads > work) threads = (int)work;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return threads < 1 ? 1 : threads;
}

/* run(&parts[t]) for t < threads, the parts `size` bytes apart: part 0 on the calling thread,
 * the others on threads of their own (a thread that fails to start runs its part here).
 * Returns when every part has ended. */
static void run_parts(void *(*run)(void *), void *parts, size_t size, int threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    char *base = parts;
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run, base + size * t) == 0;
    run(base);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run(base + size * t);
    }
}

static PyObject *py_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(supported_isas);
}

#define SUPPORTED_METHOD                                                                       \
    {"supported", py_supported, METH_NOARGS,                                                   \
     "supported() -> int: bit i set iff ISA i (0 scalar, 1 avx2, 2 avx512) runs on this CPU."}

#endif /* ENDOR_CPU_COMMON_H */
