/* The CPU decoder of the `int8` and `int4` value codecs (docs/FORMAT.md, section 1.6).
 *
 * One entry point, `decode`, takes raw addresses (tensor.data_ptr()). Tiles are split into
 * contiguous ranges, one per thread (pthreads, GIL released). Each thread checks a tile's index
 * entry and popcount (rules 5 and 6), copies or unpacks the tile's integers into a padded int8
 * scratch buffer, then walks the tile in segments of one scale (a run of elements of one row and
 * one group of G columns) and dequantizes straight into the output:
 *     out[i] = round_D(float(scale) * float(q))   (+0.0 where the bitmap bit is 0)
 * Three instruction-set paths, chosen at run time:
 *   scalar  portable C (bit tricks for the float16 / bfloat16 rounding);
 *   avx2    8 lanes: vpermd with a 256-entry index table per bitmap byte, F16C for float16;
 *   avx512  64 integers per vpexpandb (AVX512_VBMI2) under a bitmap word, products 16 lanes
 *           at a time, vcvtps2ph for float16.
 * bfloat16 rounds with the integer rule (u + 0x7fff + (u >> 16 & 1)) >> 16 in every path:
 * vcvtneps2bf16 would flush subnormals. The Python caller checks buffer sizes, that scales are
 * finite and the int4 padding nibble (rules Q2, Q3), so no NaN reaches the rounding.
 */
#include "common.h"

#define PAD 64 /* zero bytes after a tile's integers: vector loads read at most 64 past */

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { OK = 0, ERR_TILE_INDEX = 1, ERR_POPCOUNT = 2, ERR_PADDING = 3, ERR_ARGUMENT = 4 };

typedef struct {
    const uint8_t *bitmap;
    const uint8_t *qvalues;
    const uint8_t *scales;
    const int64_t *tiles;
    uint8_t *out;
    int64_t numel, nnz, ntiles, bitmap_bytes, cols, group_size, per_row;
    int bits, dtype, isa;
} job_t;

typedef struct {
    const job_t *job;
    int64_t first, last;
    int err;
    int64_t bad_tile;
} part_t;

static inline uint64_t load_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
#include "float_bits.h"

/* Up to 57 bits of the bitmap starting at bit i, never reading past its last byte. */
static inline uint64_t bits_at(const job_t *job, int64_t i) {
    int64_t byte = i >> 3;
    uint64_t w;
    if (byte + 8 <= job->bitmap_bytes) {
        w = load_u64(job->bitmap + byte);
    } else {
        w = 0;
        for (int64_t b = byte; b < job->bitmap_bytes; b++)
            w |= (uint64_t)job->bitmap[b] << (8 * (b - byte));
    }
    return w >> (i & 7);
}

static inline int64_t count_bits(const job_t *job, int64_t start, int64_t n) {
    int64_t count = 0, j = 0;
    for (; j + 56 <= n; j += 56) count += __builtin_popcountll(bits_at(job, start + j) & ((1ULL << 56) - 1));
    if (j < n) count += __builtin_popcountll(bits_at(job, start + j) & ((1ULL << (n - j)) - 1));
    return count;
}

/* ---------------------------------------------------------------- exact conversions */

static inline float scale_at(const job_t *job, int64_t g) {
    if (job->dtype == DT_F32) { float f; memcpy(&f, job->scales + 4 * g, 4); return f; }
    uint16_t h;
    memcpy(&h, job->scales + 2 * g, 2);
    if (job->dtype == DT_BF16) return bits_f32((uint32_t)h << 16);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact */
        float f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    return bits_f32(sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | (man << 13));
}


static inline void store_scalar(uint8_t *out, int64_t i, int dtype, float v) {
    if (dtype == DT_F32) { memcpy(out + 4 * i, &v, 4); return; }
    uint16_t h = dtype == DT_BF16 ? bf16_round(v) : f16_round(v);
    memcpy(out + 2 * i, &h, 2);
}

/* ---------------------------------------------------------------- spans of one scale */

/* Elements [i, i + n) all use scale s; their integers start at q. Returns integers consumed. */
typedef int64_t (*span_fn)(const job_t *job, int64_t i, int64_t n, float s, const int8_t *q);

static inline __attribute__((always_inline)) int64_t span_tail(const job_t *job, int64_t i,
                                                               int64_t n, float s,
                                                               const int8_t *q) {
    int64_t used = 0;
    for (int64_t j = 0; j < n; j++) {
        int64_t e = i + j;
        if ((job->bitmap[e >> 3] >> (e & 7)) & 1)
            store_scalar(job->out, e, job->dtype, s * (float)q[used++]);
        else
            store_scalar(job->out, e, job->dtype, 0.0f);
    }
    return used;
}

