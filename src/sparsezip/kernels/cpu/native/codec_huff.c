/* huff-v2 (encode and decode) and bitmap-v1 (decode). The byte formats are documented in
 * sparsezip/codec/huff_v2.py and bitmap_v1.py, whose numpy code is the source of truth; the tests check this file
 * against it byte for byte.
 */
#include <stdlib.h>

#include "codec.h"

/* A huff-v2 tile's header: mode, reserved, n_exceptions and one substream length per group of 8 rows. */
static int v2_header(const Geom *g) { return 4 + 2 * g->groups; }

static inline uint64_t load_be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

/* ------------------------------------------------------------------ Huffman tables */

/* Canonical codes: symbols sorted by (length, symbol) get increasing codes. Returns 0, or -1 if a
 * length exceeds MAX_CODE or the lengths over-subscribe the code space (Kraft sum > 1). */
static int canonical_codes(const uint8_t *lengths, uint16_t *codes) {
    int64_t kraft = 0;
    for (int s = 0; s < HUFF_TABLE_SIZE; s++) {
        if (lengths[s] > MAX_CODE) return -1;
        if (lengths[s]) kraft += (int64_t)1 << (MAX_CODE - lengths[s]);
    }
    if (kraft > (1 << MAX_CODE)) return -1;
    unsigned code = 0;
    int prev = 0;
    for (int len = 1; len <= MAX_CODE; len++)
        for (int s = 0; s < HUFF_TABLE_SIZE; s++)
            if (lengths[s] == len) {
                code <<= len - prev;
                prev = len;
                codes[s] = (uint16_t)code++;
            }
    return 0;
}

/* Decode table indexed by the next 12 stream bits. It yields up to two symbols per lookup (codes
 * average ~3.6 bits on real weights, so two almost always fit). Entry layout (uint32):
 *   bits 0-3   bits used by all symbols of the entry     bits 4-5   number of symbols (1 or 2)
 *   bits 8-14  first symbol (so bits 8-15 are its place in the fp16 pattern, symbol << 8)
 *   bit  15    set when no valid code starts here (checked once per tile, not per symbol)
 *   bits 16-19 bits used by the first symbol alone      bits 24-30 second symbol (0 if none)
 * Masked with ENTRY_VALUES the entry is two uint16 values, symbol << 8 each, ready to store. */
#define ENTRY_VALUES 0xFF00FF00u
#define ENTRY_INVALID 0x8000u

static int build_decode_table(const uint8_t *lengths, uint32_t *table) {
    uint16_t codes[HUFF_TABLE_SIZE] = {0};
    uint16_t single[1 << MAX_CODE]; /* symbol << 4 | length; 0 = invalid */
    if (canonical_codes(lengths, codes)) return -1;
    memset(single, 0, sizeof single);
    for (int s = 0; s < HUFF_TABLE_SIZE; s++) {
        int len = lengths[s];
        if (!len) continue;
        int shift = MAX_CODE - len;
        for (int i = codes[s] << shift, end = (codes[s] + 1) << shift; i < end; i++)
            single[i] = (uint16_t)(s << 4 | len);
    }
    for (uint32_t w = 0; w < (1u << MAX_CODE); w++) {
        unsigned first = single[w], len1 = first & 15;
        if (!len1) { /* invalid: flag it, consume one bit so decoding moves on until the check */
            table[w] = ENTRY_INVALID | 1u << 16 | 1u << 4 | 1u;
            continue;
        }
        uint32_t e = (first >> 4) << 8 | len1 << 16 | 1u << 4 | len1;
        unsigned second = single[(w << len1) & ((1u << MAX_CODE) - 1)], len2 = second & 15;
        if (len2 && len1 + len2 <= MAX_CODE) /* the second code lies wholly inside the window */
            e = (first >> 4) << 8 | len1 << 16 | (uint32_t)(second >> 4) << 24 | 2u << 4 | (len1 + len2);
        table[w] = e;
    }
    return 0;
}


/* Huffman substream decoding. A reader is a bit position into a byte-aligned substream and an output
 * cursor. Symbols are written as symbol << 8, the place they take in the fp16 pattern. An invalid code
 * leaves ENTRY_INVALID in its value, which the caller checks once per tile. The reader loads 8 bytes
 * at a time, and inside a round (below) it checks its limit only at the end, so `base` must stay
 * readable OVERRUN bytes past the substream end: the caller decodes from a padded copy when the
 * payload does not have that much after the tile. */

