/* Declarations shared by the codec kernels (codec.c: tiles, expansion, products, the decode entry point;
 * codec_huff.c: huff-v2 and bitmap-v1; codec_nibble.c: nibble-v3). The byte formats are documented in
 * the coders of sparsezip/codec, whose numpy code is the source of truth; the tests check these files against it.
 */
#ifndef SPZ_CODEC_H
#define SPZ_CODEC_H

#include <pthread.h>

#include "spz.h"

#define TILE SPZ_TILE
#define GROUP_ROWS 8
#define GROUPS (TILE / GROUP_ROWS)
#define POP8 spz_pop8
#define HUFF_TABLE_SIZE 128 /* huff-v2: one code length per 7-bit symbol */
#define MAX_CODE 12
#define READ_PAD 16 /* bytes past the last compact value that the 16-byte loads may read */
/* Largest valid tile of any coder: header + bitmap + signs + symbol codes + 3-byte exceptions for every value. */
#define MAX_SUB ((GROUP_ROWS * TILE * MAX_CODE + 7) / 8)
#define MAX_TILE_BYTES (4 + 2 * GROUPS + TILE * 16 + TILE * 16 + GROUPS * MAX_SUB + 3 * TILE * TILE)
/* The Huffman reader loads past a substream's end (codec_huff.c). */
#define OVERRUN (TILE * GROUP_ROWS * MAX_CODE / 2 / 8 + 16)
#define SCRATCH_BYTES (2 * (TILE * TILE + READ_PAD) + MAX_TILE_BYTES + OVERRUN)

enum { OUT_F16 = 0, OUT_F32 = 1, OUT_LINEAR = 2 }; /* OUT_LINEAR: y = x W^T, W never written out */

/* ------------------------------------------------------------------ errors and tile-parallel work */

typedef struct {
    pthread_mutex_t mu;
    int failed;
    int64_t tile; /* lowest failing tile, so the message does not depend on thread timing */
    char msg[320];
} ErrState;

void codec_err_init(ErrState *e);
int codec_tile_error(ErrState *e, int64_t tile, const char *fmt, ...);

typedef int (*TileFn)(void *ctx, int64_t tile, void *scratch);
void codec_parallel_tiles(TileFn fn, void *ctx, ErrState *err, int64_t count, int threads, int64_t elements,
                          size_t scratch_bytes);

/* ------------------------------------------------------------------ geometry */

typedef struct {
    int64_t r0, c0;
    int rows, cols, groups, row_bytes, bitmap;
} Geom;

static inline Geom geom_of(int64_t n, int64_t k, int64_t t) {
    int64_t n_tc = (k + TILE - 1) / TILE;
    Geom g;
    g.r0 = (t / n_tc) * TILE;
    g.c0 = (t % n_tc) * TILE;
    g.rows = (int)((n - g.r0) < TILE ? (n - g.r0) : TILE);
    g.cols = (int)((k - g.c0) < TILE ? (k - g.c0) : TILE);
    g.groups = (g.rows + GROUP_ROWS - 1) / GROUP_ROWS;
    g.row_bytes = (g.cols + 7) / 8;
    g.bitmap = g.rows * g.row_bytes;
    return g;
}

static inline int64_t tile_count(int64_t n, int64_t k) { return ((n + TILE - 1) / TILE) * ((k + TILE - 1) / TILE); }

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static inline void wr16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

/* ------------------------------------------------------------------ decoding */

/* Writes one tile row of `cols` outputs from bitmap bytes `bm` and compact values `vals` (which must stay readable
 * READ_PAD bytes past the last value); returns how many values it consumed. */
typedef int (*ExpandFn)(const uint8_t *bm, int cols, const uint16_t *vals, void *out);

