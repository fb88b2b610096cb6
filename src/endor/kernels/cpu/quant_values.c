/* The `int8` / `int4` codecs' per-tile value decoders for the fused linear (docs/FORMAT.md 1.6),
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
 * int4 with groups of whole 32-column chunks on AVX-512 skips that decoded scratch: int4_indices
 * unpacks the tile's nibbles one per byte, and INT4_ROWS (the row walks fused.c dispatches to)
 * looks each chunk's weights up in a 16-entry table of its group's decoded values, in registers.
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

#if ENDOR_X86

/* int4_direct: one row walk for both the vdpbf16ps path (DOT: bf16 weights, x exactly bf16 in
 * job->xh) and the float32 FMA path (x float32 in natural order). Each group of G columns (a
 * multiple of 32: groups start on chunk starts) gets a 16-entry table of its decoded values
 * round_D(scale * q), q = -8..7, built once per group; a chunk expands its integers' table
 * indices under the bitmap mask (vpexpandb) and looks its 32 weights up (vpermw / vpermps),
 * lanes of zero weights zeroed by the mask. Runs of whole chunks inside one group and one tile
 * go through INT4_SPAN (two chunks per step, no per-chunk bounds checks); a row's short last
 * chunk and a chunk across a tile boundary go one by one. */

/* The group's table of 16 decoded values: bfloat16 words for DOT (twice: vpermw reads 5 index
 * bits, the 5th is not defined), else float32 (round_D(v) widened exactly). */
#define INT4_TABLE(DOT)                                                                          \
    do {                                                                                         \
        const __m512 v = _mm512_mul_ps(_mm512_set1_ps(q_scale(job, group)), qgrid);            \
        if (dtype == DT_BF16) {                                                                  \
            const __m512i u = _mm512_castps_si512(v);                                            \
            const __m512i rounded = _mm512_srli_epi32(                                           \
                _mm512_add_epi32(_mm512_add_epi32(u, half),                                      \
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), one)),               \
                16);                                                                             \
            if (DOT)                                                                             \
                table16 = _mm512_broadcast_i64x4(_mm512_cvtepi32_epi16(rounded));                \
            else                                                                                 \
                tablef = _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16));                    \
        } else if (dtype == DT_F16) {                                                            \
            tablef = _mm512_cvtph_ps(                                                            \
                _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));              \
        } else {                                                                                 \
            tablef = v;                                                                          \
        }                                                                                        \
    } while (0)

/* One chunk's weights from its expanded indices `idx` (lanes not in `mask` zeroed), multiplied
 * with x's columns [col, col + 32) into ACC (DOT) or ACC / ACC2 (float: low / high 16 lanes).
 * (float16: a vpermw of a float16 table and two vcvtph2ps measured slower than two vpermps.) */