typedef struct {
    const uint8_t *base;
    int64_t pos, limit; /* bits used so far, bits available */
    uint16_t *out, *end; /* next value, end of this substream's values */
} Reader;

static inline uint32_t peek_entry(const uint32_t *table, const uint8_t *base, int64_t pos) {
    uint64_t w = load_be64(base + (pos >> 3)) << (pos & 7);
    return table[w >> (64 - MAX_CODE)];
}

/* One lookup, up to two symbols; the caller guarantees two free output slots (the pair is stored whole). */
#define HUFF_PAIR(base, pos, out)                    \
    do {                                             \
        uint32_t e_ = peek_entry(table, base, pos);  \
        uint32_t v_ = e_ & ENTRY_VALUES;             \
        memcpy(out, &v_, 4);                         \
        out += (e_ >> 4) & 3;                        \
        pos += e_ & 15;                              \
    } while (0)

/* The rest of one reader, one symbol per lookup, checking the limit after every symbol. */
static int huff_finish(const uint32_t *table, Reader *r) {
    for (; r->out < r->end; r->out++) {
        uint32_t e = peek_entry(table, r->base, r->pos);
        *r->out = (uint16_t)(e & 0xFF00);
        r->pos += (e >> 16) & 15;
        if (r->pos > r->limit) return -1;
    }
    return 0;
}

static inline int64_t room(const Reader *r) { return (r->end - r->out) / 2; }

/* Four substreams in lock-step: four independent dependency chains (load -> table -> position)
 * keep the core busy while each waits for its loads. Each round runs as many pair steps as the
 * reader closest to its end can take without overshooting; then each finishes alone. */
static int huff_four(const uint32_t *table, Reader *r) {
    const uint8_t *b0 = r[0].base, *b1 = r[1].base, *b2 = r[2].base, *b3 = r[3].base;
    int64_t p0 = r[0].pos, p1 = r[1].pos, p2 = r[2].pos, p3 = r[3].pos;
    uint16_t *o0 = r[0].out, *o1 = r[1].out, *o2 = r[2].out, *o3 = r[3].out;
    for (;;) {
        int64_t steps = room(&r[0]);
        for (int j = 1; j < 4; j++) steps = room(&r[j]) < steps ? room(&r[j]) : steps;
        if (steps == 0) break;
        for (int64_t s = 0; s < steps; s++) {
            HUFF_PAIR(b0, p0, o0);
            HUFF_PAIR(b1, p1, o1);
            HUFF_PAIR(b2, p2, o2);
            HUFF_PAIR(b3, p3, o3);
        }
        r[0].pos = p0, r[1].pos = p1, r[2].pos = p2, r[3].pos = p3;
        r[0].out = o0, r[1].out = o1, r[2].out = o2, r[3].out = o3;
        for (int j = 0; j < 4; j++)
            if (r[j].pos > r[j].limit) return -1;
    }
    for (int j = 0; j < 4; j++)
        if (huff_finish(table, &r[j])) return -1;
    return 0;
}

static int huff_alone(const uint32_t *table, Reader *r) {
    while (room(r)) {
        for (int64_t s = 0, steps = room(r); s < steps; s++) HUFF_PAIR(r->base, r->pos, r->out);
        if (r->pos > r->limit) return -1;
    }
    return huff_finish(table, r);
}