typedef struct {
    const uint8_t *payload;
    int64_t payload_len;
    const int64_t *offsets;
    int64_t n, k, tiles;
    uint32_t table[1 << MAX_CODE]; /* huff-v2's decode table */
    uint8_t book[16];              /* nibble-v3's codebook */
    void *out;
    int out_kind;
    int simd; /* the kernel level allows the AVX2 paths */
    int wide; /* and AVX-512 (codec.c's multi-row product, nibble-v3's 64-value decode steps) */
    ExpandFn expand;
    TileFn decode_one;
    const float *x; /* OUT_LINEAR: input [m, k]; each tile's row sums are added into y [m, n] */
    float *y;
    int64_t m;
    ErrState err;
} DecCtx;

static inline int64_t tile_end(const DecCtx *c, int64_t t) {
    return t + 1 < c->tiles ? c->offsets[t + 1] : c->payload_len;
}

/* Bitmap checks shared by all coders: no bits past the last column. Fills the present values of each row
 * (row_cnt[rows]) and of each group of 8 rows (gcnt[GROUPS]); returns the tile's count, or -1 after an error. */
int codec_scan_bitmap(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, int *row_cnt, int *gcnt);

/* The tile's sign bits, one per value: -1 (after an error naming `coder`) when the padding bits are not 0. */
int codec_check_signs(DecCtx *c, int64_t t, const char *coder, int nnz, const uint8_t *signs);

/* ORs the sign bits into the tile's compact values (for coders that do not apply them while decoding). */
void codec_apply_signs(uint16_t *vals, int nnz, const uint8_t *signs);

/* ORs the low bytes (mode 0: raw, mode 1: exception list) into the tile's compact values; -1 after an error. */
int codec_apply_lows(DecCtx *c, int64_t t, const char *coder, uint16_t *vals, int nnz, int mode, int nexc,
                     const uint8_t *lows);

/* Where an encoder's two passes meet: pass 1 (size_tile) fills sizes, pass 2 (write_tile) writes tile t at
 * dst + offsets[t]. Each coder's encoder context holds one. */
typedef struct {
    int64_t *sizes;
    const int64_t *offsets;
    uint8_t *dst;
} EncodeOut;

/* Both passes over the tiles of an [n, k] matrix, the coder's matrix table (table_len bytes) first: returns
 * (bytearray of `prefix` zero bytes + table + tiles, bytes of the int64 tile offsets), or NULL with an exception. */
PyObject *codec_encode_tiles(TileFn size_tile, TileFn write_tile, void *ctx, EncodeOut *out, const uint8_t *table,
                             int64_t table_len, int64_t n, int64_t k, Py_ssize_t prefix, int threads);

/* What happens to a decoded tile: written out (decode) or multiplied with x (fused linear). */
void codec_finish_tile(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, const int *row_cnt,
                       const uint16_t *vals);

/* A validated stream (index offsets checked, coder tables prepared) for decode_one calls; GIL held; NULL with a
 * Python error. The caller frees it. */
DecCtx *codec_open(int codec_id, const uint8_t *payload, Py_ssize_t payload_len, const int64_t *offsets,
                   Py_ssize_t offsets_len, long long n, long long k);
/* y [m, n] = x [m, k] W^T straight from the tiles of an opened stream, on the pool; without the GIL. -1 when a tile
 * is damaged (ctx->err.msg says which). */
int codec_linear(DecCtx *ctx, const float *x, float *y, int64_t m, int threads);

int codec_v1_decode_one(void *ctx, int64_t t, void *scratch);
int codec_v2_decode_one(void *ctx, int64_t t, void *scratch);
int codec_v2_prepare(DecCtx *c); /* builds the decode table; -1 when the code lengths are corrupt */
int codec_v3_decode_one(void *ctx, int64_t t, void *scratch);
int codec_v3_prepare(DecCtx *c); /* checks the codebook; -1 (Python error set) when it is corrupt */

/* ------------------------------------------------------------------ encoding */

/* Writes the bitmap bytes of one row of `cols` values and appends its nonzero values to vals; returns how many it
 * appended (vals needs 8 slots of slack). */
typedef int (*CompactFn)(const uint16_t *src, int cols, uint16_t *vals, uint8_t *bm);
CompactFn codec_compact_fn(void);
int codec_check_shape(long long n, long long k);

#endif