static int64_t span_scalar(const job_t *job, int64_t i, int64_t n, float s, const int8_t *q) {
    return span_tail(job, i, n, s, q);
}

static uint8_t index32[256][8]; /* vpermd indices: packed values -> their bit slots */

static void build_tables(void) {
    for (int b = 0; b < 256; b++) {
        int k = 0;
        for (int j = 0; j < 8; j++) index32[b][j] = (uint8_t)(((b >> j) & 1) ? k++ : 0);
    }
}

#if ENDOR_X86

#define AVX2_TARGET "avx2,f16c,popcnt"
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt"

__attribute__((target(AVX2_TARGET))) static inline __m256i bf16_round8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                   lsb), 16);
    return r; /* 8 x 32-bit, each < 0x10000 */
}

__attribute__((target(AVX2_TARGET))) static int64_t span_avx2(const job_t *job, int64_t i,
                                                              int64_t n, float s,
                                                              const int8_t *q) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 sv = _mm256_set1_ps(s);
    const int dtype = job->dtype;
    int64_t used = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        unsigned b = (unsigned)(bits_at(job, i + j) & 0xff);
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + used)));
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)index32[b]));
        __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)b), lane_bit),
                                          lane_bit);
        v = _mm256_permutevar8x32_epi32(v, idx);
        __m256 f = _mm256_and_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), sv),
                                 _mm256_castsi256_ps(keep));
        uint8_t *dst = job->out + (i + j) * (dtype == DT_F32 ? 4 : 2);
        if (dtype == DT_F32) {
            _mm256_storeu_ps((float *)dst, f);
        } else if (dtype == DT_F16) {
            _mm_storeu_si128((__m128i *)dst, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
        } else {
            __m256i r = bf16_round8(f);
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
            _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(packed));
        }
        used += __builtin_popcount(b);
    }
    return used + span_tail(job, i + j, n - j, s, q + used);
}

/* 16 dequantized lanes (f: float32, +0.0 where the bit is 0) -> dst, `lanes` of them. */
__attribute__((target(AVX512_TARGET))) static inline void store16_avx512(uint8_t *dst, int dtype,
                                                                         __m512 f,
                                                                         __mmask16 lanes) {
    if (dtype == DT_F32) {
        _mm512_mask_storeu_ps(dst, lanes, f);
        return;
    }
    __m256i h;
    if (dtype == DT_F16) {
        h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        __m512i u = _mm512_castps_si512(f);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(dst, lanes, h);
}

#define DEQUANT16(K)                                                                            \
    store16_avx512(dst + (K) * 16 * es, dtype,                                                  \
                   _mm512_maskz_mul_ps((__mmask16)(b >> (16 * (K))),                            \
                                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(                 \
                                           _mm512_extracti32x4_epi32(e, K))), sv),              \
                   (__mmask16)0xffff)

__attribute__((target(AVX512_TARGET))) static int64_t span_avx512(const job_t *job, int64_t i,
                                                                  int64_t n, float s,
                                                                  const int8_t *q) {
    const __m512 sv = _mm512_set1_ps(s);
    const int dtype = job->dtype;
    const int es = dtype == DT_F32 ? 4 : 2;
    int64_t used = 0, j = 0;
    if ((i & 7) == 0) {
        /* 64 elements per step: one bitmap word, one vpexpandb of 64 integers (the scratch
         * buffer holds PAD zero bytes past the tile's last integer), four 16-lane products. */
        for (; j + 64 <= n; j += 64) {
            const uint64_t b = load_u64(job->bitmap + ((i + j) >> 3));
            const __m512i e = _mm512_maskz_expand_epi8(b, _mm512_loadu_si512(q + used));
            uint8_t *dst = job->out + (i + j) * es;
            DEQUANT16(0);
            DEQUANT16(1);
            DEQUANT16(2);
            DEQUANT16(3);
            used += _mm_popcnt_u64(b);
        }
    }
    for (; j < n; j += 16) {
        int64_t m = n - j < 16 ? n - j : 16;
        __mmask16 lanes = (__mmask16)((1u << m) - 1);
        __mmask16 k = (__mmask16)(bits_at(job, i + j) & lanes);
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + used)));
        v = _mm512_maskz_expand_epi32(k, v);
        __m512 f = _mm512_maskz_mul_ps(k, _mm512_cvtepi32_ps(v), sv);
        store16_avx512(job->out + (i + j) * es, dtype, f, lanes);
        used += __builtin_popcount((unsigned)k);
    }
    return used;
}

