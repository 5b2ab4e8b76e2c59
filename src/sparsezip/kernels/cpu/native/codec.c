/* Native CPU path of the tile codecs (huff-v2 encode/decode, bitmap-v1 decode) and the product straight from the
 * tiles.
 *
 * The byte format is documented in sparsezip/codec/huff_v2.py, whose numpy code is the source of truth; the tests
 * check this file against it byte for byte. Work is split over tiles (they are independent) on the shared pool.
 *
 * Every function validates what it reads and reports the first bad tile as ValueError (the Python wrapper turns it
 * into SparsezipError); nothing is read outside the buffers it was given.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "spz.h"

#define TILE SPZ_TILE
#define GROUP_ROWS 8
#define GROUPS (TILE / GROUP_ROWS)
#define TABLE_SIZE 128
#define MAX_CODE 12
#define MAX_SUB ((GROUP_ROWS * TILE * MAX_CODE + 7) / 8)
/* Largest valid v2 tile: header + bitmap + signs + substreams + 3-byte exceptions for every value. */
#define MAX_TILE_BYTES (4 + 2 * GROUPS + TILE * 16 + TILE * 16 + GROUPS * MAX_SUB + 3 * TILE * TILE)
#define READ_PAD 16 /* the bit reader loads 8 bytes at a time past the current byte */

enum { OUT_F16 = 0, OUT_F32 = 1, OUT_LINEAR = 2 }; /* OUT_LINEAR: y = x W^T, W never written out */

/* ------------------------------------------------------------------ errors and threads */

typedef struct {
    pthread_mutex_t mu;
    int failed;
    int64_t tile; /* lowest failing tile, so the message does not depend on thread timing */
    char msg[320];
} ErrState;

static void err_init(ErrState *e) {
    pthread_mutex_init(&e->mu, NULL);
    e->failed = 0;
    e->tile = INT64_MAX;
    e->msg[0] = 0;
}

static int tile_error(ErrState *e, int64_t tile, const char *fmt, ...) {
    pthread_mutex_lock(&e->mu);
    if (tile < e->tile) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        e->tile = tile;
    }
    __atomic_store_n(&e->failed, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->mu);
    return -1;
}

typedef int (*TileFn)(void *ctx, int64_t tile, void *scratch);

typedef struct {
    TileFn fn;
    void *ctx;
    ErrState *err;
    int64_t count;
    int64_t next; /* atomic work counter */
    size_t scratch_bytes;
} TileJob;

static void tile_part(void *arg, int part, int parts) {
    (void)part;
    (void)parts;
    TileJob *job = (TileJob *)arg;
    void *scratch = spz_scratch(job->scratch_bytes);
    if (!scratch) {
        tile_error(job->err, -1, "out of memory for a %zu-byte scratch buffer", job->scratch_bytes);
        return;
    }
    for (;;) {
        int64_t t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (t >= job->count || __atomic_load_n(&job->err->failed, __ATOMIC_RELAXED)) break;
        job->fn(job->ctx, t, scratch);
    }
}

/* Run fn over tiles 0..count-1 on up to `threads` threads of the pool (the calling thread is one of them), with
 * the GIL released.
 * Small jobs run on fewer threads: waking one costs more than decoding a few tiles. */
static void parallel_tiles(TileFn fn, void *ctx, ErrState *err, int64_t count, int threads, int64_t elements,
                           size_t scratch_bytes) {
    TileJob job = {fn, ctx, err, count, 0, scratch_bytes};
    int64_t by_work = elements / (1 << 17) + 1;
    if (threads > count) threads = (int)count;
    if (threads > by_work) threads = (int)by_work;
    spz_run_parts_nogil(tile_part, &job, threads);
}

/* ------------------------------------------------------------------ geometry */

typedef struct {
    int64_t r0, c0;
    int rows, cols, groups, header, row_bytes, bitmap;
} Geom;

