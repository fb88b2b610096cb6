/* The `int8` / `int4` codecs' per-tile value decoders for the fused linear (docs/FORMAT.md 1.3),
 * #included by fused.c after its job_t / part_t (one translation unit, as exp_values.c).
 *
 * A decoder turns the quantized values [begin, end) of tile k into their decoded bit patterns
 * round_D(float32(scale) * float32(q)), packed in value order in part->scratch, exactly what the
 * `raw` codec stores for the same tile: the fused kernels then read the scratch as raw values,
 * so quantized weights are multiplied as decoded (bit-exact with the decoders of quant.c, hence
 * the same error bound as raw). The tile's integers are first unpacked into part->qscratch
 * (int8, padded); the tile is then walked in segments of one scale (a run of one row and one
 * group of G columns), each segment's values decoded 16 at a time.
 *
 * The Python caller checks rules Q2 and Q3 (padding nibble, finite scales) and every part's
 * size; the group index is computed from the element index only, bounded by rows * gpr. The
 * float16 / bfloat16 roundings are quant.c's own (float_bits.h). */

typedef int (*quant_fn)(const job_t *job, part_t *part, int64_t k, int64_t begin, int64_t end);

#include "float_bits.h"

static inline float q_scale(const job_t *job, int64_t g) {
    if (job->dtype == DT_F32) { float f; memcpy(&f, job->scales + 4 * g, 4); return f; }
    uint16_t h;
    memcpy(&h, job->scales + 2 * g, 2);
    if (job->dtype == DT_BF16) return bits_f32((uint32_t)h << 16);
    return f16_to_f32(h);
}


/* Number of set bitmap bits in elements [p, p + n). */
static inline int64_t count_range(const job_t *job, int64_t p, int64_t n) {
    int64_t count = 0;
    while (n > 0) {
        const int len = n < 32 ? (int)n : 32;
        count += __builtin_popcount(bits_at(job, p, len));
        p += len;
        n -= len;
    }
    return count;
}

/* The tile's integers q[begin .. end) as int8 in part->qscratch (followed by >= 64 bytes). */
static inline void q_unpack_scalar(const job_t *job, part_t *part, int64_t begin,
                                   int64_t end) {
    int8_t *q = part->qscratch;
    if (job->qbits == 8) {
        memcpy(q, job->qvalues + begin, (size_t)(end - begin));
        return;
    }
    for (int64_t i = begin; i < end; i++) {
        const uint8_t byte = job->qvalues[i >> 1];
        const int nib = (i & 1) ? byte >> 4 : byte & 15;
        q[i - begin] = (int8_t)((nib ^ 8) - 8);
    }
}

/* Walks the tile's segments of one scale; `run` decodes n values of one scale. */
#define QUANT_WALK(RUN)                                                                          \
    const int es = elem_size(job->dtype);                                                        \
    const int64_t start = k * TILE, cols = job->cols, G = job->group_size;                      \
    const int64_t tile_end = job->numel - start < TILE ? job->numel : start + TILE;             \
    int64_t e = start, r = start / cols, c = start - r * cols, j = 0;                            \
    while (e < tile_end) {                                                                       \
        const int64_t gcol = c / G;                                                              \
        int64_t seg = ((gcol + 1) * G < cols ? (gcol + 1) * G : cols) - c;                       \
        if (tile_end - e < seg) seg = tile_end - e;                                              \
        const int64_t n = count_range(job, e, seg);                                              \
        if (n) RUN(job, q_scale(job, r * job->groups_per_row + gcol), part->qscratch + j, n,    \
                   part->scratch + j * es);                                                      \
        j += n;                                                                                  \
        e += seg;                                                                                \
        c += seg;                                                                                \
        if (c == cols) { c = 0; r++; }                                                           \
    }                                                                                            \
    memset(part->scratch + (end - begin) * es, 0, OVERREAD);                                     \
    return OK;

static inline void run_scalar(const job_t *job, float s, const int8_t *q, int64_t n,
                              uint8_t *dst) {
    for (int64_t i = 0; i < n; i++) {
        const float v = s * (float)q[i];
        if (job->dtype == DT_F32) {
            memcpy(dst + 4 * i, &v, 4);
        } else {
            const uint16_t h = job->dtype == DT_BF16 ? bf16_round(v) : f16_round(v);
            memcpy(dst + 2 * i, &h, 2);
        }
    }
}

static int quant_tile_scalar(const job_t *job, part_t *part, int64_t k, int64_t begin,
                             int64_t end) {
    q_unpack_scalar(job, part, begin, end);
    QUANT_WALK(run_scalar)
}

#if ENDOR_X86