/* int4 with AVX-512: a segment has one scale, so its 16 possible outputs fit one register. The
 * table is computed with the same product and rounding as every other path, then each output
 * is one table lookup (vpermw / vpermd) indexed by q + 8, zeroed where the bit is 0. `qo` holds
 * q + 8 (0..15) per integer, PAD zero bytes after the tile's last. */
__attribute__((target(AVX512_TARGET))) static int64_t span_int4_avx512(const job_t *job,
                                                                       int64_t i, int64_t n,
                                                                       float s,
                                                                       const int8_t *qo) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512 prod = _mm512_mul_ps(_mm512_set1_ps(s), levels);
    const int dtype = job->dtype;
    const int es = dtype == DT_F32 ? 4 : 2;
    __m512i table;
    if (dtype == DT_F32) {
        table = _mm512_castps_si512(prod);
    } else {
        uint16_t t16[16];
        store16_avx512((uint8_t *)t16, dtype, prod, (__mmask16)0xffff);
        table = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)t16));
    }
    int64_t used = 0, j = 0;
    if ((i & 7) == 0) {
        for (; j + 64 <= n; j += 64) {
            const uint64_t b = load_u64(job->bitmap + ((i + j) >> 3));
            const __m512i e = _mm512_maskz_expand_epi8(b, _mm512_loadu_si512(qo + used));
            uint8_t *dst = job->out + (i + j) * es;
            if (dtype == DT_F32) {
                for (int k = 0; k < 4; k++) {
                    __m128i part = k == 0 ? _mm512_castsi512_si128(e)
                                 : k == 1 ? _mm512_extracti32x4_epi32(e, 1)
                                 : k == 2 ? _mm512_extracti32x4_epi32(e, 2)
                                          : _mm512_extracti32x4_epi32(e, 3);
                    __m512i r = _mm512_maskz_permutexvar_epi32((__mmask16)(b >> (16 * k)),
                                                               _mm512_cvtepu8_epi32(part), table);
                    _mm512_storeu_si512((void *)(dst + 64 * k), r);
                }
            } else {
                __m512i lo = _mm512_maskz_permutexvar_epi16(
                    (__mmask32)b, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(e)), table);
                __m512i hi = _mm512_maskz_permutexvar_epi16(
                    (__mmask32)(b >> 32), _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(e, 1)),
                    table);
                _mm512_storeu_si512((void *)dst, lo);
                _mm512_storeu_si512((void *)(dst + 64), hi);
            }
            used += _mm_popcnt_u64(b);
        }
    }
    for (; j < n; j += 16) {
        int64_t m = n - j < 16 ? n - j : 16;
        __mmask16 lanes = (__mmask16)((1u << m) - 1);
        __mmask16 k = (__mmask16)(bits_at(job, i + j) & lanes);
        __m512i idx = _mm512_maskz_expand_epi32(
            k, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qo + used))));
        __m512i r = _mm512_maskz_permutexvar_epi32(k, idx, dtype == DT_F32 ? table :
                                                   _mm512_cvtepu16_epi32(
                                                       _mm512_castsi512_si256(table)));
        uint8_t *dst = job->out + (i + j) * es;
        if (dtype == DT_F32) _mm512_mask_storeu_epi32(dst, lanes, r);
        else _mm256_mask_storeu_epi16(dst, lanes, _mm512_cvtepi32_epi16(r));
        used += __builtin_popcount((unsigned)k);
    }
    return used;
}

/* A tile's int4 integers as q + 8 (0..15), the table index span_int4_avx512 wants. */
__attribute__((target(AVX2_TARGET))) static void tile_int4_offset(const job_t *job,
                                                                  int64_t begin, int64_t count,
                                                                  int8_t *q) {
    int64_t j = 0;
    if ((begin & 1) && count) q[j++] = (int8_t)((job->qvalues[begin >> 1] >> 4) ^ 8);
    const uint8_t *src = job->qvalues + ((begin + j) >> 1);
    const __m256i low = _mm256_set1_epi16(0x000f), high = _mm256_set1_epi16(0x0f00);
    const __m256i eight = _mm256_set1_epi8(8);
    for (; j + 32 <= count; j += 32, src += 16) {
        __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src));
        __m256i t = _mm256_or_si256(_mm256_and_si256(w, low),
                                    _mm256_and_si256(_mm256_slli_epi16(w, 4), high));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_xor_si256(t, eight));
    }
    for (; j < count; j++) {
        int64_t n = begin + j;
        q[j] = (int8_t)(((job->qvalues[n >> 1] >> ((n & 1) * 4)) & 0xf) ^ 8);
    }
    memset(q + count, 0, PAD);
}