int codec_v2_decode_one(void *ctx, int64_t t, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    int64_t start = c->offsets[t], size = tile_end(c, t) - start;
    const int header = v2_header(&g);
    if (size < header + g.bitmap)
        return codec_tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes, less than its "
                          "%d-byte header and %d-byte bitmap",
                          (long long)t, (long long)size, header, g.bitmap);
    const uint8_t *p = c->payload + start;
    uint16_t *vals = (uint16_t *)scratch;
    uint8_t *copy = (uint8_t *)scratch + 2 * (TILE * TILE + READ_PAD);
    int mode = p[0], reserved = p[1], nexc = rd16(p + 2);
    const uint8_t *bm = p + header;
    int gcnt[GROUPS], sub_len[GROUPS], row_cnt[TILE];
    const int nnz = codec_scan_bitmap(c, t, &g, bm, row_cnt, gcnt);
    if (nnz < 0) return -1;
    int64_t subs = 0;
    for (int q = 0; q < g.groups; q++) {
        sub_len[q] = rd16(p + 4 + 2 * q);
        subs += sub_len[q];
        if ((sub_len[q] == 0) != (gcnt[q] == 0))
            return codec_tile_error(&c->err, t,
                              "huff-v2 stream is corrupted: tile %lld has a substream length that disagrees "
                              "with its bitmap", (long long)t);
        if (sub_len[q] > MAX_SUB)
            return codec_tile_error(&c->err, t, "huff-v2 stream is corrupted: tile %lld has a substream longer than %d bytes",
                              (long long)t, MAX_SUB);
    }
    if (mode > 1 || reserved || (mode == 0 && nexc) || nexc > nnz)
        return codec_tile_error(&c->err, t,
                          "huff-v2 stream is corrupted: tile %lld has an invalid header (mode %d, reserved %d, "
                          "%d exceptions for %d values)",
                          (long long)t, mode, reserved, nexc, nnz);
    int sign_bytes = (nnz + 7) / 8;
    int64_t expect = header + g.bitmap + sign_bytes + subs + (mode ? 3 * (int64_t)nexc : nnz);
    if (expect != size)
        return codec_tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes but its fields "
                          "imply %lld",
                          (long long)t, (long long)size, (long long)expect);
    if (start + size + OVERRUN > c->payload_len) { /* near the end: decode from a zero-padded copy */
        memcpy(copy, p, (size_t)size);
        memset(copy + size, 0, OVERRUN);
        p = copy;
        bm = p + header;
    }
    const uint8_t *signs = bm + g.bitmap, *sub = signs + sign_bytes;
    Reader rd[GROUPS];
    for (int q = 0, v = 0; q < g.groups; q++) {
        rd[q] = (Reader){sub, 0, 8 * (int64_t)sub_len[q], vals + v, vals + v + gcnt[q]};
        sub += sub_len[q];
        v += gcnt[q];
    }
    int q = 0, failed = 0;
    for (; q + 4 <= g.groups && !failed; q += 4) failed = huff_four(c->table, rd + q);
    for (; q < g.groups && !failed; q++) failed = huff_alone(c->table, rd + q);
    for (q = 0; q < g.groups && !failed; q++) failed = (rd[q].pos + 7) / 8 != sub_len[q];
    unsigned flags = 0;
    for (int i = 0; i < nnz; i++) flags |= vals[i];
    if (failed || (flags & ENTRY_INVALID))
        return codec_tile_error(&c->err, t,
                          "huff-v2 stream is corrupted: tile %lld holds an invalid Huffman code or a substream "
                          "length that disagrees with its codes", (long long)t);
    for (q = 0; q < g.groups; q++) {
        int64_t used = rd[q].pos;
        if ((used & 7) && (rd[q].base[used >> 3] & (0xFF >> (used & 7))))
            return codec_tile_error(&c->err, t, "huff-v2 stream is corrupted: nonzero padding bits after a substream");
    }
    if (codec_check_signs(c, t, "huff-v2", nnz, signs)) return -1;
    codec_apply_signs(vals, nnz, signs);
    if (codec_apply_lows(c, t, "huff-v2", vals, nnz, mode, nexc, sub)) return -1;
    codec_finish_tile(c, t, &g, bm, row_cnt, vals);
    return 0;
}

int codec_v1_decode_one(void *ctx, int64_t t, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    int64_t start = c->offsets[t], size = tile_end(c, t) - start;
    if (size < g.bitmap)
        return codec_tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes, less than its "
                          "%d-byte bitmap", (long long)t, (long long)size, g.bitmap);
    const uint8_t *bm = c->payload + start;
    int gcnt[GROUPS], row_cnt[TILE];
    const int64_t nnz = codec_scan_bitmap(c, t, &g, bm, row_cnt, gcnt);
    if (nnz < 0) return -1;
    if (size != g.bitmap + 2 * nnz)
        return codec_tile_error(&c->err, t,
                          "index offsets do not match the bitmaps: tile %lld spans %lld bytes but its bitmap "
                          "implies %d + 2 * %lld", (long long)t, (long long)size, g.bitmap, (long long)nnz);
    uint16_t *vals = (uint16_t *)scratch; /* copy: the expand step reads 16 bytes past the last value */
    memcpy(vals, bm + g.bitmap, (size_t)(2 * nnz));
    codec_finish_tile(c, t, &g, bm, row_cnt, vals);
    return 0;
}


int codec_v2_prepare(DecCtx *c) {
    if (!build_decode_table(c->payload, c->table)) return 0;
    PyErr_SetString(PyExc_ValueError, "huff-v2 code table is corrupted (a length above 12 or an over-subscribed code)");
    return -1;
}

