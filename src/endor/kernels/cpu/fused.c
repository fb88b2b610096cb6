/* The fused CPU linear of the Endor format: y = x @ W.T computed straight from W's bitmap and
 * packed values (docs/FORMAT.md, section 1), never writing the dense W anywhere.
 *
 * One entry point, `linear`, takes raw addresses (tensor.data_ptr()). W is [N, K] row-major: row
 * r is the flat elements [rK, rK+K), which may start and end anywhere inside a 4096-element tile
 * and span several tiles. x is [M, K] float32 (the caller widens the model dtype exactly), y is
 * [M, N] float32; every product is accumulated in float32.
 *
 * Threads split the output rows (pthreads, GIL released). A thread finds where its first row's
 * values start (tiles[k] + popcount of the tile up to the row) and then walks its rows in flat
 * order, 32 columns (a "chunk") at a time: the chunk's 32 bitmap bits pick which of its values
 * are present, the packed values are expanded into a register under that mask, widened to
 * float32 and multiplied with x's 32 matching columns. A chunk that crosses a tile boundary takes
 * its low lanes from one tile and its high lanes from the next. Each tile the walk enters is
 * checked first (tile index in range, popcount == tiles[k+1] - tiles[k]: FORMAT.md rules 5 and
 * 6), so a corrupt file reads nothing outside its tile's values.
 *
 * Getting a tile's packed values is one function, `tile_values`: the stored values as they are
 * (codec "raw"); for "exp" (exp_values.c) and "int8"/"int4" (quant_values.c) the tile decoded
 * into the thread's scratch (at most 16 KB: it stays in cache, no dense W, no memory traffic
 * beyond the compressed bytes), read by the same loops. int4 with groups of whole chunks on
 * AVX-512 skips the decoded scratch: its integers, unpacked one per byte, are table indices
 * into 16 decoded values per group, looked up in registers (quant_values.c, INT4_ROWS: runs of
 * whole chunks inside a group and a tile, two chunks per step; 1.4-1.8x the per-chunk walk it
 * replaced at batch 1).
 * Entering a tile of a decoded codec prefetches the next tile's bitmap and values.
 *
 * Paths chosen at run time (`supported()` says which this CPU runs):
 *   scalar  portable C;
 *   avx2    8 columns per step: pshufb / vpermd with a table per bitmap byte, F16C for fp16;
 *   avx512  32 columns per step: vpexpandw / vexpandps from memory (masked: it reads exactly the
 *           present values, never past them). bf16 widens without shuffles: a 32-bit lane
 *           holding bf16 pair (2j, 2j+1) gives element 2j+1 as `lane & 0xffff0000` and element 2j
 *           as `lane << 16`, multiplied with x's odd and even columns (x is split once per call).
 *           bf16 weights with an x that is exactly bf16 use vdpbf16ps (AVX512_BF16: `bf16_dot`),
 *           one instruction per chunk, x passed as bf16; it flushes subnormals (the bound in
 *           kernels/fused.py says by how much). Software prefetch ahead of the values and bitmap.
 *
 * Sum order: per output, per x row, lanes accumulate in float32 across chunks, then a horizontal
 * sum. It differs from torch's GEMV; the error bound is stated in kernels/fused.py. */
#include "common.h"

#include <stdlib.h>

#define CHUNK 32
#define MAX_BLOCK 8 /* x rows per pass over W: accumulators stay in registers */
/* Software prefetch distance (bytes) for the values and bitmap streams of the AVX-512 loops:
 * measured 1.2x faster than leaving it to the hardware prefetcher (4096x14336, one thread). */
#ifndef PREFETCH_VALUES
#define PREFETCH_VALUES 2048
#endif
#ifndef PREFETCH_BITS
#define PREFETCH_BITS 512
#endif
/* Vector loads of values (64 bytes on AVX-512, 16-32 on AVX2) read at most this many bytes past
 * the last value of a tile; tiles closer than that to the end of `values` use a padded copy. */
#define OVERREAD 64

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
/* The same codes as decompress.c (the Python side maps them to messages), then ERR_MEMORY. */
enum { OK = 0, ERR_TILE_INDEX = 1, ERR_POPCOUNT = 2, ERR_PADDING = 3, ERR_ARGUMENT = 4,
       ERR_EXP_BASE = 5, ERR_EXP_ESCIDX = 6, ERR_EXP_ESCAPES = 7, ERR_EXP_ESCAPE_VALUE = 8,
       ERR_MEMORY = 9 };
enum { CODEC_RAW = 0, CODEC_EXP = 1, CODEC_INT8 = 2, CODEC_INT4 = 3 };

#define AVX2_TARGET "avx2,fma,f16c,popcnt"
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,f16c,popcnt"
/* bfloat16 weights with bfloat16 activations: vdpbf16ps (AVX512_BF16) multiplies bf16 pairs. */
#define AVX512_BF16_TARGET AVX512_TARGET ",avx512bf16"

#include "exp_parts.h"

static inline uint64_t load_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

#include "exp_values.c"

typedef struct job job_t;
typedef struct part part_t;
/* Decodes the values [begin, end) of tile k of an int8/int4 tensor into part->scratch. */
typedef int (*quant_fn)(const job_t *job, part_t *part, int64_t k, int64_t begin, int64_t end);