static Geom geom_of(int64_t n, int64_t k, int64_t t) {
    int64_t n_tc = (k + TILE - 1) / TILE;
    Geom g;
    g.r0 = (t / n_tc) * TILE;
    g.c0 = (t % n_tc) * TILE;
    g.rows = (int)((n - g.r0) < TILE ? (n - g.r0) : TILE);
    g.cols = (int)((k - g.c0) < TILE ? (k - g.c0) : TILE);
    g.groups = (g.rows + GROUP_ROWS - 1) / GROUP_ROWS;
    g.header = 4 + 2 * g.groups;
    g.row_bytes = (g.cols + 7) / 8;
    g.bitmap = g.rows * g.row_bytes;
    return g;
}

static int64_t tile_count(int64_t n, int64_t k) { return ((n + TILE - 1) / TILE) * ((k + TILE - 1) / TILE); }

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline void wr16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
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
    for (int s = 0; s < TABLE_SIZE; s++) {
        if (lengths[s] > MAX_CODE) return -1;
        if (lengths[s]) kraft += (int64_t)1 << (MAX_CODE - lengths[s]);
    }
    if (kraft > (1 << MAX_CODE)) return -1;
    unsigned code = 0;
    int prev = 0;
    for (int len = 1; len <= MAX_CODE; len++)
        for (int s = 0; s < TABLE_SIZE; s++)
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
    uint16_t codes[TABLE_SIZE] = {0};
    uint16_t single[1 << MAX_CODE]; /* symbol << 4 | length; 0 = invalid */
    if (canonical_codes(lengths, codes)) return -1;
    memset(single, 0, sizeof single);
    for (int s = 0; s < TABLE_SIZE; s++) {
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

/* ------------------------------------------------------------------ expand: compact values -> dense rows */

#define POP8 spz_pop8

/* Writes one tile row of `cols` outputs from bitmap bytes `bm` and compact values `vals` (which must
 * stay readable 16 bytes past the last value); returns how many values it consumed. */
typedef int (*ExpandFn)(const uint8_t *bm, int cols, const uint16_t *vals, void *out);

static int expand_f16_scalar(const uint8_t *bm, int cols, const uint16_t *vals, void *out) {
    uint16_t *o = (uint16_t *)out;
    int p = 0;
    for (int c = 0; c < cols; c++) {
        unsigned bit = (bm[c >> 3] >> (c & 7)) & 1;
        o[c] = (uint16_t)(vals[p] & (0u - bit));
        p += (int)bit;
    }
    return p;
}

static int expand_f32_scalar(const uint8_t *bm, int cols, const uint16_t *vals, void *out) {
    uint32_t *o = (uint32_t *)out;
    int p = 0;
    for (int c = 0; c < cols; c++) {
        unsigned bit = (bm[c >> 3] >> (c & 7)) & 1;
        o[c] = bit ? spz_half_bits(vals[p]) : 0;
        p += (int)bit;
    }
    return p;
}

#ifdef SPZ_X86
__attribute__((target("ssse3"))) static int expand_f16_ssse3(const uint8_t *bm, int cols, const uint16_t *vals,
                                                               void *out) {
    uint16_t *o = (uint16_t *)out;
    int p = 0, full = cols >> 3;
    for (int b = 0; b < full; b++) {
        unsigned m = bm[b];
        __m128i v = _mm_loadu_si128((const __m128i *)(vals + p));
        _mm_storeu_si128((__m128i *)(o + 8 * b), _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)spz_expand16[m])));
        p += POP8[m];
    }
    if (cols & 7) p += expand_f16_scalar(bm + full, cols & 7, vals + p, o + 8 * full);
    return p;
}

