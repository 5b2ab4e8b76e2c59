/* nibble-v3 (decode): a 4-bit code per value through the matrix's 16-byte codebook, 16 values per table shuffle.
 * The byte format is documented in sparsezip/codec/nibble_v3.py, whose numpy code is the source of truth; the
 * tests check this file against it.
 */

#include "codec.h"

#define BOOK_SIZE 16
#define ESCAPE 15      /* the code of a value whose symbol follows in the escape bytes */
#define UNUSED 0xFF    /* codebook byte of a code no value uses (and of the escape code) */
#define V3_HEADER 6    /* mode, reserved, n_exceptions, n_escapes */

int codec_v3_prepare(DecCtx *c) {
    const uint8_t *book = c->payload;
    for (int code = 0; code < ESCAPE; code++)
        if (book[code] > 127 && book[code] != UNUSED) {
            PyErr_Format(PyExc_ValueError, "nibble-v3 codebook is corrupted: code %d has symbol %d (symbols are "
                         "0..127)", code, book[code]);
            return -1;
        }
    if (book[ESCAPE] != UNUSED) {
        PyErr_Format(PyExc_ValueError, "nibble-v3 codebook is corrupted: the escape code's byte is %d, not 255",
                     book[ESCAPE]);
        return -1;
    }
    memcpy(c->book, book, BOOK_SIZE);
    return 0;
}

/* The symbol of value i (code `code`), escapes taken in order; -1 for a code the codebook does not hold or an
 * escape past the tile's count or out of range. */
static inline int symbol_of(const uint8_t *book, int code, const uint8_t *esc, int n_esc, int *e) {
    if (code != ESCAPE) return book[code] == UNUSED ? -1 : book[code];
    if (*e >= n_esc || esc[*e] > 127) return -1;
    return esc[(*e)++];
}

/* vals[i] = sign << 15 | symbol << 8 for values [from, nnz), one by one. */
static int symbols_scalar(const uint8_t *book, const uint8_t *codes, const uint8_t *signs, int from, int nnz,
                          const uint8_t *esc, int n_esc, int *e, uint16_t *vals) {
    for (int i = from; i < nnz; i++) {
        int sym = symbol_of(book, codes[i >> 1] >> ((i & 1) * 4) & 15, esc, n_esc, e);
        if (sym < 0) return -1;
        vals[i] = (uint16_t)((signs[i >> 3] >> (i & 7) & 1) << 15 | sym << 8);
    }
    return 0;
}

#ifdef SPZ_X86
/* 32 values per step, all in registers: 16 code bytes widen to u16 lanes that hold their two codes in value order,
 * one pshufb through the codebook gives the symbols, and the 4 sign bytes become bit 7 of each symbol byte (the
 * sign of the fp16 pattern sym << 8). A lane that comes out as UNUSED (an escape, or an invalid code) is then
 * redone by the one-by-one path, alone: redoing its whole step cost a fifth of this function's time on the 1.5B
 * model, where 1.4% of the steps hold an escape. */
__attribute__((target("avx2"))) static int symbols_avx2(const uint8_t *book, const uint8_t *codes,
                                                         const uint8_t *signs, int nnz, const uint8_t *esc, int n_esc,
                                                         int *e, uint16_t *vals) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)book));
    const __m256i nibbles = _mm256_set1_epi16(0x0F0F), unused = _mm256_set1_epi8((char)UNUSED);
    const __m256i sign_byte = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, /* byte j/8 of 4 */
                                               2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL), top = _mm256_set1_epi8((char)0x80);
    const __m256i zero = _mm256_setzero_si256();
    /* Pointers that step with i: indexing by i / 2 and i / 8 cost a signed division's fix-ups per step. */
    const uint8_t *code_at = codes, *sign_at = signs;
    uint16_t *out = vals;
    int i = 0;
    for (; i + 32 <= nnz; i += 32, code_at += 16, sign_at += 4, out += 32) {
        const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)code_at));
        /* u16 lane j = code byte b: its low byte takes b & 15 (value 2j), its high byte b >> 4 (value 2j + 1) */
        const __m256i code = _mm256_and_si256(_mm256_or_si256(wide, _mm256_slli_epi16(wide, 4)), nibbles);
        const __m256i sym = _mm256_shuffle_epi8(table, code);
        /* bit j = value i + j: byte j of sym holds value j's symbol */
        uint32_t odd = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(sym, unused));
        uint32_t sign_bits;
        memcpy(&sign_bits, sign_at, 4);
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)sign_bits), sign_byte);
        const __m256i negative = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), top);
        const __m256i high = _mm256_or_si256(sym, negative); /* lane 0: values 0-15, lane 1: values 16-31 */
        const __m256i first = _mm256_unpacklo_epi8(zero, high), second = _mm256_unpackhi_epi8(zero, high);
        _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(first, second, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(first, second, 0x31));
        for (; odd; odd &= odd - 1) { /* in value order, so that escapes are taken in order */
            const int at = i + __builtin_ctz(odd);
            if (symbols_scalar(book, codes, signs, at, at + 1, esc, n_esc, e, vals)) return -1;
        }
    }
    return symbols_scalar(book, codes, signs, i, nnz, esc, n_esc, e, vals);
}