struct job {
    const uint8_t *bitmap;
    const uint8_t *values;  /* raw codec */
    const int64_t *tiles;
    const float *x;      /* [M, K]; bf16 on avx512: [M, Kp] with each chunk's even then odd */
    const uint16_t *xh;  /* bf16_dot: x as bfloat16 [M, Kp], natural order, zero padded */
    float *y;            /* [M, N] */
    int64_t rows, cols, batch, x_stride;
    int64_t nnz, numel, ntiles, bitmap_bytes;
    int dtype, isa, codec, bf16_dot;
    exp_t exp;            /* codec exp */
    values_fn exp_values;
    const uint8_t *qvalues, *scales; /* codecs int8 / int4 */
    int64_t group_size, groups_per_row;
    int qbits;
    quant_fn quant_values;
    /* int4 on avx512 with G a multiple of 32: the cursor walks the tile's 4-bit integers
     * (unpacked to one nibble per byte: int4_indices) and each chunk looks its 32 weights up in a 16-entry table of
     * the group's decoded values, in registers. vbytes: bytes per value in the cursor's stream. */
    int int4_direct, vbytes;
};

struct part {
    const job_t *job;
    int64_t first, last; /* rows [first, last) */
    int err;
    int64_t bad_tile;
    uint8_t *scratch; /* a tile's values, padded: OVERREAD-safe copy, or decoded by a codec */
    int8_t *qscratch; /* int8/int4: the tile's integers */
};

static void int4_indices(const job_t *job, part_t *part, int64_t begin, int64_t end);

/* Where the walk is: the tile it is in and the next value to read of that tile. */
typedef struct {
    int64_t tile, tile_end;   /* flat end of `tile` */
    const uint8_t *v;         /* next packed value */
    const uint8_t *v_end;     /* end of this tile's values */
    const uint8_t *v_safe;    /* vector loads may read up to here (>= v_end + OVERREAD or exact) */
} cursor_t;


static inline __attribute__((always_inline)) int64_t count_bits(const uint8_t *bits, int64_t n) {
    int64_t count = 0, i = 0;
    for (; i + 64 <= n; i += 64) count += __builtin_popcountll(load_u64(bits + i / 8));
    for (; i + 8 <= n; i += 8) count += __builtin_popcount(bits[i / 8]);
    if (i < n) count += __builtin_popcount(bits[i / 8] & ((1u << (n - i)) - 1));
    return count;
}

/* `len` (<= 32) bits of the bitmap starting at flat element p, bit j = element p + j. */
static inline uint32_t bits_at(const job_t *job, int64_t p, int len) {
    const int64_t byte = p >> 3;
    const int shift = (int)(p & 7);
    uint64_t w;
    if (byte + 8 <= job->bitmap_bytes) {
        w = load_u64(job->bitmap + byte);
    } else {
        w = 0;
        memcpy(&w, job->bitmap + byte, (size_t)(job->bitmap_bytes - byte));
    }
    w >>= shift;
    return len >= 32 ? (uint32_t)w : (uint32_t)(w & ((1ull << len) - 1));
}

static inline int elem_size(int dtype) { return dtype == DT_F32 ? 4 : 2; }

static inline void prefetch_range(const uint8_t *base, int64_t from, int64_t to, int64_t size) {
    if (to > size) to = size;
    for (int64_t o = from; o < to; o += 64) __builtin_prefetch(base + o);
}

/* The decoded codecs read a tile's bitmap and values in one burst when the walk enters it (the
 * popcount check, then the decoder), too soon for the hardware prefetcher: tile k + 1's bitmap
 * and its first values (as many as tile k has) are requested now (measured 1.0-1.1x for int4
 * and exp on the e2e shapes, one thread, a loaded machine). */
static inline void prefetch_next_tile(const job_t *job, int64_t k, int64_t count) {
    if (job->codec == CODEC_RAW || k + 1 >= job->ntiles) return;
    const int64_t next = job->tiles[k + 1], stop = next + count;
    prefetch_range(job->bitmap, (k + 1) * (TILE / 8), (k + 2) * (TILE / 8), job->bitmap_bytes);
    if (job->codec == CODEC_EXP) {
        const exp_t *e = &job->exp;
        prefetch_range(e->signmant, next * e->n_bytes, stop * e->n_bytes, job->nnz * e->n_bytes);
        prefetch_range(e->codes, next / 64 * e->planes * 8, (stop / 64 + 1) * e->planes * 8,
                       (job->nnz + 63) / 64 * e->planes * 8);
    } else {
        const int per_byte = job->qbits == 4 ? 2 : 1;
        prefetch_range(job->qvalues, next / per_byte, stop / per_byte + 1,
                       (job->nnz + per_byte - 1) / per_byte);
    }
}

/* The one pluggable step: the packed values of tile k. Codec "raw": the stored values; "exp",
 * "int8", "int4": the tile decoded into the thread's scratch (at most 16 KB, so it stays in L1/L2:
 * no dense copy, no memory traffic beyond the compressed bytes). Checks the tile first. Sets the
 * cursor to the tile's first value. */
static inline __attribute__((always_inline)) int tile_values(const job_t *job, part_t *part,
                                                             int64_t k, cursor_t *c) {
    const int es = elem_size(job->dtype);
    if (k >= job->ntiles) { part->bad_tile = k; return ERR_TILE_INDEX; }
    const int64_t begin = job->tiles[k], end = job->tiles[k + 1];
    const int64_t start = k * TILE;
    const int64_t len = job->numel - start < TILE ? job->numel - start : TILE;
    if (begin < 0 || end < begin || end > job->nnz || end - begin > len) {
        part->bad_tile = k;
        return ERR_TILE_INDEX;
    }
    if (count_bits(job->bitmap + start / 8, len) != end - begin) {
        part->bad_tile = k;
        return ERR_POPCOUNT;
    }
    prefetch_next_tile(job, k, end - begin);
    const uint8_t *src;
    if (job->codec == CODEC_EXP) {
        const int64_t e0 = job->exp.escidx[k], e1 = job->exp.escidx[k + 1];
        if (e0 < 0 || e1 < e0 || e1 > job->exp.n_escapes || e1 - e0 > end - begin) {
            part->bad_tile = k;
            return ERR_EXP_ESCIDX;
        }
        const int err = job->exp_values(&job->exp, job->nnz, k, begin, end, es, part->scratch);
        if (err != OK) { part->bad_tile = k; return err; }
        memset(part->scratch + (end - begin) * es, 0, OVERREAD);
        src = part->scratch;
    } else if (job->int4_direct) {
        int4_indices(job, part, begin, end);
        src = (const uint8_t *)part->qscratch;
    } else if (job->codec != CODEC_RAW) {
        const int err = job->quant_values(job, part, k, begin, end);
        if (err != OK) { part->bad_tile = k; return err; }
        src = part->scratch;
    } else if ((src = job->values + begin * es) + (end - begin) * es + OVERREAD >
               job->values + job->nnz * es) {
        /* Near the end of `values`: a padded copy, so vector loads never run past the buffer. */
        size_t bytes = (size_t)(end - begin) * es;
        if (bytes) memcpy(part->scratch, src, bytes);
        memset(part->scratch + bytes, 0, OVERREAD);
        src = part->scratch;
    }
    c->tile = k;
    c->tile_end = start + len;
    c->v = src;
    c->v_end = src + (end - begin) * job->vbytes;
    c->v_safe = c->v_end + OVERREAD;
    return OK;
}