__attribute__((target("avx2,f16c"))) static int expand_f32_f16c(const uint8_t *bm, int cols, const uint16_t *vals,
                                                                  void *out) {
    float *o = (float *)out;
    int p = 0, full = cols >> 3;
    for (int b = 0; b < full; b++) {
        unsigned m = bm[b];
        __m128i v = _mm_loadu_si128((const __m128i *)(vals + p));
        v = _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)spz_expand16[m]));
        _mm256_storeu_ps(o + 8 * b, _mm256_cvtph_ps(v));
        p += POP8[m];
    }
    if (cols & 7) p += expand_f32_scalar(bm + full, cols & 7, vals + p, o + 8 * full);
    return p;
}
#endif

/* The expand step for an output kind (fp16 or fp32) at the current kernel level. */
static ExpandFn expand_fn(int out_f32) {
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) return out_f32 ? expand_f32_f16c : expand_f16_ssse3;
#endif
    return out_f32 ? expand_f32_scalar : expand_f16_scalar;
}

/* ------------------------------------------------------------------ compact: dense row -> bitmap + values */

/* Writes the bitmap bytes of one row of `cols` values and appends its nonzero values to vals;
 * returns how many it appended. */
typedef int (*CompactFn)(const uint16_t *src, int cols, uint16_t *vals, uint8_t *bm);

static int compact_scalar(const uint16_t *src, int cols, uint16_t *vals, uint8_t *bm) {
    int n = 0;
    for (int b = 0; b < (cols + 7) / 8; b++) {
        unsigned m = 0;
        for (int j = 0; j < 8 && 8 * b + j < cols; j++) {
            uint16_t v = src[8 * b + j];
            vals[n] = v; /* branch-free: the slot is overwritten unless v != 0 */
            n += v != 0;
            m |= (unsigned)(v != 0) << j;
        }
        bm[b] = (uint8_t)m;
    }
    return n;
}

#ifdef SPZ_X86
__attribute__((target("ssse3"))) static int compact_ssse3(const uint16_t *src, int cols, uint16_t *vals,
                                                            uint8_t *bm) {
    const __m128i zero = _mm_setzero_si128();
    int n = 0, full = cols >> 3;
    for (int b = 0; b < full; b++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(src + 8 * b));
        __m128i is_zero = _mm_packs_epi16(_mm_cmpeq_epi16(v, zero), zero); /* lane j -> byte j */
        unsigned m = ~(unsigned)_mm_movemask_epi8(is_zero) & 0xFF;
        bm[b] = (uint8_t)m;
        _mm_storeu_si128((__m128i *)(vals + n), _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)spz_compact16[m])));
        n += POP8[m];
    }
    if (cols & 7) n += compact_scalar(src + 8 * full, cols & 7, vals + n, bm + full);
    return n;
}
#endif

static CompactFn compact_fn(void) {
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) return compact_ssse3;
#endif
    return compact_scalar;
}



/* ------------------------------------------------------------------ huff-v2 encode */

typedef struct {
    const uint16_t *bits;
    int64_t n, k;
    uint8_t lengths[TABLE_SIZE];
    uint16_t codes[TABLE_SIZE];
    int64_t *sizes;         /* pass 1 output: bytes of each tile */
    const int64_t *offsets; /* pass 2 input: where each tile starts in `dst` */
    uint8_t *dst;
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
    c->sizes[t] = g.header + g.bitmap + (nnz + 7) / 8 + subs + lows;
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
    uint8_t *o = c->dst + c->offsets[t];
    int gstart[GROUPS + 1];
    int nnz = gather_tile(c, &g, vals, o + g.header, gstart);
    int exc = count_exceptions(vals, nnz);
    int e5m2 = 3 * exc < nnz;

    uint8_t *signs = o + g.header + g.bitmap;
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
    int64_t (*hist)[TABLE_SIZE]; /* one row per tile */
} HistCtx;

