/* The fast CPU decoder of the Endor format (docs/FORMAT.md, section 1).
 *
 * One entry point, `decode`, takes raw addresses (tensor.data_ptr()) so that it needs neither
 * numpy nor torch headers. It splits the tiles into contiguous ranges, one per thread (pthreads,
 * GIL released), and each thread checks then decodes its tiles one by one:
 *   - tile index (rule 5): 0 <= tiles[k] <= tiles[k+1] <= nnz, at most the tile length apart;
 *   - popcount of the tile's bitmap == tiles[k+1] - tiles[k] (rule 6),
 * so no tile ever reads values outside values[tiles[k] .. tiles[k+1]) plus a bounded over-read that
 * is proven to stay inside the buffer (or the tile is first copied into a padded scratch buffer).
 *
 * Three instruction-set paths, chosen at run time (the caller picks one; `supported()` says which
 * this CPU runs):
 *   scalar  portable C, any CPU;
 *   avx2    16-bit: pshufb with a 256-entry shuffle table per bitmap byte;
 *           32-bit: vpermd with a 256-entry index table per bitmap byte;
 *   avx512  vpexpandw (AVX512_VBMI2) / vpexpandd (AVX512F) expand packed values under the bitmap.
 * Elements are moved as 2- or 4-byte bit patterns; the decoder never looks at float values.
 */
#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

/* The SIMD loops load whole vectors from the values stream: at most this many bytes past the
 * tile's last value. Tiles closer than that to the end of `values` decode from a padded copy. */
#define OVERREAD 64

enum { OK = 0, ERR_TILE_INDEX = 1, ERR_POPCOUNT = 2, ERR_PADDING = 3, ERR_ARGUMENT = 4,
       ERR_EXP_BASE = 5, ERR_EXP_ESCIDX = 6, ERR_EXP_ESCAPES = 7, ERR_EXP_ESCAPE_VALUE = 8 };

/* The `exp` value codec's parts; a NULL signmant means the raw codec. */
#include "exp_parts.h"

typedef void (*span_fn)(const uint8_t *bits, const uint8_t *src, uint8_t *dst, int64_t n);

typedef struct {
    const uint8_t *bitmap;
    const uint8_t *values;
    const int64_t *tiles;
    uint8_t *out;
    int64_t numel, nnz, ntiles;
    int elem_size;
    int isa;
    const exp_t *exp; /* NULL: raw values */
} job_t;

typedef struct {
    const job_t *job;
    int64_t first, last; /* tiles [first, last) */
    int err;
    int64_t bad_tile;
} part_t;

static inline uint64_t load_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Exact tail: reads a value only where the bit is set, writes exactly n elements. */
static inline void span_tail(const uint8_t *bits, const uint8_t *src, uint8_t *dst, int64_t n,
                             int es) {
    for (int64_t i = 0; i < n; i++) {
        if ((bits[i >> 3] >> (i & 7)) & 1) {
            memcpy(dst + i * es, src, es);
            src += es;
        } else {
            memset(dst + i * es, 0, es);
        }
    }
}

/* Bits set in the first n bits of `bits`. Inlined into each ISA's worker, so it compiles to
 * popcnt where the worker's target allows it. */
static inline __attribute__((always_inline)) int64_t count_bits(const uint8_t *bits, int64_t n) {
    int64_t count = 0, i = 0;
    for (; i + 64 <= n; i += 64) count += __builtin_popcountll(load_u64(bits + i / 8));
    for (; i + 8 <= n; i += 8) count += __builtin_popcount(bits[i / 8]);
    if (i < n) count += __builtin_popcount(bits[i / 8] & ((1u << (n - i)) - 1));
    return count;
}

/* ---------------------------------------------------------------- scalar (any CPU) */