/* Positions the cursor at flat element p (the first element of a thread's rows). */
static inline __attribute__((always_inline)) int seek(const job_t *job, part_t *part, int64_t p,
                                                      cursor_t *c) {
    int err = tile_values(job, part, p / TILE, c);
    if (err) return err;
    c->v += count_bits(job->bitmap + (p / TILE) * (TILE / 8), p % TILE) * job->vbytes;
    return OK;
}

/* ---------------------------------------------------------------- scalar (any CPU) */

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float widen(const uint8_t *p, int dtype) {
    if (dtype == DT_F32) { float f; memcpy(&f, p, 4); return f; }
    uint16_t h;
    memcpy(&h, p, 2);
    if (dtype == DT_F16) return f16_to_f32(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#include "quant_values.c"

/* One element at a time; zeros multiply x too, as in a dense GEMV (0 * inf = nan). */
static int rows_scalar(const job_t *job, part_t *part, int64_t x0, int nb) {
    const int es = elem_size(job->dtype);
    const int64_t K = job->cols;
    cursor_t c;
    int err;
    for (int64_t r = part->first; r < part->last; r++) {
        for (int b = 0; b < nb; b++) {
            const float *x = job->x + (x0 + b) * job->x_stride;
            float acc = 0.0f;
            /* Seek again rather than save the cursor: it may point into the scratch copy,
             * which the row's next tile overwrites. */
            if ((err = seek(job, part, r * K, &c))) return err;
            for (int64_t col = 0; col < K; col++) {
                int64_t p = r * K + col;
                if (p >= c.tile_end && (err = tile_values(job, part, c.tile + 1, &c))) return err;
                float w = 0.0f;
                if ((job->bitmap[p >> 3] >> (p & 7)) & 1) {
                    w = widen(c.v, job->dtype);
                    c.v += es;
                }
                acc += w * x[col];
            }
            job->y[(x0 + b) * job->rows + r] = acc;
        }
    }
    return OK;
}

#if ENDOR_X86

/* ---------------------------------------------------------------- AVX2 */

static uint8_t shuffle16[256][16];
static uint8_t index32[256][8];

static void build_tables(void) {
    for (int b = 0; b < 256; b++) {
        int k = 0;
        for (int j = 0; j < 8; j++) {
            if ((b >> j) & 1) {
                shuffle16[b][2 * j] = (uint8_t)(2 * k);
                shuffle16[b][2 * j + 1] = (uint8_t)(2 * k + 1);
                index32[b][j] = (uint8_t)k++;
            } else {
                shuffle16[b][2 * j] = shuffle16[b][2 * j + 1] = 0x80;
                index32[b][j] = 0;
            }
        }
    }
}

/* 8 weights (columns under bitmap byte b) widened to float32, from packed values at *v. */
__attribute__((target(AVX2_TARGET))) static inline __m256 expand8_avx2(unsigned b,
                                                                      const uint8_t **v,
                                                                      int dtype) {
    const int n = __builtin_popcount(b);
    __m256 w;
    if (dtype == DT_F32) {
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256i raw = _mm256_loadu_si256((const __m256i *)*v);
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)index32[b]));
        __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)b), lane_bit),
                                          lane_bit);
        w = _mm256_castsi256_ps(_mm256_and_si256(_mm256_permutevar8x32_epi32(raw, idx), keep));
        *v += 4 * n;
    } else {
        __m128i raw = _mm_loadu_si128((const __m128i *)*v);
        __m128i h = _mm_shuffle_epi8(raw, _mm_loadu_si128((const __m128i *)shuffle16[b]));
        if (dtype == DT_F16)
            w = _mm256_cvtph_ps(h);
        else
            w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        *v += 2 * n;
    }
    return w;
}

__attribute__((target(AVX2_TARGET))) static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows [first, last) for x rows [x0, x0 + nb), 8 columns per step. A step that crosses a tile
 * boundary, or whose vector load would pass the tile's safe end, goes one element at a time. */