static int hist_tile(void *ctx, int64_t t, void *scratch) {
    (void)scratch;
    HistCtx *c = (HistCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    /* Four partial histograms: runs of one symbol would otherwise chain every increment through
     * the same memory slot. */
    uint32_t h[4][TABLE_SIZE];
    memset(h, 0, sizeof h);
    for (int r = 0; r < g.rows; r++) {
        const uint16_t *src = c->bits + (g.r0 + r) * c->k + g.c0;
        for (int j = 0; j < g.cols; j++) h[j & 3][(src[j] >> 8) & 0x7F] += src[j] != 0;
    }
    for (int s = 0; s < TABLE_SIZE; s++) c->hist[t][s] = (int64_t)h[0][s] + h[1][s] + h[2][s] + h[3][s];
    return 0;
}

/* ------------------------------------------------------------------ huff-v2 / bitmap-v1 decode */

/* Fused linear: one tile row's dot product with x straight from the bitmap and compact values (see finish_tile). */
typedef float (*DotFn)(const uint8_t *bm, int cols, const uint16_t *vals, const float *x, int *used);

typedef struct {
    const uint8_t *payload;
    int64_t payload_len;
    const int64_t *offsets;
    int64_t n, k, tiles;
    uint32_t table[1 << MAX_CODE];
    void *out;
    int out_kind;
    ExpandFn expand;
    DotFn dot;
    const float *x; /* OUT_LINEAR: input [k]; per-tile row sums go to partial [tiles, 128] */
    float *partial;
    ErrState err;
} DecCtx;

static int64_t tile_end(const DecCtx *c, int64_t t) { return t + 1 < c->tiles ? c->offsets[t + 1] : c->payload_len; }

/* Bitmap checks shared by both codecs: no bits past the last column; counts per row group. */
static int scan_bitmap(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, int *gcnt) {
    int tail = g->cols & 7;
    for (int q = 0; q < GROUPS; q++) gcnt[q] = 0;
    for (int r = 0; r < g->rows; r++) {
        const uint8_t *row = bm + r * g->row_bytes;
        if (tail && row[g->row_bytes - 1] >> tail)
            return tile_error(&c->err, t,
                              "bitmap marks entries outside the matrix; the weight stream is corrupted "
                              "or info has the wrong shape");
        int cnt = 0;
        for (int b = 0; b < g->row_bytes; b++) cnt += POP8[row[b]];
        gcnt[r / GROUP_ROWS] += cnt;
    }
    return 0;
}

static void expand_tile(DecCtx *c, const Geom *g, const uint8_t *bm, const uint16_t *vals) {
    size_t esz = c->out_kind == OUT_F32 ? 4 : 2;
    uint8_t *base = (uint8_t *)c->out + ((size_t)g->r0 * (size_t)c->k + (size_t)g->c0) * esz;
    int p = 0;
    for (int r = 0; r < g->rows; r++)
        p += c->expand(bm + r * g->row_bytes, g->cols, vals + p, base + (size_t)r * (size_t)c->k * esz);
}

/* Huffman substream decoding. A reader is a bit position into a byte-aligned substream and an output
 * cursor. Symbols are written as symbol << 8, the place they take in the fp16 pattern. An invalid code
 * leaves ENTRY_INVALID in its value, which the caller checks once per tile. The reader loads 8 bytes
 * at a time, and inside a round (below) it checks its limit only at the end, so `base` must stay
 * readable OVERRUN bytes past the substream end: the caller decodes from a padded copy when the
 * payload does not have that much after the tile. */
#define OVERRUN (TILE * GROUP_ROWS * MAX_CODE / 2 / 8 + 16) /* a round is <= count / 2 lookups of <= 12 bits */

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

/* dot_*: one tile row's dot product with x straight from the bitmap and compact values, in the shared summation
 * order (spz.h). Returns the sum; *used = values consumed. */
static float dot_scalar(const uint8_t *bm, int cols, const uint16_t *vals, const float *x, int *used) {
    float sum = 0;
    int p = 0;
    for (int c = 0; c < cols; c++)
        if (bm[c >> 3] >> (c & 7) & 1) {
            uint32_t f = spz_half_bits(vals[p++]);
            float w;
            memcpy(&w, &f, 4);
            sum += w * x[c];
        }
    *used = p;
    return sum;
}

#ifdef SPZ_X86
__attribute__((target("avx2,f16c,fma"))) static float dot_avx2(const uint8_t *bm, int cols, const uint16_t *vals,
                                                                 const float *x, int *used) {
    __m256 acc = _mm256_setzero_ps();
    int p = 0, full = cols >> 3;
    for (int b = 0; b < full; b++) {
        unsigned m = bm[b];
        __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(vals + p)),
                                     _mm_loadu_si128((const __m128i *)spz_expand16[m]));
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(v), _mm256_loadu_ps(x + 8 * b), acc);
        p += POP8[m];
    }
    float sum = spz_hsum8(acc);
    if (cols & 7) {
        int tail;
        sum += dot_scalar(bm + full, cols & 7, vals + p, x + 8 * full, &tail);
        p += tail;
    }
    *used = p;
    return sum;
}
#endif