/* ------------------------------------------------------------------ huff-v2 encode */

typedef struct {
    const uint16_t *bits;
    int64_t n, k;
    uint8_t lengths[HUFF_TABLE_SIZE];
    uint16_t codes[HUFF_TABLE_SIZE];
    EncodeOut out;
    CompactFn compact;
} EncCtx;

/* Gathers a tile's present values (row-major) into vals, writes its bitmap into bm (if not NULL) and
 * the index of each row group's first value into gstart[0..groups]. Returns nnz. vals must have 8
 * slots of slack past the last value (the SIMD compaction stores 8 at a time). */
static int gather_tile(const EncCtx *c, const Geom *g, uint16_t *vals, uint8_t *bm, int *gstart) {
    int nnz = 0;
    uint8_t scratch_row[TILE / 8];
    for (int r = 0; r < g->rows; r++) {
        if (r % GROUP_ROWS == 0) gstart[r / GROUP_ROWS] = nnz;
        const uint16_t *src = c->bits + (g->r0 + r) * c->k + g->c0;
        nnz += c->compact(src, g->cols, vals + nnz, bm ? bm + r * g->row_bytes : scratch_row);
    }
    gstart[g->groups] = nnz;
    return nnz;
}

static int count_exceptions(const uint16_t *vals, int nnz) {
    int e = 0;
    for (int i = 0; i < nnz; i++) e += (vals[i] & 0xFF) != 0;
    return e;
}