__attribute__((target(AVX2_TARGET))) static inline __attribute__((always_inline)) int
rows_avx2_nb(const job_t *job, part_t *part, int64_t x0, const int nb) {
    const int es = elem_size(job->dtype);
    const int64_t K = job->cols;
    const int load_bytes = es == 2 ? 16 : 32;
    cursor_t c;
    int err = seek(job, part, part->first * K, &c);
    if (err) return err;
    for (int64_t r = part->first; r < part->last; r++) {
        __m256 acc[MAX_BLOCK];
        float tail[MAX_BLOCK];
        for (int b = 0; b < nb; b++) { acc[b] = _mm256_setzero_ps(); tail[b] = 0.0f; }
        const float *x = job->x + x0 * job->x_stride;
        int64_t col = 0;
        while (col < K) {
            const int64_t p = r * K + col;
            if (p >= c.tile_end && (err = tile_values(job, part, c.tile + 1, &c))) return err;
            if (col + 8 <= K && p + 8 <= c.tile_end && c.v + load_bytes <= c.v_safe) {
                __m256 w = expand8_avx2(bits_at(job, p, 8), &c.v, job->dtype);
                for (int b = 0; b < nb; b++)
                    acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * job->x_stride + col),
                                             acc[b]);
                col += 8;
            } else {
                float w = 0.0f;
                if ((job->bitmap[p >> 3] >> (p & 7)) & 1) {
                    w = widen(c.v, job->dtype);
                    c.v += es;
                }
                for (int b = 0; b < nb; b++) tail[b] += w * x[b * job->x_stride + col];
                col += 1;
            }
        }
        for (int b = 0; b < nb; b++) job->y[(x0 + b) * job->rows + r] = hsum8(acc[b]) + tail[b];
    }
    return OK;
}

/* ---------------------------------------------------------------- AVX-512 */

/* 32 weights of one chunk (lanes under `mask`), values read exactly (masked expand-load). Lanes
 * at and above `split` come from the next tile: the cursor moves there between the two loads. */
__attribute__((target(AVX512_TARGET))) static inline __attribute__((always_inline)) int
load_chunk16(const job_t *job, part_t *part, cursor_t *c, uint32_t mask, int split,
             __m512i *out) {
    if (split >= 32) { /* a plain load and a register expand: faster than an expand-load */
        *out = _mm512_maskz_expand_epi16(mask, _mm512_loadu_si512((const void *)c->v));
        c->v += 2 * __builtin_popcount(mask);
        return OK;
    }
    const uint32_t low = mask & ((1u << split) - 1), high = mask & ~((1u << split) - 1);
    __m512i w = _mm512_maskz_expandloadu_epi16(low, c->v);
    int err = tile_values(job, part, c->tile + 1, c);
    if (err) return err;
    *out = _mm512_mask_expandloadu_epi16(w, high, c->v);
    c->v += 2 * __builtin_popcount(high);
    return OK;
}

__attribute__((target(AVX512_TARGET))) static inline __attribute__((always_inline)) int
load_chunk32(const job_t *job, part_t *part, cursor_t *c, uint32_t mask, int split,
             __m512 *lo, __m512 *hi) {
    const uint32_t a = split >= 32 ? mask : mask & ((1u << split) - 1);
    const uint32_t b = mask & ~a;
    *lo = _mm512_maskz_expand_ps((__mmask16)a, _mm512_loadu_ps((const void *)c->v));
    c->v += 4 * __builtin_popcount(a & 0xffff);
    *hi = _mm512_maskz_expand_ps((__mmask16)(a >> 16), _mm512_loadu_ps((const void *)c->v));
    c->v += 4 * __builtin_popcount(a >> 16);
    if (b) {
        int err = tile_values(job, part, c->tile + 1, c);
        if (err) return err;
        *lo = _mm512_mask_expandloadu_ps(*lo, (__mmask16)b, c->v);
        c->v += 4 * __builtin_popcount(b & 0xffff);
        *hi = _mm512_mask_expandloadu_ps(*hi, (__mmask16)(b >> 16), c->v);
        c->v += 4 * __builtin_popcount(b >> 16);
    } else if (split < 32) {
        int err = tile_values(job, part, c->tile + 1, c);
        if (err) return err;
    }
    return OK;
}

/* The hot loop: `n` columns (a multiple of 32) of one row inside one tile, whose bitmap words
 * can be read 8 bytes at a time, starting at flat element p with the cursor at its values. */