#define SCALAR_SPAN(NAME, T)                                                                     \
    static void NAME(const uint8_t *bits, const uint8_t *src, uint8_t *dst, int64_t n) {         \
        int64_t i = 0;                                                                           \
        for (; i + 64 <= n; i += 64) {                                                           \
            uint64_t w = load_u64(bits + i / 8);                                                 \
            uint8_t *d = dst + i * sizeof(T);                                                    \
            /* Branchless: reads one value past the tile at most (within OVERREAD). */           \
            for (int j = 0; j < 64; j++) {                                                       \
                T v;                                                                             \
                memcpy(&v, src, sizeof(T));                                                      \
                T bit = (T)((w >> j) & 1);                                                       \
                v &= (T)-bit;                                                                    \
                memcpy(d + j * sizeof(T), &v, sizeof(T));                                        \
                src += bit * sizeof(T);                                                          \
            }                                                                                    \
        }                                                                                        \
        span_tail(bits + i / 8, src, dst + i * sizeof(T), n - i, sizeof(T));                     \
    }
SCALAR_SPAN(span16_scalar, uint16_t)
SCALAR_SPAN(span32_scalar, uint32_t)

/* ---------------------------------------------------------------- tables for AVX2 */

static uint8_t shuffle16[256][16]; /* pshufb control: 8 packed 16-bit values -> their bit slots */
static uint8_t index32[256][8];    /* vpermd indices: 8 packed 32-bit values -> their bit slots */
static uint8_t popcount8[256];

static void build_tables(void) {
    for (int b = 0; b < 256; b++) {
        int k = 0;
        for (int j = 0; j < 8; j++) {
            if ((b >> j) & 1) {
                shuffle16[b][2 * j] = (uint8_t)(2 * k);
                shuffle16[b][2 * j + 1] = (uint8_t)(2 * k + 1);
                index32[b][j] = (uint8_t)k;
                k++;
            } else {
                shuffle16[b][2 * j] = shuffle16[b][2 * j + 1] = 0x80; /* pshufb writes zero */
                index32[b][j] = 0;                                  /* masked to zero later */
            }
        }
        popcount8[b] = (uint8_t)k;
    }
}

#if ENDOR_X86

/* ---------------------------------------------------------------- AVX2 */

__attribute__((target("avx2"))) static void span16_avx2(const uint8_t *bits, const uint8_t *src,
                                                       uint8_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w = load_u64(bits + i / 8);
        uint8_t *d = dst + 2 * i;
        for (int j = 0; j < 8; j++, w >>= 8) {
            unsigned b = (unsigned)(w & 0xff);
            __m128i v = _mm_loadu_si128((const __m128i *)src);
            __m128i control = _mm_loadu_si128((const __m128i *)shuffle16[b]);
            _mm_storeu_si128((__m128i *)(d + 16 * j), _mm_shuffle_epi8(v, control));
            src += 2 * popcount8[b];
        }
    }
    span_tail(bits + i / 8, src, dst + 2 * i, n - i, 2);
}

__attribute__((target("avx2"))) static void span32_avx2(const uint8_t *bits, const uint8_t *src,
                                                       uint8_t *dst, int64_t n) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w = load_u64(bits + i / 8);
        uint8_t *d = dst + 4 * i;
        for (int j = 0; j < 8; j++, w >>= 8) {
            unsigned b = (unsigned)(w & 0xff);
            __m256i v = _mm256_loadu_si256((const __m256i *)src);
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)index32[b]));
            __m256i sel = _mm256_and_si256(_mm256_set1_epi32((int)b), lane_bit);
            __m256i keep = _mm256_cmpeq_epi32(sel, lane_bit);
            __m256i r = _mm256_and_si256(_mm256_permutevar8x32_epi32(v, idx), keep);
            _mm256_storeu_si256((__m256i *)(d + 32 * j), r);
            src += 4 * popcount8[b];
        }
    }
    span_tail(bits + i / 8, src, dst + 4 * i, n - i, 4);
}

/* ---------------------------------------------------------------- AVX-512 */

#define AVX512_TARGET "avx512f,avx512bw,avx512vbmi2,popcnt"