static DotFn dot_fn(void) {
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) return dot_avx2;
#endif
    return dot_scalar;
}

/* What happens to a decoded tile: written out (decode) or multiplied with x (fused linear). */
static void finish_tile(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, const uint16_t *vals) {
    if (c->out_kind != OUT_LINEAR) {
        expand_tile(c, g, bm, vals);
        return;
    }
    float *part = c->partial + t * TILE;
    const float *x = c->x + g->c0;
    int p = 0;
    for (int r = 0; r < g->rows; r++) {
        int used;
        part[r] = c->dot(bm + r * g->row_bytes, g->cols, vals + p, x, &used);
        p += used;
    }
}

static int v2_decode_one(void *ctx, int64_t t, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    int64_t start = c->offsets[t], size = tile_end(c, t) - start;
    if (size < g.header + g.bitmap)
        return tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes, less than its "
                          "%d-byte header and %d-byte bitmap",
                          (long long)t, (long long)size, g.header, g.bitmap);
    const uint8_t *p = c->payload + start;
    uint16_t *vals = (uint16_t *)scratch;
    uint8_t *copy = (uint8_t *)scratch + 2 * (TILE * TILE + READ_PAD);
    int mode = p[0], reserved = p[1], nexc = rd16(p + 2);
    const uint8_t *bm = p + g.header;
    int gcnt[GROUPS], sub_len[GROUPS];
    if (scan_bitmap(c, t, &g, bm, gcnt)) return -1;
    int nnz = 0;
    int64_t subs = 0;
    for (int q = 0; q < g.groups; q++) {
        nnz += gcnt[q];
        sub_len[q] = rd16(p + 4 + 2 * q);
        subs += sub_len[q];
        if ((sub_len[q] == 0) != (gcnt[q] == 0))
            return tile_error(&c->err, t,
                              "huff-v2 stream is corrupted: tile %lld has a substream length that disagrees "
                              "with its bitmap", (long long)t);
        if (sub_len[q] > MAX_SUB)
            return tile_error(&c->err, t, "huff-v2 stream is corrupted: tile %lld has a substream longer than %d bytes",
                              (long long)t, MAX_SUB);
    }
    if (mode > 1 || reserved || (mode == 0 && nexc) || nexc > nnz)
        return tile_error(&c->err, t,
                          "huff-v2 stream is corrupted: tile %lld has an invalid header (mode %d, reserved %d, "
                          "%d exceptions for %d values)",
                          (long long)t, mode, reserved, nexc, nnz);
    int sign_bytes = (nnz + 7) / 8;
    int64_t expect = g.header + g.bitmap + sign_bytes + subs + (mode ? 3 * (int64_t)nexc : nnz);
    if (expect != size)
        return tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes but its fields "
                          "imply %lld",
                          (long long)t, (long long)size, (long long)expect);
    if (start + size + OVERRUN > c->payload_len) { /* near the end: decode from a zero-padded copy */
        memcpy(copy, p, (size_t)size);
        memset(copy + size, 0, OVERRUN);
        p = copy;
        bm = p + g.header;
    }
    const uint8_t *signs = bm + g.bitmap, *sub = signs + sign_bytes;
    if ((nnz & 7) && signs[nnz >> 3] >> (nnz & 7))
        return tile_error(&c->err, t, "huff-v2 stream is corrupted: nonzero padding bits in the sign bits of tile %lld",
                          (long long)t);
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
        return tile_error(&c->err, t,
                          "huff-v2 stream is corrupted: tile %lld holds an invalid Huffman code or a substream "
                          "length that disagrees with its codes", (long long)t);
    for (q = 0; q < g.groups; q++) {
        int64_t used = rd[q].pos;
        if ((used & 7) && (rd[q].base[used >> 3] & (0xFF >> (used & 7))))
            return tile_error(&c->err, t, "huff-v2 stream is corrupted: nonzero padding bits after a substream");
    }
    for (int b = 0; b < sign_bytes; b++) { /* 8 values at a time, as two 64-bit words */
        uint64_t s[2], v[2];
        memcpy(s, spz_sign16[signs[b]], 16);
        memcpy(v, vals + 8 * b, 16);
        v[0] |= s[0];
        v[1] |= s[1];
        memcpy(vals + 8 * b, v, 16);
    }
    if (mode == 0) {
        for (int i = 0; i < nnz; i++) vals[i] |= sub[i];
    } else {
        const uint8_t *bytes = sub + 2 * nexc;
        int prev = -1;
        for (int e = 0; e < nexc; e++) {
            int pos = rd16(sub + 2 * e);
            if (pos <= prev || pos >= nnz || !bytes[e])
                return tile_error(&c->err, t,
                                  "huff-v2 stream is corrupted: tile %lld has an invalid exception list (positions "
                                  "must increase and be below the tile's value count, bytes nonzero)", (long long)t);
            vals[pos] |= bytes[e];
            prev = pos;
        }
    }
    finish_tile(c, t, &g, bm, vals);
    return 0;
}