static int enc_size_tile(void *ctx, int64_t t, void *scratch) {
    EncCtx *c = (EncCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    uint16_t *vals = (uint16_t *)scratch;
    int gstart[GROUPS + 1];
    int nnz = gather_tile(c, &g, vals, NULL, gstart);
    int64_t subs = 0;
    for (int q = 0; q < g.groups; q++) {
        int64_t bits = 0;
        for (int i = gstart[q]; i < gstart[q + 1]; i++) bits += c->lengths[(vals[i] >> 8) & 0x7F];
        subs += (bits + 7) / 8;
    }
    int exc = count_exceptions(vals, nnz);
    int lows = 3 * exc < nnz ? 3 * exc : nnz;
    c->out.sizes[t] = v2_header(&g) + g.bitmap + (nnz + 7) / 8 + subs + lows;
    return 0;
}

/* MSB-first Huffman substream of vals[from:to]; returns its byte length. */
static int write_substream(const EncCtx *c, const uint16_t *vals, int from, int to, uint8_t *o) {
    uint64_t acc = 0;
    int nb = 0;
    uint8_t *start = o;
    for (int i = from; i < to; i++) {
        unsigned s = (vals[i] >> 8) & 0x7F;
        acc = acc << c->lengths[s] | c->codes[s];
        nb += c->lengths[s];
        if (nb >= 32) {
            nb -= 32;
            uint32_t w = __builtin_bswap32((uint32_t)(acc >> nb));
            memcpy(o, &w, 4);
            o += 4;
        }
    }
    while (nb >= 8) {
        nb -= 8;
        *o++ = (uint8_t)(acc >> nb);
    }
    if (nb) *o++ = (uint8_t)(acc << (8 - nb));
    return (int)(o - start);
}

static int enc_write_tile(void *ctx, int64_t t, void *scratch) {
    EncCtx *c = (EncCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    uint16_t *vals = (uint16_t *)scratch;
    uint8_t *o = c->out.dst + c->out.offsets[t];
    int gstart[GROUPS + 1];
    int nnz = gather_tile(c, &g, vals, o + v2_header(&g), gstart);
    int exc = count_exceptions(vals, nnz);
    int e5m2 = 3 * exc < nnz;

    uint8_t *signs = o + v2_header(&g) + g.bitmap;
    memset(vals + nnz, 0, 8 * sizeof *vals); /* signs are packed 8 at a time: no sign past the end */
    for (int b = 0; b < (nnz + 7) / 8; b++) {
        unsigned byte = 0;
        for (int j = 0; j < 8; j++) byte |= (unsigned)(vals[8 * b + j] >> 15) << j;
        signs[b] = (uint8_t)byte;
    }

    uint8_t *p = signs + (nnz + 7) / 8;
    for (int q = 0; q < g.groups; q++) {
        int len = write_substream(c, vals, gstart[q], gstart[q + 1], p);
        wr16(o + 4 + 2 * q, (unsigned)len);
        p += len;
    }
    if (e5m2) { /* positions (u16) of the nonzero low bytes, then those bytes */
        uint8_t *bytes = p + 2 * exc;
        for (int i = 0, e = 0; i < nnz; i++)
            if (vals[i] & 0xFF) {
                wr16(p + 2 * e, (unsigned)i);
                bytes[e++] = (uint8_t)vals[i];
            }
    } else {
        for (int i = 0; i < nnz; i++) p[i] = (uint8_t)vals[i];
    }
    o[0] = (uint8_t)e5m2;
    o[1] = 0;
    wr16(o + 2, e5m2 ? (unsigned)exc : 0);
    return 0;
}

typedef struct {
    const uint16_t *bits;
    int64_t n, k;
    int64_t (*hist)[HUFF_TABLE_SIZE]; /* one row per tile */
} HistCtx;

static int hist_tile(void *ctx, int64_t t, void *scratch) {
    (void)scratch;
    HistCtx *c = (HistCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    /* Four partial histograms: runs of one symbol would otherwise chain every increment through
     * the same memory slot. */
    uint32_t h[4][HUFF_TABLE_SIZE];
    memset(h, 0, sizeof h);
    for (int r = 0; r < g.rows; r++) {
        const uint16_t *src = c->bits + (g.r0 + r) * c->k + g.c0;
        for (int j = 0; j < g.cols; j++) h[j & 3][(src[j] >> 8) & 0x7F] += src[j] != 0;
    }
    for (int s = 0; s < HUFF_TABLE_SIZE; s++) c->hist[t][s] = (int64_t)h[0][s] + h[1][s] + h[2][s] + h[3][s];
    return 0;
}


PyObject *spz_py_v2_histogram(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer bits;
    long long n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "y*LLi", &bits, &n, &k, &threads)) return NULL;
    PyObject *result = NULL;
    if (codec_check_shape(n, k)) goto done;
    if (bits.len != n * k * 2) {
        PyErr_SetString(PyExc_ValueError, "bits buffer size does not match the shape");
        goto done;
    }
    int64_t tiles = tile_count(n, k);
    int64_t(*hist)[HUFF_TABLE_SIZE] = calloc((size_t)tiles, sizeof *hist);
    if (!hist) {
        PyErr_NoMemory();
        goto done;
    }
    HistCtx ctx = {(const uint16_t *)bits.buf, n, k, hist};
    ErrState err;
    codec_err_init(&err);
    codec_parallel_tiles(hist_tile, &ctx, &err, tiles, threads, n * k, 16);
    int64_t total[HUFF_TABLE_SIZE] = {0};
    for (int64_t t = 0; t < tiles; t++)
        for (int s = 0; s < HUFF_TABLE_SIZE; s++) total[s] += hist[t][s];
    free(hist);
    result = PyBytes_FromStringAndSize((const char *)total, sizeof total);
done:
    PyBuffer_Release(&bits);
    return result;
}

/* v2_encode(bits, n, k, lengths, prefix, threads) -> (bytearray: prefix zero bytes + payload, offsets bytes) */
PyObject *spz_py_v2_encode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer bits, lengths;
    long long n, k;
    Py_ssize_t prefix;
    int threads;
    if (!PyArg_ParseTuple(args, "y*LLy*ni", &bits, &n, &k, &lengths, &prefix, &threads)) return NULL;
    PyObject *result = NULL;
    if (codec_check_shape(n, k)) goto done;
    if (bits.len != n * k * 2 || lengths.len != HUFF_TABLE_SIZE || prefix < 0) {
        PyErr_SetString(PyExc_ValueError, "v2_encode: bad buffer sizes");
        goto done;
    }
    EncCtx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.bits = (const uint16_t *)bits.buf;
    ctx.n = n;
    ctx.k = k;
    memcpy(ctx.lengths, lengths.buf, HUFF_TABLE_SIZE);
    ctx.compact = codec_compact_fn();
    if (canonical_codes(ctx.lengths, ctx.codes)) {
        PyErr_SetString(PyExc_ValueError, "v2_encode: invalid code lengths");
        goto done;
    }
    result = codec_encode_tiles(enc_size_tile, enc_write_tile, &ctx, &ctx.out, ctx.lengths, HUFF_TABLE_SIZE, n, k,
                                prefix, threads);
done:
    PyBuffer_Release(&bits);
    PyBuffer_Release(&lengths);
    return result;
}