__attribute__((target(AVX512_TARGET))) static void span16_avx512(const uint8_t *bits,
                                                                const uint8_t *src, uint8_t *dst,
                                                                int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w = load_u64(bits + i / 8);
        uint32_t lo = (uint32_t)w, hi = (uint32_t)(w >> 32);
        const uint8_t *src_hi = src + 2 * _mm_popcnt_u32(lo);
        __m512i a = _mm512_loadu_si512((const void *)src);
        __m512i b = _mm512_loadu_si512((const void *)src_hi);
        _mm512_storeu_si512((void *)(dst + 2 * i), _mm512_maskz_expand_epi16(lo, a));
        _mm512_storeu_si512((void *)(dst + 2 * i + 64), _mm512_maskz_expand_epi16(hi, b));
        src = src_hi + 2 * _mm_popcnt_u32(hi);
    }
    span_tail(bits + i / 8, src, dst + 2 * i, n - i, 2);
}

__attribute__((target(AVX512_TARGET))) static void span32_avx512(const uint8_t *bits,
                                                                const uint8_t *src, uint8_t *dst,
                                                                int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w = load_u64(bits + i / 8);
        uint8_t *d = dst + 4 * i;
        for (int j = 0; j < 4; j++, w >>= 16) {
            __mmask16 m = (__mmask16)(w & 0xffff);
            __m512i v = _mm512_loadu_si512((const void *)src);
            _mm512_storeu_si512((void *)(d + 64 * j), _mm512_maskz_expand_epi32(m, v));
            src += 4 * _mm_popcnt_u32((unsigned)m);
        }
    }
    span_tail(bits + i / 8, src, dst + 4 * i, n - i, 4);
}

#endif /* ENDOR_X86 */

/* ---------------------------------------------------------------- the exp codec's values */

#include "exp_values.c"

/* ---------------------------------------------------------------- the tile loop */

/* Checks and decodes tiles [first, last). Always inlined into one worker per ISA, so that its
 * popcounts use that ISA's instructions. Returns an ERR_* code and sets *bad_tile. */
static inline __attribute__((always_inline)) int decode_tiles(const job_t *job, int64_t first,
                                                              int64_t last, span_fn span,
                                                              values_fn values,
                                                              int64_t *bad_tile) {
    const int es = job->elem_size;
    const exp_t *x = job->exp;
    /* Scratch for tiles whose vector loads would run past the end of `values`, and for a
     * tile's decoded values (exp codec: one 64-value block of slack for the vector stores). */
    uint8_t padded[TILE * 4 + 128 + OVERREAD] __attribute__((aligned(64)));
    for (int64_t k = first; k < last; k++) {
        const int64_t begin = job->tiles[k], end = job->tiles[k + 1];
        const int64_t start = k * TILE;
        const int64_t len = job->numel - start < TILE ? job->numel - start : TILE;
        if (begin < 0 || end < begin || end > job->nnz || end - begin > len) {
            *bad_tile = k;
            return ERR_TILE_INDEX;
        }
        const uint8_t *bits = job->bitmap + start / 8;
        if (count_bits(bits, len) != end - begin) {
            *bad_tile = k;
            return ERR_POPCOUNT;
        }
        if (x) {
            const int64_t e0 = x->escidx[k], e1 = x->escidx[k + 1];
            if (e0 < 0 || e1 < e0 || e1 > x->n_escapes || e1 - e0 > end - begin) {
                *bad_tile = k;
                return ERR_EXP_ESCIDX;
            }
            const int err = values(x, job->nnz, k, begin, end, es, padded);
            if (err != OK) {
                *bad_tile = k;
                return err;
            }
            memset(padded + (end - begin) * es, 0, OVERREAD);
            span(bits, padded, job->out + start * es, len);
            continue;
        }
        const uint8_t *src = job->values + begin * es;
        if ((end - job->nnz) * es + OVERREAD > 0) {
            size_t bytes = (size_t)(end - begin) * es;
            if (bytes) memcpy(padded, src, bytes);
            memset(padded + bytes, 0, OVERREAD);
            src = padded;
        }
        span(bits, src, job->out + start * es, len);
    }
    return OK;
}