static int v1_decode_one(void *ctx, int64_t t, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    Geom g = geom_of(c->n, c->k, t);
    int64_t start = c->offsets[t], size = tile_end(c, t) - start;
    if (size < g.bitmap)
        return tile_error(&c->err, t,
                          "index offsets do not match the stream: tile %lld spans %lld bytes, less than its "
                          "%d-byte bitmap", (long long)t, (long long)size, g.bitmap);
    const uint8_t *bm = c->payload + start;
    int gcnt[GROUPS];
    if (scan_bitmap(c, t, &g, bm, gcnt)) return -1;
    int64_t nnz = 0;
    for (int q = 0; q < GROUPS; q++) nnz += gcnt[q];
    if (size != g.bitmap + 2 * nnz)
        return tile_error(&c->err, t,
                          "index offsets do not match the bitmaps: tile %lld spans %lld bytes but its bitmap "
                          "implies %d + 2 * %lld", (long long)t, (long long)size, g.bitmap, (long long)nnz);
    uint16_t *vals = (uint16_t *)scratch; /* copy: the expand step reads 16 bytes past the last value */
    memcpy(vals, bm + g.bitmap, (size_t)(2 * nnz));
    finish_tile(c, t, &g, bm, vals);
    return 0;
}

/* ------------------------------------------------------------------ Python bindings */

static int check_shape(long long n, long long k) {
    if (n < 1 || k < 1 || n > INT32_MAX || k > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "matrix shape must be 1..2^31-1 on each side, got %lld x %lld", n, k);
        return -1;
    }
    return 0;
}