/* The AVX-512 level takes 64 values per step, with byte-wide mask registers: AVX-512BW, which features.c requires
 * of that level. */
#define AVX512BW_FN __attribute__((target(SPZ_TARGET_AVX512 ",avx512bw")))
#define AVX512BW_INLINE __attribute__((target(SPZ_TARGET_AVX512 ",avx512bw"), always_inline)) static inline

/* The symbol bytes of 64 values from their 32 code bytes, as AVX2's step makes them; the sign bits, one mask
 * register, add bit 7 to the negative values' bytes (a symbol is below 128: adding is or-ing). *redo = the lanes
 * that came out as UNUSED. */
AVX512BW_INLINE __m512i symbol_bytes_avx512(__m512i table, __m256i code_bytes, uint64_t sign_bits, uint64_t *redo) {
    const __m512i wide = _mm512_cvtepu8_epi16(code_bytes);
    const __m512i code = _mm512_and_si512(_mm512_or_si512(wide, _mm512_slli_epi16(wide, 4)),
                                          _mm512_set1_epi16(0x0F0F));
    const __m512i sym = _mm512_shuffle_epi8(table, code);
    *redo = _mm512_cmpeq_epi8_mask(sym, _mm512_set1_epi8((char)UNUSED));
    return _mm512_mask_add_epi8(sym, _cvtu64_mask64(sign_bits), sym, _mm512_set1_epi8((char)0x80));
}

/* out[j] = bytes[j] << 8 for the lanes j set in `lanes`. Interleaving with zeros works within 128-bit lanes (the
 * low half of lane L holds values 16L..16L+7, the high half the next 8); two permutes put them in order. */
AVX512BW_INLINE void store_high_bytes_avx512(__m512i bytes, uint64_t lanes, uint16_t *out) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i low = _mm512_unpacklo_epi8(zero, bytes), high = _mm512_unpackhi_epi8(zero, bytes);
    const __m512i first = _mm512_permutex2var_epi64(low, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), high);
    const __m512i second = _mm512_permutex2var_epi64(low, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), high);
    if (lanes == ~0ULL) {
        _mm512_storeu_si512(out, first);
        _mm512_storeu_si512(out + 32, second);
    } else {
        _mm512_mask_storeu_epi16(out, (__mmask32)lanes, first);
        _mm512_mask_storeu_epi16(out + 32, (__mmask32)(lanes >> 32), second);
    }
}

/* As symbols_avx2, 64 values per step; the last step loads and stores under masks, so nothing is read past the
 * codes and signs nor written past vals[nnz - 1]. */
AVX512BW_FN static int symbols_avx512(const uint8_t *book, const uint8_t *codes, const uint8_t *signs, int nnz,
                                      const uint8_t *esc, int n_esc, int *e, uint16_t *vals) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)book));
    const uint8_t *code_at = codes, *sign_at = signs;
    for (int i = 0; i < nnz; i += 64, code_at += 32, sign_at += 8) {
        const int left = nnz - i;
        uint64_t sign_bits = 0, lanes = ~0ULL, redo;
        __m256i code_bytes;
        if (left >= 64) {
            memcpy(&sign_bits, sign_at, 8);
            code_bytes = _mm256_loadu_si256((const __m256i *)code_at);
        } else {
            lanes = (1ULL << left) - 1;
            memcpy(&sign_bits, sign_at, (size_t)(left + 7) / 8);
            code_bytes = _mm256_maskz_loadu_epi8((__mmask32)((1ULL << ((left + 1) / 2)) - 1), code_at);
        }
        store_high_bytes_avx512(symbol_bytes_avx512(table, code_bytes, sign_bits, &redo), lanes, vals + i);
        for (redo &= lanes; redo; redo &= redo - 1) { /* in value order, so that escapes are taken in order */
            const int at = i + __builtin_ctzll(redo);
            if (symbols_scalar(book, codes, signs, at, at + 1, esc, n_esc, e, vals)) return -1;
        }
    }
    return 0;
}
#endif