__attribute__((target(AVX512_TARGET))) static inline __attribute__((always_inline)) void
span_avx512(const job_t *job, const uint8_t **vp, int64_t p, int64_t n, const float *x,
            const int nb, const int dtype, __m512 *acc, __m512 *acc2) {
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    const uint8_t *bits = job->bitmap + (p >> 3);
    const int shift = (int)(p & 7);
    const uint8_t *v = *vp;
    int64_t i = 0;
    if (dtype == DT_F16 && nb <= 2) {
        /* Two chunks per step into two more accumulators: four independent FMA chains (the
         * float16 loop is latency-bound with two). */
        __m512 acc3[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512 acc4[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; i + 2 * CHUNK <= n; i += 2 * CHUNK, bits += 2 * CHUNK / 8) {
            _mm_prefetch((const char *)v + PREFETCH_VALUES, _MM_HINT_T0);
            _mm_prefetch((const char *)bits + PREFETCH_BITS, _MM_HINT_T0);
            const uint32_t m0 = (uint32_t)(load_u64(bits) >> shift);
            const uint32_t m1 = (uint32_t)(load_u64(bits + CHUNK / 8) >> shift);
            __m256i h[4];
            const uint32_t half[4] = {m0 & 0xffff, m0 >> 16, m1 & 0xffff, m1 >> 16};
            for (int q = 0; q < 4; q++) {
                h[q] = _mm256_maskz_expand_epi16((__mmask16)half[q],
                                                 _mm256_loadu_si256((const __m256i *)v));
                v += 2 * __builtin_popcount(half[q]);
            }
            for (int b = 0; b < nb; b++) {
                const float *xb = x + b * job->x_stride + i;
                acc[b] = _mm512_fmadd_ps(_mm512_cvtph_ps(h[0]), _mm512_loadu_ps(xb), acc[b]);
                acc2[b] = _mm512_fmadd_ps(_mm512_cvtph_ps(h[1]), _mm512_loadu_ps(xb + 16), acc2[b]);
                acc3[b] = _mm512_fmadd_ps(_mm512_cvtph_ps(h[2]), _mm512_loadu_ps(xb + 32), acc3[b]);
                acc4[b] = _mm512_fmadd_ps(_mm512_cvtph_ps(h[3]), _mm512_loadu_ps(xb + 48), acc4[b]);
            }
        }
        for (int b = 0; b < nb; b++) {
            acc[b] = _mm512_add_ps(acc[b], acc3[b]);
            acc2[b] = _mm512_add_ps(acc2[b], acc4[b]);
        }
    }
    for (; i < n; i += CHUNK, bits += CHUNK / 8) {
        _mm_prefetch((const char *)v + PREFETCH_VALUES, _MM_HINT_T0);
        if (!(i & 63)) _mm_prefetch((const char *)bits + PREFETCH_BITS, _MM_HINT_T0);
        const uint32_t mask = (uint32_t)(load_u64(bits) >> shift);
        __m512 lo, hi;
        if (dtype == DT_BF16) { /* x chunk stored as 16 even columns, then 16 odd */
            __m512i w = _mm512_maskz_expand_epi16(mask, _mm512_loadu_si512((const void *)v));
            v += 2 * __builtin_popcount(mask);
            lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            hi = _mm512_castsi512_ps(_mm512_and_si512(w, high_half));
        } else if (dtype == DT_F16) {
            const uint32_t m_lo = mask & 0xffff, m_hi = mask >> 16;
            __m256i a = _mm256_maskz_expand_epi16((__mmask16)m_lo,
                                                  _mm256_loadu_si256((const __m256i *)v));
            v += 2 * __builtin_popcount(m_lo);
            __m256i b = _mm256_maskz_expand_epi16((__mmask16)m_hi,
                                                  _mm256_loadu_si256((const __m256i *)v));
            v += 2 * __builtin_popcount(m_hi);
            lo = _mm512_cvtph_ps(a);
            hi = _mm512_cvtph_ps(b);
        } else {
            const uint32_t m_lo = mask & 0xffff, m_hi = mask >> 16;
            lo = _mm512_maskz_expand_ps((__mmask16)m_lo, _mm512_loadu_ps((const void *)v));
            v += 4 * __builtin_popcount(m_lo);
            hi = _mm512_maskz_expand_ps((__mmask16)m_hi, _mm512_loadu_ps((const void *)v));
            v += 4 * __builtin_popcount(m_hi);
        }
        for (int b = 0; b < nb; b++) {
            const float *xb = x + b * job->x_stride + i;
            acc[b] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[b]);
            acc2[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc2[b]);
        }
    }
    *vp = v;
}

/* Rows [first, last) for x rows [x0, x0 + nb). Runs of whole chunks inside a tile go through
 * span_avx512; a row's last, shorter chunk and a chunk across a tile boundary go one by one. */
__attribute__((target(AVX512_TARGET))) static inline __attribute__((always_inline)) int
rows_avx512_nb(const job_t *job, part_t *part, int64_t x0, const int nb, const int dtype) {
    const int64_t K = job->cols;
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u);
    /* span_avx512 reads 8 bitmap bytes per chunk: it stops where that would pass the end. */
    const int64_t wide_bits_end = job->bitmap_bytes >= 8 ? (job->bitmap_bytes - 8) * 8 : 0;
    cursor_t c;
    int err = seek(job, part, part->first * K, &c);
    if (err) return err;
    for (int64_t r = part->first; r < part->last; r++) {
        /* Two accumulators per x row (low and high 16 lanes): two FMA chains, not one. */
        __m512 acc[MAX_BLOCK], acc2[MAX_BLOCK];
        for (int b = 0; b < nb; b++) acc[b] = acc2[b] = _mm512_setzero_ps();
        const float *x = job->x + x0 * job->x_stride;
        int64_t col = 0;
        while (col < K) {
            const int64_t p = r * K + col;
            if (p >= c.tile_end && (err = tile_values(job, part, c.tile + 1, &c))) return err;
            int64_t run = K - col;
            if (c.tile_end - p < run) run = c.tile_end - p;
            if (wide_bits_end - p < run) run = wide_bits_end - p;
            if (run >= CHUNK) {
                run -= run % CHUNK;
                span_avx512(job, &c.v, p, run, x + col, nb, dtype, acc, acc2);
                col += run;
                continue;
            }
            const int len = K - col < CHUNK ? (int)(K - col) : CHUNK;
            const uint32_t mask = bits_at(job, p, len);
            const int split = p + len > c.tile_end ? (int)(c.tile_end - p) : CHUNK;
            __m512 lo, hi;
            if (dtype == DT_F32) {
                if ((err = load_chunk32(job, part, &c, mask, split, &lo, &hi))) return err;
            } else {
                __m512i w;
                if ((err = load_chunk16(job, part, &c, mask, split, &w))) return err;
                if (dtype == DT_BF16) {
                    lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                    hi = _mm512_castsi512_ps(_mm512_and_si512(w, high_half));
                } else {
                    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
                    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
                }
            }
            for (int b = 0; b < nb; b++) {
                const float *xb = x + b * job->x_stride + col;
                acc[b] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), acc[b]);
                acc2[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), acc2[b]);
            }
            col += CHUNK;
        }
        for (int b = 0; b < nb; b++)
            job->y[(x0 + b) * job->rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b], acc2[b]));
    }
    return OK;
}

/* bfloat16 weights, x exactly bfloat16 (bf16_dot): vdpbf16ps multiplies a chunk's 32 weights with
 * x's 32 columns pairwise and adds both products to 16 float32 lanes, one instruction where the
 * float32 path takes a shift, a mask and two FMAs. Two chunks per step, two accumulator chains. */