PyObject *spz_py_v2_histogram(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer bits;
    long long n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "y*LLi", &bits, &n, &k, &threads)) return NULL;
    PyObject *result = NULL;
    if (check_shape(n, k)) goto done;
    if (bits.len != n * k * 2) {
        PyErr_SetString(PyExc_ValueError, "bits buffer size does not match the shape");
        goto done;
    }
    int64_t tiles = tile_count(n, k);
    int64_t(*hist)[TABLE_SIZE] = calloc((size_t)tiles, sizeof *hist);
    if (!hist) {
        PyErr_NoMemory();
        goto done;
    }
    HistCtx ctx = {(const uint16_t *)bits.buf, n, k, hist};
    ErrState err;
    err_init(&err);
    parallel_tiles(hist_tile, &ctx, &err, tiles, threads, n * k, 16);
    int64_t total[TABLE_SIZE] = {0};
    for (int64_t t = 0; t < tiles; t++)
        for (int s = 0; s < TABLE_SIZE; s++) total[s] += hist[t][s];
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
    PyObject *stream = NULL, *index = NULL, *result = NULL;
    int64_t *sizes = NULL, *offsets = NULL;
    if (check_shape(n, k)) goto done;
    if (bits.len != n * k * 2 || lengths.len != TABLE_SIZE || prefix < 0) {
        PyErr_SetString(PyExc_ValueError, "v2_encode: bad buffer sizes");
        goto done;
    }
    EncCtx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.bits = (const uint16_t *)bits.buf;
    ctx.n = n;
    ctx.k = k;
    memcpy(ctx.lengths, lengths.buf, TABLE_SIZE);
    ctx.compact = compact_fn();
    if (canonical_codes(ctx.lengths, ctx.codes)) {
        PyErr_SetString(PyExc_ValueError, "v2_encode: invalid code lengths");
        goto done;
    }
    int64_t tiles = tile_count(n, k);
    sizes = malloc((size_t)tiles * sizeof *sizes);
    offsets = malloc((size_t)tiles * sizeof *offsets);
    if (!sizes || !offsets) {
        PyErr_NoMemory();
        goto done;
    }
    ctx.sizes = sizes;
    ErrState err;
    err_init(&err);
    size_t scratch = 2 * (TILE * TILE + READ_PAD);
    parallel_tiles(enc_size_tile, &ctx, &err, tiles, threads, n * k, scratch);
    int64_t total = TABLE_SIZE;
    for (int64_t t = 0; t < tiles; t++) {
        offsets[t] = total;
        total += sizes[t];
    }
    stream = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(prefix + total));
    if (!stream) goto done;
    uint8_t *dst = (uint8_t *)PyByteArray_AS_STRING(stream) + prefix;
    memset(dst - prefix, 0, (size_t)prefix);
    memcpy(dst, ctx.lengths, TABLE_SIZE);
    ctx.dst = dst;
    ctx.offsets = offsets;
    parallel_tiles(enc_write_tile, &ctx, &err, tiles, threads, n * k, scratch);
    if (err.failed) {
        PyErr_SetString(PyExc_ValueError, err.msg);
        goto done;
    }
    index = PyBytes_FromStringAndSize((const char *)offsets, (Py_ssize_t)(tiles * 8));
    if (index) result = PyTuple_Pack(2, stream, index);
done:
    Py_XDECREF(stream);
    Py_XDECREF(index);
    free(sizes);
    free(offsets);
    PyBuffer_Release(&bits);
    PyBuffer_Release(&lengths);
    return result;
}