#define INT4_CHUNK(DOT, idx, mask, col, ACC, ACC2)                                               \
    do {                                                                                         \
        if (DOT) {                                                                               \
            const __m512i w_ = _mm512_maskz_permutexvar_epi16((mask), _mm512_cvtepu8_epi16(idx),  \
                                                              table16);                          \
            for (int b = 0; b < nb; b++)                                                         \
                ACC[b] = _mm512_dpbf16_ps(                                                       \
                    ACC[b], (__m512bh)w_,                                                        \
                    (__m512bh)_mm512_loadu_si512((const void *)(xh + b * job->x_stride + (col)))); \
        } else {                                                                                 \
            const __m512 lo_ = _mm512_maskz_permutexvar_ps(                                      \
                (__mmask16)(mask), _mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), tablef);   \
            const __m512 hi_ = _mm512_maskz_permutexvar_ps(                                      \
                (__mmask16)((mask) >> 16), _mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), \
                tablef);                                                                         \
            for (int b = 0; b < nb; b++) {                                                       \
                const float *xb_ = xf + b * job->x_stride + (col);                               \
                ACC[b] = _mm512_fmadd_ps(lo_, _mm512_loadu_ps(xb_), ACC[b]);                     \
                ACC2[b] = _mm512_fmadd_ps(hi_, _mm512_loadu_ps(xb_ + 16), ACC2[b]);              \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* Two chunks' table indices (masks m0, m1) from the cursor v: two 256-bit expands measured
 * faster than one 512-bit expand and a split on Zen 4. */
#define INT4_EXPAND2                                                                             \
    const __m256i i0 = _mm256_maskz_expand_epi8(m0, _mm256_loadu_si256((const void *)v));        \
    v += __builtin_popcount(m0);                                                                 \
    const __m256i i1 = _mm256_maskz_expand_epi8(m1, _mm256_loadu_si256((const void *)v));        \
    v += __builtin_popcount(m1);

#define INT4_ROWS(NAME, TARGET, DOT)                                                             \
    __attribute__((target(TARGET))) static inline __attribute__((always_inline)) int NAME(       \
        const job_t *job, part_t *part, int64_t x0, const int nb) {                             \
        const int64_t K = job->cols, G = job->group_size, dtype = job->dtype;                   \
        /* table entry n: q = n as a two's complement nibble (int4_indices' bytes) */          \
        const __m512 qgrid = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, \
                                            -1);                                                 \
        const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);             \
        /* the span reads 8 bitmap bytes per chunk: it stops where that would pass the end */   \
        const int64_t wide_bits_end = job->bitmap_bytes >= 8 ? (job->bitmap_bytes - 8) * 8 : 0; \
        const uint16_t *xh = job->xh + x0 * job->x_stride;                                      \
        const float *xf = job->x + x0 * job->x_stride;                                          \
        (void)xh;                                                                                \
        (void)xf;                                                                                \
        cursor_t c;                                                                              \
        int err = seek(job, part, part->first * K, &c);                                          \
        if (err) return err;                                                                     \
        for (int64_t r = part->first; r < part->last; r++) {                                     \
            /* four accumulators per x row: DOT alternates acc / acc2 by chunk, float uses     \
             * acc / acc2 for one chunk's halves and acc3 / acc4 for the next chunk's */         \
            __m512 acc[MAX_BLOCK], acc2[MAX_BLOCK], acc3[MAX_BLOCK], acc4[MAX_BLOCK];            \
            for (int b = 0; b < nb; b++)                                                         \
                acc[b] = acc2[b] = acc3[b] = acc4[b] = _mm512_setzero_ps();                      \
            __m512 tablef = _mm512_setzero_ps();                                                 \
            __m512i table16 = _mm512_setzero_si512();                                            \
            (void)tablef;                                                                        \
            (void)table16;                                                                       \
            int64_t group = r * job->groups_per_row, group_end = 0;                              \
            for (int64_t col = 0; col < K;) {                                                    \
                if (col == group_end) {                                                          \
                    INT4_TABLE(DOT);                                                             \
                    group++;                                                                     \
                    group_end = col + G < K ? col + G : K;                                       \
                }                                                                                \
                const int64_t p = r * K + col;                                                   \
                if (p >= c.tile_end && (err = tile_values(job, part, c.tile + 1, &c)))           \
                    return err;                                                                  \
                int64_t run = group_end - col;                                                   \
                if (c.tile_end - p < run) run = c.tile_end - p;                                  \
                if (wide_bits_end - p < run) run = wide_bits_end - p;                            \
                if (run >= CHUNK) {                                                              \
                    run -= run % CHUNK;                                                          \
                    const uint8_t *bits = job->bitmap + (p >> 3);                                \
                    const int shift = (int)(p & 7);                                              \
                    const uint8_t *v = c.v;                                                      \
                    const int64_t stop = col + run;                                              \
                    _mm_prefetch((const char *)bits + PREFETCH_BITS, _MM_HINT_T0);               \
                    for (; col + 2 * CHUNK <= stop; col += 2 * CHUNK, bits += 2 * CHUNK / 8) {   \
                        const uint32_t m0 = (uint32_t)(load_u64(bits) >> shift);                 \
                        const uint32_t m1 = (uint32_t)(load_u64(bits + CHUNK / 8) >> shift);     \
                        INT4_EXPAND2                                                             \
                        if (DOT) {                                                               \
                            INT4_CHUNK(DOT, i0, m0, col, acc, acc);                              \
                            INT4_CHUNK(DOT, i1, m1, col + CHUNK, acc2, acc2);                    \
                        } else if (nb <= 2) {                                                    \
                            INT4_CHUNK(DOT, i0, m0, col, acc, acc2);                             \
                            INT4_CHUNK(DOT, i1, m1, col + CHUNK, acc3, acc4);                    \
                        } else { /* enough chains already; 4 nb accumulators would spill */     \
                            INT4_CHUNK(DOT, i0, m0, col, acc, acc2);                             \
                            INT4_CHUNK(DOT, i1, m1, col + CHUNK, acc, acc2);                     \
                        }                                                                        \
                    }                                                                            \
                    if (col < stop) {                                                            \
                        const uint32_t m0 = (uint32_t)(load_u64(bits) >> shift);                 \
                        const __m256i i0 =                                                       \
                            _mm256_maskz_expand_epi8(m0, _mm256_loadu_si256((const void *)v));   \
                        v += __builtin_popcount(m0);                                             \
                        INT4_CHUNK(DOT, i0, m0, col, acc, acc2);                                 \
                        col += CHUNK;                                                            \
                    }                                                                            \
                    c.v = v;                                                                     \
                    continue;                                                                    \
                }                                                                                \
                const int len = K - col < CHUNK ? (int)(K - col) : CHUNK;                        \
                const uint32_t mask = bits_at(job, p, len);                                      \
                __m256i idx;                                                                     \
                if (p + len <= c.tile_end) {                                                     \
                    idx = _mm256_maskz_expand_epi8(mask, _mm256_loadu_si256((const void *)c.v)); \
                    c.v += __builtin_popcount(mask);                                             \
                } else { /* low lanes from this tile, high lanes from the next */                \
                    const uint32_t low = mask & ((1u << (c.tile_end - p)) - 1), high = mask & ~low;\
                    idx = _mm256_maskz_expand_epi8(low, _mm256_loadu_si256((const void *)c.v));  \
                    if ((err = tile_values(job, part, c.tile + 1, &c))) return err;              \
                    idx = _mm256_mask_expand_epi8(idx, high,                                     \
                                                  _mm256_loadu_si256((const void *)c.v));        \
                    c.v += __builtin_popcount(high);                                             \
                }                                                                                \
                INT4_CHUNK(DOT, idx, mask, col, acc, acc2);                                      \
                col += CHUNK;                                                                    \
            }                                                                                    \
            for (int b = 0; b < nb; b++)                                                         \
                job->y[(x0 + b) * job->rows + r] = _mm512_reduce_add_ps(                         \
                    _mm512_add_ps(_mm512_add_ps(acc[b], acc2[b]), _mm512_add_ps(acc3[b], acc4[b]))); \
        }                                                                                        \
        return OK;                                                                               \
    }

INT4_ROWS(rows_int4_dot_nb, AVX512_BF16_TARGET, 1)
INT4_ROWS(rows_int4_float_nb, AVX512_TARGET, 0)

#endif /* ENDOR_X86 */

static quant_fn choose_quant(int isa) {
#if ENDOR_X86
    if (isa == ISA_AVX512) return quant_tile_avx512;
#endif
    (void)isa;
    return quant_tile_scalar;
}