static span_fn choose_span(int isa, int es) {
#if ENDOR_X86
    if (isa == ISA_AVX512) return es == 2 ? span16_avx512 : span32_avx512;
    if (isa == ISA_AVX2) return es == 2 ? span16_avx2 : span32_avx2;
#endif
    (void)isa;
    return es == 2 ? span16_scalar : span32_scalar;
}

static values_fn values_for(const job_t *job, int isa) {
    return job->exp ? choose_values(isa, job->exp) : NULL;
}

static void run_scalar(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last, choose_span(ISA_SCALAR, p->job->elem_size),
                          values_for(p->job, ISA_SCALAR), &p->bad_tile);
}
#if ENDOR_X86
__attribute__((target("avx2,popcnt"))) static void run_avx2(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last, choose_span(ISA_AVX2, p->job->elem_size),
                          values_for(p->job, ISA_AVX2), &p->bad_tile);
}
__attribute__((target(AVX512_TARGET))) static void run_avx512(part_t *p) {
    p->err = decode_tiles(p->job, p->first, p->last, choose_span(ISA_AVX512, p->job->elem_size),
                          values_for(p->job, ISA_AVX512), &p->bad_tile);
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

#define HUGE_PAGE ((size_t)2 << 20)

/* A freshly allocated output (what endor.decompress writes into) is untouched memory: with 4 KiB
 * pages, faulting it in costs more than decoding it. Asking for transparent huge pages on the
 * 2 MiB-aligned interior makes that 512 times fewer faults. Advisory: pages already present are
 * left as they are, and a kernel without THP ignores it. */
static void advise_huge_pages(uint8_t *out, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t begin = ((uintptr_t)out + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)out + bytes) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (end > begin) madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)out;
    (void)bytes;
#endif
}

/* Checks what one thread cannot (first and last entries, padding bits), then runs the parts. */
static int decode_job(const job_t *job, int threads, int huge_pages, int64_t *bad_tile) {
    *bad_tile = -1;
    if (job->tiles[0] != 0) { *bad_tile = 0; return ERR_TILE_INDEX; }
    if (job->tiles[job->ntiles] != job->nnz) { *bad_tile = job->ntiles - 1; return ERR_TILE_INDEX; }
    if (job->exp && (job->exp->escidx[0] != 0 ||
                     job->exp->escidx[job->ntiles] != job->exp->n_escapes)) {
        *bad_tile = 0;
        return ERR_EXP_ESCIDX;
    }
    if ((job->numel & 7) && (job->bitmap[job->numel / 8] >> (job->numel & 7))) {
        *bad_tile = job->ntiles - 1;
        return ERR_PADDING;
    }
    if (job->ntiles == 0) return OK;
    if (huge_pages) advise_huge_pages(job->out, (size_t)job->numel * job->elem_size);

    threads = clamp_threads(threads, job->ntiles);
    part_t parts[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        parts[t].job = job;
        parts[t].first = job->ntiles * t / threads;
        parts[t].last = job->ntiles * (t + 1) / threads;
        parts[t].err = OK;
        parts[t].bad_tile = -1;
    }
    run_parts(run_part, parts, sizeof parts[0], threads);
    for (int t = 0; t < threads; t++) { /* the first bad tile in tensor order */
        if (parts[t].err != OK) {
            *bad_tile = parts[t].bad_tile;
            return parts[t].err;
        }
    }
    return OK;
}

