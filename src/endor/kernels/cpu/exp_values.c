/* The `exp` codec's per-tile value decoders (docs/FORMAT.md 1.1), #included by decode.c (one
 * translation unit, so each ISA's tile loop inlines its decoder; the Makefile rebuilds on *.c).
 *
 * A decoder turns the values [begin, end) of tile k (end <= nnz) back into their 2- or 4-byte
 * bit patterns in `dst` (room for the tile's values plus one 64-value block), and checks the
 * codec's rules on the way: the tile's base, escapes used == the escape index's count, escaped
 * exponents inside the dtype. It reads only inside the parts: signmant[begin*n_bytes ..
 * end*n_bytes), the code groups holding values begin .. end-1, escapes[escidx[k] ..
 * escidx[k+1]) (the caller checked 0 <= escidx[k] <= escidx[k+1] <= n_escapes).
 * These functions are what a fused kernel calls to get a tile's values without the bitmap. */

typedef int (*values_fn)(const exp_t *x, int64_t nnz, int64_t k, int64_t begin, int64_t end,
                         int es, uint8_t *dst);

/* Bits [i, i+64) of code plane p (bits past the last group read as zero). */
static inline uint64_t plane_bits(const exp_t *x, int64_t nnz, int64_t i, int p) {
    const int64_t g = i >> 6;
    const int sh = (int)(i & 63);
    uint64_t w = load_u64(x->codes + ((size_t)g * x->planes + p) * 8) >> sh;
    if (sh && (g + 1) * 64 < nnz)
        w |= load_u64(x->codes + ((size_t)(g + 1) * x->planes + p) * 8) << (64 - sh);
    return w;
}

/* Any dtype, any CPU. */
static int exp_values_scalar(const exp_t *x, int64_t nnz, int64_t k, int64_t begin, int64_t end,
                             int es, uint8_t *dst) {
    const uint32_t base = x->bases[k];
    if ((int)base > x->max_base) return ERR_EXP_BASE;
    int64_t esc = x->escidx[k];
    const int64_t esc_end = x->escidx[k + 1];
    const int e_bits = x->e_bits, m_bits = x->m_bits, nb = x->n_bytes;
    for (int64_t i = begin; i < end; i += 64) {
        const int n = end - i < 64 ? (int)(end - i) : 64;
        uint64_t w[8];
        for (int p = 0; p < x->planes; p++) w[p] = plane_bits(x, nnz, i, p);
        for (int j = 0; j < n; j++) {
            uint32_t q = 0;
            for (int p = 0; p < x->planes; p++) q |= (uint32_t)((w[p] >> j) & 1) << p;
            const uint32_t code = q & 7;
            uint32_t e;
            if (code == 7) {
                if (esc >= esc_end) return ERR_EXP_ESCAPES;
                e = x->escapes[esc++];
                if (e >> e_bits) return ERR_EXP_ESCAPE_VALUE;
            } else {
                e = base + code;
            }
            const uint8_t *sm = x->signmant + (i + j) * nb;
            uint32_t r = sm[0];
            if (nb == 3) r |= (uint32_t)sm[1] << 8 | (uint32_t)sm[2] << 16;
            r |= (q >> 3) << (8 * nb);
            const uint32_t v = (r >> m_bits) << (e_bits + m_bits) | e << m_bits |
                               (r & ((1u << m_bits) - 1));
            if (es == 2) {
                const uint16_t h = (uint16_t)v;
                memcpy(dst + (i - begin + j) * 2, &h, 2);
            } else {
                memcpy(dst + (i - begin + j) * 4, &v, 4);
            }
        }
    }
    return esc == esc_end ? OK : ERR_EXP_ESCAPES;
}

#if ENDOR_X86

/* bfloat16, AVX2: 32 codes from three 32-bit plane words (byte j = 0xFF iff bit j), a pshufb
 * table lookup code -> exponent, escapes patched in one by one (they are rare). */
__attribute__((target("avx2"))) static inline __m256i bits_to_bytes_avx2(uint32_t m) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