#endif /* ENDOR_X86 */

/* ---------------------------------------------------------------- integers of one tile */

/* The tile's `count` integers, from integer index `begin`, as int8 into q (PAD zeros after). */
static void tile_integers(const job_t *job, int64_t begin, int64_t count, int8_t *q) {
    if (job->bits == 8) {
        if (count) memcpy(q, job->qvalues + begin, (size_t)count);
    } else {
        for (int64_t j = 0; j < count; j++) {
            int64_t n = begin + j;
            int nibble = (job->qvalues[n >> 1] >> ((n & 1) * 4)) & 0xf;
            q[j] = (int8_t)((nibble ^ 8) - 8);
        }
    }
    memset(q + count, 0, PAD);
}

#if ENDOR_X86
/* The same for int4 with AVX2: 16 bytes -> 32 sign-extended nibbles, low nibble first. */
__attribute__((target(AVX2_TARGET))) static void tile_int4_avx2(const job_t *job, int64_t begin,
                                                               int64_t count, int8_t *q) {
    int64_t j = 0;
    if (begin & 1) { /* starts on a high nibble */
        if (count) q[j++] = (int8_t)(((job->qvalues[begin >> 1] >> 4) ^ 8) - 8);
    }
    const uint8_t *src = job->qvalues + ((begin + j) >> 1);
    const __m256i low = _mm256_set1_epi16(0x000f), high = _mm256_set1_epi16(0x0f00);
    const __m256i eight = _mm256_set1_epi8(8);
    for (; j + 32 <= count; j += 32, src += 16) {
        __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src));
        __m256i t = _mm256_or_si256(_mm256_and_si256(w, low),
                                    _mm256_and_si256(_mm256_slli_epi16(w, 4), high));
        t = _mm256_sub_epi8(_mm256_xor_si256(t, eight), eight);
        _mm256_storeu_si256((__m256i *)(q + j), t);
    }
    for (; j < count; j++) {
        int64_t n = begin + j;
        q[j] = (int8_t)((((job->qvalues[n >> 1] >> ((n & 1) * 4)) & 0xf) ^ 8) - 8);
    }
    memset(q + count, 0, PAD);
}
#endif

/* ---------------------------------------------------------------- the tile loop */

static inline __attribute__((always_inline)) int decode_tiles(const job_t *job, int64_t first,
                                                              int64_t last, span_fn span,
                                                              int isa, int64_t *bad_tile) {
    int8_t q[TILE + PAD] __attribute__((aligned(64)));
    const int64_t cols = job->cols, g = job->group_size;
    for (int64_t k = first; k < last; k++) {
        const int64_t begin = job->tiles[k], end = job->tiles[k + 1];
        const int64_t start = k * TILE;
        const int64_t len = job->numel - start < TILE ? job->numel - start : TILE;
        if (begin < 0 || end < begin || end > job->nnz || end - begin > len) {
            *bad_tile = k;
            return ERR_TILE_INDEX;
        }
        if (count_bits(job, start, len) != end - begin) {
            *bad_tile = k;
            return ERR_POPCOUNT;
        }
#if ENDOR_X86
        if (job->bits == 4 && isa == ISA_AVX512)
            tile_int4_offset(job, begin, end - begin, q);
        else if (job->bits == 4 && isa == ISA_AVX2)
            tile_int4_avx2(job, begin, end - begin, q);
        else
#endif
            tile_integers(job, begin, end - begin, q);
        (void)isa;
        int64_t row = start / cols, col = start - row * cols, i = start, used = 0;
        const int64_t stop = start + len;
        while (i < stop) {
            const int64_t group = col / g;
            int64_t group_end = (group + 1) * g;
            if (group_end > cols) group_end = cols;
            int64_t n = group_end - col;
            if (n > stop - i) n = stop - i;
            used += span(job, i, n, scale_at(job, row * job->per_row + group), q + used);
            i += n;
            col += n;
            if (col == cols) { col = 0; row++; }
        }
    }
    return OK;
}

static void run_scalar(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last, span_scalar, ISA_SCALAR, &p->bad_tile);
}
#if ENDOR_X86
__attribute__((target(AVX2_TARGET))) static void run_avx2(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last, span_avx2, ISA_AVX2, &p->bad_tile);
}
__attribute__((target(AVX512_TARGET "," AVX2_TARGET))) static void run_avx512(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last,
                          p->job->bits == 4 ? span_int4_avx512 : span_avx512, ISA_AVX512,
                          &p->bad_tile);
}
#endif