/* decode(codec_id, payload, offsets, n, k, out, out_kind, threads): validates and writes out [n, k]. */
PyObject *spz_py_decode(PyObject *self, PyObject *args) {
    (void)self;
    int codec_id, out_kind, threads;
    Py_buffer payload, offsets, out, x = {0};
    long long n, k;
    if (!PyArg_ParseTuple(args, "iy*y*LLw*ii|y*", &codec_id, &payload, &offsets, &n, &k, &out, &out_kind, &threads,
                          &x))
        return NULL;
    PyObject *result = NULL;
    DecCtx *ctx = NULL;
    if (check_shape(n, k)) goto done;
    int64_t tiles = tile_count(n, k);
    long long out_len = out_kind == OUT_LINEAR ? 4 * n : n * k * (out_kind == OUT_F32 ? 4 : 2);
    if ((codec_id != 1 && codec_id != 2) || out_kind < OUT_F16 || out_kind > OUT_LINEAR ||
        offsets.len != tiles * 8 || out.len != (Py_ssize_t)out_len ||
        (out_kind == OUT_LINEAR && x.len != (Py_ssize_t)(4 * k))) {
        PyErr_SetString(PyExc_ValueError, "decode: bad arguments (codec id, output kind or buffer sizes)");
        goto done;
    }
    ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        PyErr_NoMemory();
        goto done;
    }
    if (out_kind == OUT_LINEAR) {
        ctx->x = (const float *)x.buf;
        ctx->partial = malloc((size_t)tiles * TILE * sizeof(float));
        if (!ctx->partial) {
            PyErr_NoMemory();
            goto done;
        }
    }
    ctx->payload = (const uint8_t *)payload.buf;
    ctx->payload_len = payload.len;
    ctx->offsets = (const int64_t *)offsets.buf;
    ctx->n = n;
    ctx->k = k;
    ctx->tiles = tiles;
    ctx->out = out.buf;
    ctx->out_kind = out_kind;
    ctx->expand = expand_fn(out_kind == OUT_F32);
    ctx->dot = dot_fn();
    err_init(&ctx->err);
    /* Offsets must lie in the payload and not decrease; tile sizes are then checked per tile. */
    int64_t first = codec_id == 2 ? TABLE_SIZE : 0;
    if (ctx->offsets[0] != first) {
        PyErr_Format(PyExc_ValueError, "index offsets do not match the stream: tile 0 starts at %lld, not %lld",
                     (long long)ctx->offsets[0], (long long)first);
        goto done;
    }
    for (int64_t t = 0; t < tiles; t++)
        if (ctx->offsets[t] > tile_end(ctx, t) || ctx->offsets[t] > payload.len) {
            PyErr_Format(PyExc_ValueError, "index offsets do not match the stream: tile %lld starts at %lld, after "
                         "the next tile or the %lld-byte payload", (long long)t, (long long)ctx->offsets[t],
                         (long long)payload.len);
            goto done;
        }
    if (codec_id == 2 && build_decode_table(ctx->payload, ctx->table)) {
        PyErr_SetString(PyExc_ValueError, "huff-v2 code table is corrupted (a length above 12 or an over-subscribed code)");
        goto done;
    }
    size_t scratch = 2 * (TILE * TILE + READ_PAD) + MAX_TILE_BYTES + OVERRUN;
    TileFn fn = codec_id == 2 ? v2_decode_one : v1_decode_one;
    parallel_tiles(fn, ctx, &ctx->err, tiles, threads, n * k, scratch);
    if (ctx->err.failed) {
        PyErr_SetString(PyExc_ValueError, ctx->err.msg);
        goto done;
    }
    if (out_kind == OUT_LINEAR) { /* y[row] = sum over the tile row's tiles, in tile order (deterministic) */
        float *y = (float *)out.buf;
        int64_t n_tc = (k + TILE - 1) / TILE;
        for (int64_t row = 0; row < n; row++) {
            const float *part = ctx->partial + (row / TILE) * n_tc * TILE + row % TILE;
            float sum = 0;
            for (int64_t tc = 0; tc < n_tc; tc++) sum += part[tc * TILE];
            y[row] = sum;
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (ctx) free(ctx->partial);
    free(ctx);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    if (x.buf) PyBuffer_Release(&x);
    return result;
}