__attribute__((target("avx2,popcnt"))) static int exp_values_bf16_avx2(
        const exp_t *x, int64_t nnz, int64_t k, int64_t begin, int64_t end, int es, uint8_t *dst) {
    (void)es;
    const int base = x->bases[k];
    if (base > x->max_base) return ERR_EXP_BASE;
    const uint8_t *esc = x->escapes + x->escidx[k];
    int64_t left = x->escidx[k + 1] - x->escidx[k];
    uint8_t table[16] = {0};
    for (int c = 0; c < 7; c++) table[c] = (uint8_t)(base + c);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i one = _mm256_set1_epi8(1), two = _mm256_set1_epi8(2), four = _mm256_set1_epi8(4);
    const __m256i m80 = _mm256_set1_epi16(0x80), m7f = _mm256_set1_epi16(0x7F);
    for (int64_t i = begin; i < end; i += 64) {
        const int n = end - i < 64 ? (int)(end - i) : 64;
        const uint64_t valid = n == 64 ? ~0ULL : ((1ULL << n) - 1);
        const uint64_t w0 = plane_bits(x, nnz, i, 0) & valid, w1 = plane_bits(x, nnz, i, 1) & valid,
                       w2 = plane_bits(x, nnz, i, 2) & valid;
        uint8_t sm_tail[64];
        const uint8_t *sm = x->signmant + i;
        if (n < 64) { /* never read past the tile's last value */
            memcpy(sm_tail, sm, (size_t)n);
            sm = sm_tail;
        }
        for (int h = 0; h < n; h += 32) {
            const uint32_t b0 = (uint32_t)(w0 >> h), b1 = (uint32_t)(w1 >> h), b2 = (uint32_t)(w2 >> h);
            __m256i codes = _mm256_or_si256(
                _mm256_or_si256(_mm256_and_si256(bits_to_bytes_avx2(b0), one),
                                _mm256_and_si256(bits_to_bytes_avx2(b1), two)),
                _mm256_and_si256(bits_to_bytes_avx2(b2), four));
            __m256i e = _mm256_shuffle_epi8(lut, codes);
            uint32_t escm = b0 & b1 & b2;
            if (escm) {
                const int c = _mm_popcnt_u32(escm);
                if (c > left) return ERR_EXP_ESCAPES;
                uint8_t tmp[32];
                _mm256_storeu_si256((__m256i *)tmp, e);
                for (; escm; escm &= escm - 1) tmp[__builtin_ctz(escm)] = *esc++;
                e = _mm256_loadu_si256((const __m256i *)tmp);
                left -= c;
            }
            const __m256i s = _mm256_loadu_si256((const __m256i *)(sm + h));
            for (int q = 0; q < 2; q++) {
                const __m256i s16 = _mm256_cvtepu8_epi16(q ? _mm256_extracti128_si256(s, 1)
                                                           : _mm256_castsi256_si128(s));
                const __m256i e16 = _mm256_cvtepu8_epi16(q ? _mm256_extracti128_si256(e, 1)
                                                           : _mm256_castsi256_si128(e));
                const __m256i v = _mm256_or_si256(
                    _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(s16, m80), 8),
                                    _mm256_slli_epi16(e16, 7)),
                    _mm256_and_si256(s16, m7f));
                _mm256_storeu_si256((__m256i *)(dst + (i - begin + h) * 2 + 32 * q), v);
            }
        }
    }
    return left == 0 ? OK : ERR_EXP_ESCAPES;
}

/* bfloat16, AVX-512: 64 codes from three mask registers, vpshufb lookup, escapes with one
 * vpexpandb (VBMI2) from the tile's escape run, masked signmant load for the last block. */
__attribute__((target(AVX512_TARGET))) static int exp_values_bf16_avx512(
        const exp_t *x, int64_t nnz, int64_t k, int64_t begin, int64_t end, int es, uint8_t *dst) {
    (void)es;
    const int base = x->bases[k];
    if (base > x->max_base) return ERR_EXP_BASE;
    const uint8_t *esc = x->escapes + x->escidx[k];
    int64_t left = x->escidx[k + 1] - x->escidx[k];
    uint8_t table[16] = {0};
    for (int c = 0; c < 7; c++) table[c] = (uint8_t)(base + c);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table));
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2), four = _mm512_set1_epi8(4);
    const __m512i m80 = _mm512_set1_epi16(0x80), m7f = _mm512_set1_epi16(0x7F);
    for (int64_t i = begin; i < end; i += 64) {
        const int n = end - i < 64 ? (int)(end - i) : 64;
        const __mmask64 valid = n == 64 ? ~0ULL : ((1ULL << n) - 1);
        const uint64_t w0 = plane_bits(x, nnz, i, 0) & valid, w1 = plane_bits(x, nnz, i, 1) & valid,
                       w2 = plane_bits(x, nnz, i, 2) & valid;
        const __m512i codes = _mm512_or_si512(
            _mm512_or_si512(_mm512_maskz_mov_epi8(w0, one), _mm512_maskz_mov_epi8(w1, two)),
            _mm512_maskz_mov_epi8(w2, four));
        __m512i e = _mm512_shuffle_epi8(lut, codes);
        const uint64_t escm = w0 & w1 & w2;
        if (escm) {
            const int c = (int)_mm_popcnt_u64(escm);
            if (c > left) return ERR_EXP_ESCAPES;
            e = _mm512_mask_expandloadu_epi8(e, escm, esc);
            esc += c;
            left -= c;
        }
        const __m512i s = _mm512_maskz_loadu_epi8(valid, x->signmant + i);
        for (int q = 0; q < 2; q++) {
            const __m512i s16 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(s, q));
            const __m512i e16 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(e, q));
            const __m512i v = _mm512_or_si512(
                _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(s16, m80), 8),
                                _mm512_slli_epi16(e16, 7)),
                _mm512_and_si512(s16, m7f));
            _mm512_storeu_si512((void *)(dst + (i - begin) * 2 + 64 * q), v);
        }
    }
    return left == 0 ? OK : ERR_EXP_ESCAPES;
}