__attribute__((target(AVX512_BF16_TARGET))) static inline __attribute__((always_inline)) void
span_bf16_dot(const job_t *job, const uint8_t **vp, int64_t p, int64_t n, const uint16_t *x,
              const int nb, __m512 *acc, __m512 *acc2) {
    const uint8_t *bits = job->bitmap + (p >> 3);
    const int shift = (int)(p & 7);
    const uint8_t *v = *vp;
    int64_t i = 0;
    for (; i + 2 * CHUNK <= n; i += 2 * CHUNK, bits += 2 * CHUNK / 8) {
        _mm_prefetch((const char *)v + PREFETCH_VALUES, _MM_HINT_T0);
        _mm_prefetch((const char *)bits + PREFETCH_BITS, _MM_HINT_T0);
        const uint32_t m0 = (uint32_t)(load_u64(bits) >> shift);
        const uint32_t m1 = (uint32_t)(load_u64(bits + CHUNK / 8) >> shift);
        const __m512i w0 = _mm512_maskz_expand_epi16(m0, _mm512_loadu_si512((const void *)v));
        v += 2 * __builtin_popcount(m0);
        const __m512i w1 = _mm512_maskz_expand_epi16(m1, _mm512_loadu_si512((const void *)v));
        v += 2 * __builtin_popcount(m1);
        for (int b = 0; b < nb; b++) {
            const uint16_t *xb = x + b * job->x_stride + i;
            acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)w0,
                                      (__m512bh)_mm512_loadu_si512((const void *)xb));
            acc2[b] = _mm512_dpbf16_ps(acc2[b], (__m512bh)w1,
                                       (__m512bh)_mm512_loadu_si512((const void *)(xb + CHUNK)));
        }
    }
    if (i < n) {
        const uint32_t m0 = (uint32_t)(load_u64(bits) >> shift);
        const __m512i w0 = _mm512_maskz_expand_epi16(m0, _mm512_loadu_si512((const void *)v));
        v += 2 * __builtin_popcount(m0);
        for (int b = 0; b < nb; b++)
            acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(
                                          (const void *)(x + b * job->x_stride + i)));
    }
    *vp = v;
}

/* rows_avx512_nb for bf16_dot (x in job->xh). */
__attribute__((target(AVX512_BF16_TARGET))) static inline __attribute__((always_inline)) int
rows_bf16_dot_nb(const job_t *job, part_t *part, int64_t x0, const int nb) {
    const int64_t K = job->cols;
    const int64_t wide_bits_end = job->bitmap_bytes >= 8 ? (job->bitmap_bytes - 8) * 8 : 0;
    cursor_t c;
    int err = seek(job, part, part->first * K, &c);
    if (err) return err;
    for (int64_t r = part->first; r < part->last; r++) {
        __m512 acc[MAX_BLOCK], acc2[MAX_BLOCK];
        for (int b = 0; b < nb; b++) acc[b] = acc2[b] = _mm512_setzero_ps();
        const uint16_t *x = job->xh + x0 * job->x_stride;
        int64_t col = 0;
        while (col < K) {
            const int64_t p = r * K + col;
            if (p >= c.tile_end && (err = tile_values(job, part, c.tile + 1, &c))) return err;
            int64_t run = K - col;
            if (c.tile_end - p < run) run = c.tile_end - p;
            if (wide_bits_end - p < run) run = wide_bits_end - p;
            if (run >= CHUNK) {
                run -= run % CHUNK;
                span_bf16_dot(job, &c.v, p, run, x + col, nb, acc, acc2);
                col += run;
                continue;
            }
            const int len = K - col < CHUNK ? (int)(K - col) : CHUNK;
            const uint32_t mask = bits_at(job, p, len);
            const int split = p + len > c.tile_end ? (int)(c.tile_end - p) : CHUNK;
            __m512i w;
            if ((err = load_chunk16(job, part, &c, mask, split, &w))) return err;
            for (int b = 0; b < nb; b++)
                acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)w, (__m512bh)_mm512_loadu_si512(
                                              (const void *)(x + b * job->x_stride + col)));
            col += CHUNK;
        }
        for (int b = 0; b < nb; b++)
            job->y[(x0 + b) * job->rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b], acc2[b]));
    }
    return OK;
}


#define DISPATCH_NB(FN, ...)                                                                     \
    switch (nb) {                                                                                \
    case 1: return FN(job, part, x0, 1 __VA_ARGS__);                                             \
    case 2: return FN(job, part, x0, 2 __VA_ARGS__);                                             \
    case 3: return FN(job, part, x0, 3 __VA_ARGS__);                                             \
    case 4: return FN(job, part, x0, 4 __VA_ARGS__);                                             \
    case 5: return FN(job, part, x0, 5 __VA_ARGS__);                                             \
    case 6: return FN(job, part, x0, 6 __VA_ARGS__);                                             \
    case 7: return FN(job, part, x0, 7 __VA_ARGS__);                                             \
    default: return FN(job, part, x0, 8 __VA_ARGS__);                                            \
    }

