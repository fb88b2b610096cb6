/* Exact float bit views and the float32 -> bfloat16 / float16 roundings (nearest even) that
 * define the quantized codecs' decoded values (docs/FORMAT.md 1.6), shared by quant.c and
 * quant_values.c (the fused linear). Includers build with -ffp-contract=off: f16_round relies
 * on separately rounded steps. */
#ifndef ENDOR_FLOAT_BITS_H
#define ENDOR_FLOAT_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t bf16_round(float f) { /* nearest even; f is never NaN here */
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* float32 -> float16, nearest even, overflow to infinity, subnormals kept (the FP16 library's
 * branch-free method: the additions below round exactly once, at float16's precision). */
static inline uint16_t f16_round(float f) {
    float base = (bits_f32(f32_bits(f) & 0x7fffffffu) * 0x1p+112f) * 0x1p-110f;
    const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

#endif