/* float16, AVX-512: as bfloat16 with three more planes, the extra bits x (mantissa bits 8-9 and
 * the sign): value = (x & 4) << 13 | e << 10 | (x & 3) << 8 | signmant byte. Escaped exponents
 * are checked < 32 (rule E5) sixty-four at a time. */
__attribute__((target(AVX512_TARGET))) static int exp_values_f16_avx512(
        const exp_t *x, int64_t nnz, int64_t k, int64_t begin, int64_t end, int es, uint8_t *dst) {
    (void)es;
    const int base = x->bases[k];
    if (base > x->max_base) return ERR_EXP_BASE;
    const uint8_t *esc = x->escapes + x->escidx[k];
    int64_t left = x->escidx[k + 1] - x->escidx[k];
    uint8_t table[16] = {0};
    for (int c = 0; c < 7; c++) table[c] = (uint8_t)(base + c);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table));
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2), four = _mm512_set1_epi8(4);
    const __m512i limit = _mm512_set1_epi8(32);
    const __m512i m3 = _mm512_set1_epi16(3), m4 = _mm512_set1_epi16(4);
    for (int64_t i = begin; i < end; i += 64) {
        const int n = end - i < 64 ? (int)(end - i) : 64;
        const __mmask64 valid = n == 64 ? ~0ULL : ((1ULL << n) - 1);
        uint64_t w[6];
        for (int p = 0; p < 6; p++) w[p] = plane_bits(x, nnz, i, p) & valid;
        const __m512i codes = _mm512_or_si512(
            _mm512_or_si512(_mm512_maskz_mov_epi8(w[0], one), _mm512_maskz_mov_epi8(w[1], two)),
            _mm512_maskz_mov_epi8(w[2], four));
        const __m512i extra = _mm512_or_si512(
            _mm512_or_si512(_mm512_maskz_mov_epi8(w[3], one), _mm512_maskz_mov_epi8(w[4], two)),
            _mm512_maskz_mov_epi8(w[5], four));
        __m512i e = _mm512_shuffle_epi8(lut, codes);
        const uint64_t escm = w[0] & w[1] & w[2];
        if (escm) {
            const int c = (int)_mm_popcnt_u64(escm);
            if (c > left) return ERR_EXP_ESCAPES;
            e = _mm512_mask_expandloadu_epi8(e, escm, esc);
            if (_mm512_mask_cmpge_epu8_mask(escm, e, limit)) return ERR_EXP_ESCAPE_VALUE;
            esc += c;
            left -= c;
        }
        const __m512i s = _mm512_maskz_loadu_epi8(valid, x->signmant + i);
        for (int q = 0; q < 2; q++) {
            const __m512i s16 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(s, q));
            const __m512i e16 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(e, q));
            const __m512i x16 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(extra, q));
            const __m512i v = _mm512_or_si512(
                _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(x16, m4), 13),
                                _mm512_slli_epi16(e16, 10)),
                _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(x16, m3), 8), s16));
            _mm512_storeu_si512((void *)(dst + (i - begin) * 2 + 64 * q), v);
        }
    }
    return left == 0 ? OK : ERR_EXP_ESCAPES;
}

#endif /* ENDOR_X86 */

static values_fn choose_values(int isa, const exp_t *x) {
    if (x->e_bits == 8 && x->m_bits == 7) { /* bfloat16 */
#if ENDOR_X86
        if (isa == ISA_AVX512) return exp_values_bf16_avx512;
        if (isa == ISA_AVX2) return exp_values_bf16_avx2;
#endif
    }
#if ENDOR_X86
    if (x->e_bits == 5 && x->m_bits == 10 && x->planes == 6 && isa == ISA_AVX512)
        return exp_values_f16_avx512;
#endif
    (void)isa;
    return exp_values_scalar;
}