__attribute__((target(AVX2_TARGET))) static int rows_avx2(const job_t *job, part_t *part,
                                                          int64_t x0, int nb) {
    DISPATCH_NB(rows_avx2_nb)
}
/* One copy per (x rows, dtype): both are constants in the hot loop. */
__attribute__((target(AVX512_TARGET))) static int rows_avx512_bf16(const job_t *job, part_t *part,
                                                                   int64_t x0, int nb) {
    DISPATCH_NB(rows_avx512_nb, , DT_BF16)
}
__attribute__((target(AVX512_TARGET))) static int rows_avx512_f16(const job_t *job, part_t *part,
                                                                  int64_t x0, int nb) {
    DISPATCH_NB(rows_avx512_nb, , DT_F16)
}
__attribute__((target(AVX512_TARGET))) static int rows_avx512_f32(const job_t *job, part_t *part,
                                                                  int64_t x0, int nb) {
    DISPATCH_NB(rows_avx512_nb, , DT_F32)
}
__attribute__((target(AVX512_BF16_TARGET))) static int rows_avx512_bf16_dot(
        const job_t *job, part_t *part, int64_t x0, int nb) {
    DISPATCH_NB(rows_bf16_dot_nb)
}
__attribute__((target(AVX512_BF16_TARGET))) static int rows_int4_dot(
        const job_t *job, part_t *part, int64_t x0, int nb) {
    DISPATCH_NB(rows_int4_dot_nb)
}
__attribute__((target(AVX512_TARGET))) static int rows_int4_float(
        const job_t *job, part_t *part, int64_t x0, int nb) {
    DISPATCH_NB(rows_int4_float_nb)
}
static int rows_avx512(const job_t *job, part_t *part, int64_t x0, int nb) {
    if (job->int4_direct)
        return job->bf16_dot ? rows_int4_dot(job, part, x0, nb) : rows_int4_float(job, part, x0, nb);
    if (job->dtype == DT_BF16 && job->bf16_dot) return rows_avx512_bf16_dot(job, part, x0, nb);
    if (job->dtype == DT_BF16) return rows_avx512_bf16(job, part, x0, nb);
    if (job->dtype == DT_F16) return rows_avx512_f16(job, part, x0, nb);
    return rows_avx512_f32(job, part, x0, nb);
}

#endif /* ENDOR_X86 */

/* ---------------------------------------------------------------- threads */

static void *run_part(void *arg) {
    part_t *p = (part_t *)arg;
    const job_t *job = p->job;
    for (int64_t x0 = 0; x0 < job->batch && p->err == OK; x0 += MAX_BLOCK) {
        int nb = job->batch - x0 < MAX_BLOCK ? (int)(job->batch - x0) : MAX_BLOCK;
#if ENDOR_X86
        if (job->isa == ISA_AVX512) { p->err = rows_avx512(job, p, x0, nb); continue; }
        if (job->isa == ISA_AVX2) { p->err = rows_avx2(job, p, x0, nb); continue; }
#endif
        p->err = rows_scalar(job, p, x0, nb);
    }
    return NULL;
}

static int bf16_dot_cpu; /* the CPU runs vdpbf16ps (AVX512_BF16) */

static int linear_job(const job_t *job, int threads, int64_t *bad_tile) {
    *bad_tile = -1;
    if (job->rows == 0 || job->batch == 0) return OK;
    if (job->cols == 0) {
        memset(job->y, 0, (size_t)(job->rows * job->batch) * sizeof(float));
        return OK;
    }
    if (job->tiles[0] != 0) { *bad_tile = 0; return ERR_TILE_INDEX; }
    if (job->tiles[job->ntiles] != job->nnz) { *bad_tile = job->ntiles - 1; return ERR_TILE_INDEX; }
    if (job->codec == CODEC_EXP && (job->exp.escidx[0] != 0 ||
                                    job->exp.escidx[job->ntiles] != job->exp.n_escapes)) {
        *bad_tile = 0;
        return ERR_EXP_ESCIDX;
    }
    if ((job->numel & 7) && (job->bitmap[job->numel / 8] >> (job->numel & 7))) {
        *bad_tile = job->ntiles - 1;
        return ERR_PADDING;
    }
    threads = clamp_threads(threads, job->rows);
    part_t parts[MAX_THREADS];
    /* A tile's values (decoders write up to one 64-value block past them), then the int8/int4
     * codecs' integers (vector stores up to 64 past). */
    const size_t values_bytes = (size_t)TILE * 4 + 256 + OVERREAD;
    const size_t scratch_bytes = values_bytes + TILE + 128;
    uint8_t *scratch = aligned_alloc(64, scratch_bytes * threads);
    if (!scratch) return ERR_MEMORY;
    for (int t = 0; t < threads; t++) {
        parts[t].job = job;
        parts[t].first = job->rows * t / threads;
        parts[t].last = job->rows * (t + 1) / threads;
        parts[t].err = OK;
        parts[t].bad_tile = -1;
        parts[t].scratch = scratch + scratch_bytes * t;
        parts[t].qscratch = (int8_t *)(parts[t].scratch + values_bytes);
    }
    run_parts(run_part, parts, sizeof parts[0], threads);
    free(scratch);
    for (int t = 0; t < threads; t++) {
        if (parts[t].err != OK) {
            *bad_tile = parts[t].bad_tile;
            return parts[t].err;
        }
    }
    return OK;
}

PyDoc_STRVAR(linear_doc,
"linear(bitmap, values, nnz, tiles, x, y, rows, cols, batch, x_stride, dtype, isa, threads,\n"
"       bf16_dot, codec, codec_parts) -> (error_code, bad_tile)\n\n"
"y[batch, rows] (float32) = x[batch, cols] @ W.T for the Endor tensor W[rows, cols] given by raw\n"
"addresses. dtype: 0 float32, 1 float16, 2 bfloat16. x: float32, row stride x_stride floats;\n"
"with isa 2 (avx512) and bfloat16, each 32-column chunk of an x row holds its 16 even columns\n"
"then its 16 odd ones, and x_stride >= cols rounded up to 32 (zero padded); with bf16_dot (isa 2,\n"
"bfloat16, bf16_dot_supported()) x is bfloat16 in natural order, same stride and padding.\n"
"codec: 0 raw (values; codec_parts ()), 1 exp (values unused; codec_parts (signmant, codes,\n"
"bases, escidx, escapes, n_escapes, e_bits, m_bits, n_bytes, planes, max_base)), 2 int8, 3 int4\n"
"(codec_parts (qvalues, scales, group_size, groups_per_row)). The caller guarantees the buffer\n"
"sizes (and rules Q2, Q3). Releases the GIL. error_code: 0 ok, 1 tile index invalid, 2 popcount\n"
"disagrees with the tile index, 3 bitmap padding bits set, 4 bad argument, 5-8 exp codec data\n"
"invalid (as the decompressor), 9 out of memory.");

