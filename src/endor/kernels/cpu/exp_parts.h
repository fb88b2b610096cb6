/* The `exp` value codec's parts (docs/FORMAT.md 1.1), shared by the decompressor and the fused
 * linear (both #include exp_values.c, which reads them). */
#ifndef ENDOR_EXP_PARTS_H
#define ENDOR_EXP_PARTS_H

#include <stdint.h>

typedef struct {
    const uint8_t *signmant; /* nnz * n_bytes: sign and mantissa, little-endian */
    const uint8_t *codes;    /* ceil(nnz / 64) groups of `planes` 64-bit bit planes */
    const uint8_t *bases;    /* one per tile */
    const int64_t *escidx;   /* ntiles + 1 */
    const uint8_t *escapes;  /* n_escapes whole exponents */
    int64_t n_escapes;
    int planes, e_bits, m_bits, n_bytes, max_base;
} exp_t;

#endif