int codec_v3_decode_one(void *ctx, int64_t t, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    int64_t start = c->offsets[t], size = tile_end(c, t) - start;
    if (size < V3_HEADER + g.bitmap)
        return codec_tile_error(&c->err, t,
                                "index offsets do not match the stream: tile %lld spans %lld bytes, less than its "
                                "%d-byte header and %d-byte bitmap",
                                (long long)t, (long long)size, V3_HEADER, g.bitmap);
    const uint8_t *p = c->payload + start, *bm = p + V3_HEADER;
    const int mode = p[0], reserved = p[1], nexc = rd16(p + 2), n_esc = rd16(p + 4);
    int gcnt[GROUPS], row_cnt[TILE];
    const int nnz = codec_scan_bitmap(c, t, &g, bm, row_cnt, gcnt);
    if (nnz < 0) return -1;
    if (mode > 1 || reserved || (mode == 0 && nexc) || nexc > nnz || n_esc > nnz)
        return codec_tile_error(&c->err, t,
                                "nibble-v3 stream is corrupted: tile %lld has an invalid header (mode %d, reserved %d, "
                                "%d exceptions and %d escapes for %d values)",
                                (long long)t, mode, reserved, nexc, n_esc, nnz);
    const int sign_bytes = (nnz + 7) / 8, code_bytes = (nnz + 1) / 2;
    const int64_t expect = V3_HEADER + g.bitmap + sign_bytes + code_bytes + n_esc + (mode ? 3 * (int64_t)nexc : nnz);
    if (expect != size)
        return codec_tile_error(&c->err, t,
                                "index offsets do not match the stream: tile %lld spans %lld bytes but its fields "
                                "imply %lld", (long long)t, (long long)size, (long long)expect);
    const uint8_t *signs = bm + g.bitmap, *codes = signs + sign_bytes, *esc = codes + code_bytes,
                  *lows = esc + n_esc;
    if ((nnz & 1) && codes[nnz >> 1] >> 4)
        return codec_tile_error(&c->err, t, "nibble-v3 stream is corrupted: nonzero padding nibble after the codes of "
                                "tile %lld", (long long)t);
    if (codec_check_signs(c, t, "nibble-v3", nnz, signs)) return -1;
    uint16_t *vals = (uint16_t *)scratch;
    int e = 0, failed;
#ifdef SPZ_X86
    if (c->wide) failed = symbols_avx512(c->book, codes, signs, nnz, esc, n_esc, &e, vals);
    else if (c->simd) failed = symbols_avx2(c->book, codes, signs, nnz, esc, n_esc, &e, vals);
    else
#endif
        failed = symbols_scalar(c->book, codes, signs, 0, nnz, esc, n_esc, &e, vals);
    if (failed || e != n_esc)
        return codec_tile_error(&c->err, t,
                                "nibble-v3 stream is corrupted: tile %lld holds a code the codebook lacks, an escape "
                                "byte that is no symbol, or an escape count that disagrees with its codes",
                                (long long)t);
    if (codec_apply_lows(c, t, "nibble-v3", vals, nnz, mode, nexc, lows)) return -1;
    codec_finish_tile(c, t, &g, bm, row_cnt, vals);
    return 0;
}

/* ------------------------------------------------------------------ encode */

typedef struct {
    const uint16_t *bits;
    int64_t n, k;
    const uint8_t *book;
    uint8_t code_of[128]; /* symbol -> code (ESCAPE when the codebook lacks it) */
    CompactFn compact;
    EncodeOut out;
} Encoder;