/* 64 int4 values from 32 packed bytes: byte b -> q[2b] = low nibble, q[2b+1] = high nibble. */
__attribute__((target(AVX512_TARGET))) static inline void q_unpack_avx512(const job_t *job,
                                                                         part_t *part,
                                                                         int64_t begin,
                                                                         int64_t end) {
    if (job->qbits == 8 || end - begin < 2) {
        q_unpack_scalar(job, part, begin, end);
        return;
    }
    int8_t *q = part->qscratch;
    int64_t i = begin;
    if (i & 1) { /* an odd start: its high nibble alone */
        const int nib = (job->qvalues[i >> 1] >> 4) ^ 8;
        q[0] = (int8_t)(nib - 8);
        i++;
    }
    const uint8_t *src = job->qvalues + (i >> 1);
    const int64_t bytes = (end - i + 1) >> 1; /* the last one may hold one value of the next tile */
    const __m512i low = _mm512_set1_epi16(0x000f), eight = _mm512_set1_epi8(8);
    int8_t *dst = q + (i - begin);
    for (int64_t b = 0; b < bytes; b += 32) {
        const int64_t left = bytes - b;
        const __mmask32 m = left >= 32 ? ~0u : (1u << left) - 1;
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, src + b));
        const __m512i pair = _mm512_or_si512(_mm512_and_si512(w, low),
                                             _mm512_slli_epi16(_mm512_srli_epi16(w, 4), 8));
        _mm512_storeu_si512((void *)(dst + 2 * b),
                            _mm512_sub_epi8(_mm512_xor_si512(pair, eight), eight));
    }
}

__attribute__((target(AVX512_TARGET))) static inline void run_avx512(const job_t *job, float s,
                                                                    const int8_t *q, int64_t n,
                                                                    uint8_t *dst) {
    const __m512 scale = _mm512_set1_ps(s);
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < n; i += 16) { /* writes up to 15 values past n: scratch has room */
        const __m512 v = _mm512_mul_ps(
            scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(q + i)))));
        if (job->dtype == DT_F32) {
            _mm512_storeu_ps((void *)(dst + 4 * i), v);
        } else if (job->dtype == DT_BF16) {
            const __m512i u = _mm512_castps_si512(v);
            const __m512i r = _mm512_srli_epi32(
                _mm512_add_epi32(_mm512_add_epi32(u, half),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
            _mm256_storeu_si256((void *)(dst + 2 * i), _mm512_cvtepi32_epi16(r));
        } else {
            _mm256_storeu_si256((void *)(dst + 2 * i),
                                _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
}

__attribute__((target(AVX512_TARGET))) static int quant_tile_avx512(const job_t *job,
                                                                    part_t *part, int64_t k,
                                                                    int64_t begin, int64_t end) {
    q_unpack_avx512(job, part, begin, end);
    QUANT_WALK(run_avx512)
}

#endif /* ENDOR_X86 */

/* int4_direct: the tile's stored nibbles, one per byte of part->qscratch (followed by >= 64
 * bytes): the low 4 bits of a byte are the nibble (q's two's complement, the index into a
 * group's table ordered q = 0..7, -8..-1); its high 4 bits are not defined (the AVX-512 path
 * leaves the next nibble there: its lookups ignore them). */
#if ENDOR_X86
__attribute__((target(AVX512_TARGET))) static void int4_indices(const job_t *job, part_t *part,
                                                                int64_t begin, int64_t end) {
    uint8_t *q = (uint8_t *)part->qscratch;
    int64_t i = begin;
    if (i < end && (i & 1)) { /* an odd start: its high nibble alone */
        *q++ = job->qvalues[i >> 1] >> 4;
        i++;
    }
    const uint8_t *src = job->qvalues + (i >> 1);
    const int64_t bytes = (end - i + 1) >> 1; /* the last one may hold one value of the next tile */
    /* byte b = HL -> word 0x0H_HL: its low byte holds L, its high byte H (one shift and one
     * bitwise select instead of isolating each nibble) */
    const __m512i high_bytes = _mm512_set1_epi16((short)0xff00);
    for (int64_t b = 0; b < bytes; b += 32) {
        const int64_t left = bytes - b;
        const __mmask32 m = left >= 32 ? ~0u : (1u << left) - 1;
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, src + b));
        _mm512_storeu_si512((void *)(q + 2 * b),
                            _mm512_ternarylogic_epi32(high_bytes, _mm512_slli_epi16(w, 4), w,
                                                      0xca)); /* high_bytes ? w << 4 : w */
    }
}
#else
static void int4_indices(const job_t *job, part_t *part, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
        const uint8_t byte = job->qvalues[i >> 1];
        part->qscratch[i - begin] = (int8_t)((i & 1) ? byte >> 4 : byte & 15);
    }
}
#endif

static quant_fn choose_quant(int isa) {
#if ENDOR_X86
    if (isa == ISA_AVX512) return quant_tile_avx512;
#endif
    (void)isa;
    return quant_tile_scalar;
}