static void *run_part(void *arg) {
    part_t *p = (part_t *)arg;
#if ENDOR_X86
    if (p->job->isa == ISA_AVX512) { run_avx512(p); return NULL; }
    if (p->job->isa == ISA_AVX2) { run_avx2(p); return NULL; }
#endif
    run_scalar(p);
    return NULL;
}

/* ---------------------------------------------------------------- entry points */

static int decode_job(const job_t *job, int threads, int64_t *bad_tile) {
    *bad_tile = -1;
    if (job->ntiles == 0) return OK;
    if (job->tiles[0] != 0) { *bad_tile = 0; return ERR_TILE_INDEX; }
    if (job->tiles[job->ntiles] != job->nnz) { *bad_tile = job->ntiles - 1; return ERR_TILE_INDEX; }
    if ((job->numel & 7) && (job->bitmap[job->numel / 8] >> (job->numel & 7))) {
        *bad_tile = job->ntiles - 1;
        return ERR_PADDING;
    }
    threads = clamp_threads(threads, job->ntiles);
    part_t parts[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        parts[t] = (part_t){job, job->ntiles * t / threads, job->ntiles * (t + 1) / threads, OK, -1};
    }
    run_parts(run_part, parts, sizeof parts[0], threads);
    for (int t = 0; t < threads; t++) {
        if (parts[t].err != OK) {
            *bad_tile = parts[t].bad_tile;
            return parts[t].err;
        }
    }
    return OK;
}

PyDoc_STRVAR(decode_doc,
"decode(bitmap, qvalues, scales, tiles, out, numel, nnz, cols, group_size, bits, dtype, isa,\n"
"       threads) -> (error_code, bad_tile)\n\n"
"Decode one int8/int4 Endor tensor from raw addresses into a flat output of numel elements.\n"
"dtype: 0 float32, 1 float16, 2 bfloat16. The caller guarantees the buffer sizes (bitmap\n"
"ceil(numel/8), qvalues nnz or ceil(nnz/2) bytes, scales rows*ceil(cols/group_size), tiles\n"
"ceil(numel/4096)+1 int64, out numel elements). Releases the GIL. error_code: 0 ok, 1 tile\n"
"index invalid, 2 popcount disagrees with the tile index, 3 bitmap padding bits set, 4 bad\n"
"argument.");

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long bitmap, qvalues, scales, tiles, out;
    long long numel, nnz, cols, group_size;
    int bits, dtype, isa, threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLiiii", &bitmap, &qvalues, &scales, &tiles, &out,
                          &numel, &nnz, &cols, &group_size, &bits, &dtype, &isa, &threads))
        return NULL;
    if ((bits != 8 && bits != 4) || dtype < DT_F32 || dtype > DT_BF16 || isa < 0 ||
        isa > ISA_AVX512 || !(supported_isas & (1 << isa)) || numel < 0 || nnz < 0 ||
        nnz > numel || group_size < 1 || cols < 0 || (numel > 0 && (cols == 0 || numel % cols)))
        return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
    job_t job = {
        .bitmap = (const uint8_t *)(uintptr_t)bitmap,
        .qvalues = (const uint8_t *)(uintptr_t)qvalues,
        .scales = (const uint8_t *)(uintptr_t)scales,
        .tiles = (const int64_t *)(uintptr_t)tiles,
        .out = (uint8_t *)(uintptr_t)out,
        .numel = numel, .nnz = nnz, .ntiles = (numel + TILE - 1) / TILE,
        .bitmap_bytes = (numel + 7) / 8, .cols = cols, .group_size = group_size,
        .per_row = cols ? (cols + group_size - 1) / group_size : 0,
        .bits = bits, .dtype = dtype, .isa = isa,
    };
    int err;
    int64_t bad_tile;
    Py_BEGIN_ALLOW_THREADS
    err = decode_job(&job, threads, &bad_tile);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)bad_tile);
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, decode_doc},
    SUPPORTED_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_quant", "Endor's CPU decoder of int8/int4 values (see quant.c).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__quant(void) {
    build_tables();
#define QUANT_AVX2 (CPU_HAS("avx2") && CPU_HAS("f16c") && CPU_HAS("popcnt"))
    SET_SUPPORTED_ISAS(QUANT_AVX2, QUANT_AVX2 && CPU_HAS("avx512f") && CPU_HAS("avx512bw") &&
                                       CPU_HAS("avx512vl") && CPU_HAS("avx512vbmi2"));
    return PyModule_Create(&module);
}