PyDoc_STRVAR(decode_doc,
"decompress(bitmap_addr, values_addr, nnz, tiles_addr, out_addr, numel, elem_size, isa, threads,\n"
"       huge_pages[, signmant, codes, bases, escidx, escapes, n_escapes, e_bits, m_bits,\n"
"       n_bytes, planes]) -> (error_code, bad_tile)\n\n"
"With the exp codec's part addresses (signmant != 0) the values come from them (values_addr\n"
"unused) and 5-8 are its errors: base too large, escape index invalid, escape codes disagree\n"
"with the escape index, escaped exponent too large for the dtype.\n"
"Decode one Endor tensor from raw addresses into a flat output of numel elements of elem_size\n"
"(2 or 4) bytes. The caller guarantees the buffer sizes: bitmap ceil(numel/8) bytes, values nnz\n"
"elements, tiles ceil(numel/4096)+1 int64, out numel elements. huge_pages: madvise the output\n"
"for transparent huge pages. Releases the GIL.\n"
"error_code: 0 ok, 1 tile index invalid, 2 popcount disagrees with the tile index,\n"
"3 bitmap padding bits set, 4 bad argument (element size, unsupported isa).");

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long bitmap, values, tiles, out;
    unsigned long long signmant = 0, codes = 0, bases = 0, escidx = 0, escapes = 0;
    long long nnz, numel, n_escapes = 0;
    int elem_size, isa, threads, huge_pages, e_bits = 0, m_bits = 0, n_bytes = 0, planes = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKLKKLiiip|KKKKKLiiii", &bitmap, &values, &nnz, &tiles, &out,
                          &numel, &elem_size, &isa, &threads, &huge_pages, &signmant, &codes,
                          &bases, &escidx, &escapes, &n_escapes, &e_bits, &m_bits, &n_bytes,
                          &planes))
        return NULL;
    exp_t exp = {
        .signmant = (const uint8_t *)(uintptr_t)signmant,
        .codes = (const uint8_t *)(uintptr_t)codes,
        .bases = (const uint8_t *)(uintptr_t)bases,
        .escidx = (const int64_t *)(uintptr_t)escidx,
        .escapes = (const uint8_t *)(uintptr_t)escapes,
        .n_escapes = n_escapes,
        .planes = planes, .e_bits = e_bits, .m_bits = m_bits, .n_bytes = n_bytes,
        .max_base = (1 << e_bits) - 7,
    };
    if (signmant && (planes < 3 || planes > 8 || e_bits < 1 || e_bits > 8 || m_bits < 1 ||
                     n_bytes < 1 || n_bytes > 3 || n_escapes < 0 || !codes || !bases || !escidx))
        return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
    if ((elem_size != 2 && elem_size != 4) || isa < 0 || isa > ISA_AVX512 ||
        !(supported_isas & (1 << isa)) || numel < 0 || nnz < 0 || nnz > numel)
        return Py_BuildValue("iL", ERR_ARGUMENT, -1LL);
    job_t job = {
        .bitmap = (const uint8_t *)(uintptr_t)bitmap,
        .values = (const uint8_t *)(uintptr_t)values,
        .tiles = (const int64_t *)(uintptr_t)tiles,
        .out = (uint8_t *)(uintptr_t)out,
        .numel = numel,
        .nnz = nnz,
        .ntiles = (numel + TILE - 1) / TILE,
        .elem_size = elem_size,
        .isa = isa,
        .exp = signmant ? &exp : NULL,
    };
    int err;
    int64_t bad_tile;
    Py_BEGIN_ALLOW_THREADS
    err = decode_job(&job, threads, huge_pages, &bad_tile);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)bad_tile);
}

static PyMethodDef methods[] = {
    {"decompress", py_decode, METH_VARARGS, decode_doc},
    SUPPORTED_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_decompress", "Endor's CPU decompressor (see decompress.c).", -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__decompress(void) {
    build_tables();
    SET_SUPPORTED_ISAS(CPU_HAS("avx2") && CPU_HAS("popcnt"),
                       CPU_HAS("avx512f") && CPU_HAS("avx512bw") && CPU_HAS("avx512vbmi2") &&
                           CPU_HAS("popcnt"));
    return PyModule_Create(&module);
}