/* The tile's present values (row-major) into vals and its bitmap into bm (scratch when NULL); returns nnz. */
static int gather(const Encoder *c, const Geom *g, uint16_t *vals, uint8_t *bm) {
    uint8_t row[TILE / 8];
    int nnz = 0;
    for (int r = 0; r < g->rows; r++)
        nnz += c->compact(c->bits + (g->r0 + r) * c->k + g->c0, g->cols, vals + nnz, bm ? bm + r * g->row_bytes : row);
    return nnz;
}

static void count(const Encoder *c, const uint16_t *vals, int nnz, int *n_esc, int *n_exc) {
    *n_esc = *n_exc = 0;
    for (int i = 0; i < nnz; i++) {
        *n_esc += c->code_of[vals[i] >> 8 & 0x7F] == ESCAPE;
        *n_exc += (vals[i] & 0xFF) != 0;
    }
}

static int size_tile(void *ctx, int64_t t, void *scratch) {
    Encoder *c = (Encoder *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    uint16_t *vals = (uint16_t *)scratch;
    int nnz = gather(c, &g, vals, NULL), n_esc, n_exc;
    count(c, vals, nnz, &n_esc, &n_exc);
    int lows = 3 * n_exc < nnz ? 3 * n_exc : nnz;
    c->out.sizes[t] = V3_HEADER + g.bitmap + (nnz + 7) / 8 + (nnz + 1) / 2 + n_esc + lows;
    return 0;
}

static int write_tile(void *ctx, int64_t t, void *scratch) {
    Encoder *c = (Encoder *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    uint16_t *vals = (uint16_t *)scratch;
    uint8_t *o = c->out.dst + c->out.offsets[t];
    int nnz = gather(c, &g, vals, o + V3_HEADER), n_esc, n_exc;
    count(c, vals, nnz, &n_esc, &n_exc);
    const int e5m2 = 3 * n_exc < nnz;
    uint8_t *signs = o + V3_HEADER + g.bitmap, *codes = signs + (nnz + 7) / 8, *esc = codes + (nnz + 1) / 2;
    uint8_t *lows = esc + n_esc;
    memset(signs, 0, (size_t)((nnz + 7) / 8 + (nnz + 1) / 2));
    for (int i = 0, e = 0, x = 0; i < nnz; i++) {
        const unsigned sym = vals[i] >> 8 & 0x7F, code = c->code_of[sym], low = vals[i] & 0xFF;
        signs[i >> 3] |= (uint8_t)((vals[i] >> 15) << (i & 7));
        codes[i >> 1] |= (uint8_t)(code << ((i & 1) * 4));
        if (code == ESCAPE) esc[e++] = (uint8_t)sym;
        if (!e5m2) {
            lows[i] = (uint8_t)low;
        } else if (low) { /* positions (u16) of the nonzero low bytes, then those bytes */
            wr16(lows + 2 * x, (unsigned)i);
            lows[2 * n_exc + x++] = (uint8_t)low;
        }
    }
    o[0] = (uint8_t)e5m2;
    o[1] = 0;
    wr16(o + 2, e5m2 ? (unsigned)n_exc : 0);
    wr16(o + 4, (unsigned)n_esc);
    return 0;
}

/* v3_encode(bits, n, k, book, prefix, threads) -> (bytearray: prefix zero bytes + payload, offsets bytes) */
PyObject *spz_py_v3_encode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer bits, book;
    long long n, k;
    Py_ssize_t prefix;
    int threads;
    if (!PyArg_ParseTuple(args, "y*LLy*ni", &bits, &n, &k, &book, &prefix, &threads)) return NULL;
    PyObject *result = NULL;
    if (codec_check_shape(n, k)) goto done;
    if (bits.len != n * k * 2 || book.len != BOOK_SIZE || prefix < 0) {
        PyErr_SetString(PyExc_ValueError, "v3_encode: bad buffer sizes");
        goto done;
    }
    Encoder enc = {.bits = bits.buf, .n = n, .k = k, .book = book.buf, .compact = codec_compact_fn()};
    memset(enc.code_of, ESCAPE, sizeof enc.code_of);
    for (int code = 0; code < ESCAPE; code++)
        if (enc.book[code] < 128) enc.code_of[enc.book[code]] = (uint8_t)code;
    result = codec_encode_tiles(size_tile, write_tile, &enc, &enc.out, enc.book, BOOK_SIZE, n, k, prefix, threads);
done:
    PyBuffer_Release(&bits);
    PyBuffer_Release(&book);
    return result;
}