static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long bitmap, values, tiles, x, y;
    long long nnz, rows, cols, batch, x_stride;
    int dtype, isa, threads, bf16_dot, codec;
    PyObject *codec_parts;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLKKKLLLLiiiiiO!", &bitmap, &values, &nnz, &tiles, &x, &y,
                          &rows, &cols, &batch, &x_stride, &dtype, &isa, &threads, &bf16_dot,
                          &codec, &PyTuple_Type, &codec_parts))
        return NULL;
    if (dtype < DT_F32 || dtype > DT_BF16 || isa < 0 || isa > ISA_AVX512 ||
        !(supported_isas & (1 << isa)) || rows < 0 || cols < 0 || batch < 0 ||
        x_stride < cols || nnz < 0 || (cols && rows > ((int64_t)1 << 48) / cols) ||
        nnz > rows * cols || codec < CODEC_RAW || codec > CODEC_INT4 ||
        (bf16_dot && (isa != ISA_AVX512 || dtype != DT_BF16 || !bf16_dot_cpu)))
        return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
    const int64_t numel = rows * cols;
    job_t job = {
        .bitmap = (const uint8_t *)(uintptr_t)bitmap,
        .values = (const uint8_t *)(uintptr_t)values,
        .tiles = (const int64_t *)(uintptr_t)tiles,
        .x = (const float *)(uintptr_t)x,
        .xh = (const uint16_t *)(uintptr_t)x,
        .y = (float *)(uintptr_t)y,
        .rows = rows, .cols = cols, .batch = batch, .x_stride = x_stride,
        .nnz = nnz, .numel = numel, .ntiles = (numel + TILE - 1) / TILE,
        .bitmap_bytes = (numel + 7) / 8,
        .dtype = dtype, .isa = isa, .codec = codec, .bf16_dot = bf16_dot,
    };
    job.vbytes = dtype == DT_F32 ? 4 : 2;
    if (codec == CODEC_EXP) {
        unsigned long long signmant, codes, bases, escidx, escapes;
        long long n_escapes;
        int e_bits, m_bits, n_bytes, planes, max_base;
        if (!PyArg_ParseTuple(codec_parts, "KKKKKLiiiii", &signmant, &codes, &bases, &escidx,
                              &escapes, &n_escapes, &e_bits, &m_bits, &n_bytes, &planes,
                              &max_base))
            return NULL;
        if (n_escapes < 0 || n_escapes > nnz || planes < 1 || planes > 8 || n_bytes < 1 ||
            n_bytes > 3 || (dtype == DT_F32) != (n_bytes == 3))
            return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
        job.exp = (exp_t){
            .signmant = (const uint8_t *)(uintptr_t)signmant,
            .codes = (const uint8_t *)(uintptr_t)codes,
            .bases = (const uint8_t *)(uintptr_t)bases,
            .escidx = (const int64_t *)(uintptr_t)escidx,
            .escapes = (const uint8_t *)(uintptr_t)escapes,
            .n_escapes = n_escapes, .planes = planes, .e_bits = e_bits, .m_bits = m_bits,
            .n_bytes = n_bytes, .max_base = max_base,
        };
        job.exp_values = choose_values(isa, &job.exp);
    } else if (codec != CODEC_RAW) {
        unsigned long long qvalues, scales;
        long long group_size, groups_per_row;
        if (!PyArg_ParseTuple(codec_parts, "KKLL", &qvalues, &scales, &group_size,
                              &groups_per_row))
            return NULL;
        if (group_size < 1 || groups_per_row != (cols + group_size - 1) / group_size)
            return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
        job.qvalues = (const uint8_t *)(uintptr_t)qvalues;
        job.scales = (const uint8_t *)(uintptr_t)scales;
        job.group_size = group_size;
        job.groups_per_row = groups_per_row;
        job.qbits = codec == CODEC_INT8 ? 8 : 4;
        job.quant_values = choose_quant(isa);
        /* fused.py's prepare_x keeps x in natural order for exactly this case */
        job.int4_direct = codec == CODEC_INT4 && isa == ISA_AVX512 && group_size % CHUNK == 0;
        if (job.int4_direct) job.vbytes = 1;
    } else if (PyTuple_GET_SIZE(codec_parts) != 0) {
        return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
    }
    int err;
    int64_t bad_tile;
    Py_BEGIN_ALLOW_THREADS
    err = linear_job(&job, threads, &bad_tile);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)bad_tile);
}

static PyObject *py_bf16_dot_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(bf16_dot_cpu);
}

static PyMethodDef methods[] = {
    {"bf16_dot_supported", py_bf16_dot_supported, METH_NOARGS,
     "bf16_dot_supported() -> bool: the avx512 path can multiply bfloat16 pairs (AVX512_BF16)."},
    {"linear", py_linear, METH_VARARGS, linear_doc},
    SUPPORTED_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused", "Endor's fused CPU linear (see fused.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fused(void) {
#if ENDOR_X86
    build_tables();
#endif
#define FUSED_AVX2 (CPU_HAS("avx2") && CPU_HAS("fma") && CPU_HAS("popcnt"))
    SET_SUPPORTED_ISAS(FUSED_AVX2, FUSED_AVX2 && CPU_HAS("avx512f") && CPU_HAS("avx512bw") &&
                                       CPU_HAS("avx512vl") && CPU_HAS("avx512vbmi2"));
#if ENDOR_X86
    bf16_dot_cpu = (supported_isas >> ISA_AVX512 & 1) && CPU_HAS("avx512bf16");
#endif
    return PyModule_Create(&module);
}
