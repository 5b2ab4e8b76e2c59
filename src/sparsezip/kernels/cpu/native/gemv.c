/* y = x . W^T for fp16 weights and fp32 activations, for the few rows of a decode step, from a dense fp16 matrix
 * or from the runtime's sparse layout.
 *
 * Why: at batch 1 a decoder is bound by the bytes of weight it reads per token. Keeping W in fp16 (as stored)
 * halves those bytes against an fp32 copy, and the sparse layout reads ~6 bits per weight at 50% sparsity after
 * L2 rounding; converting and expanding in registers costs little next to the memory traffic -- as long as the
 * core is never idle waiting on one dependency chain. So at one activation row several tiles of a weight row are
 * multiplied at once (independent accumulators, one sequential stream), and several activation rows reuse each
 * loaded or expanded weight group; when those activations overflow L1, a band of dense weight rows takes each chunk
 * of columns in turn, so that the chunk's activations are read from L1 by all of them.
 *
 * Summation order: spz.h's, which the product straight from codec tiles (codec.c) follows too, so the dense and
 * sparse kernels here and the compressed layout give bit-identical results at a given kernel level.
 *
 * gemv_f16(w, x, y, n, k, m, blocked, threads): w uint16 [n, k] (fp16 bit patterns), x float32 [m, k], y float32
 * [m, n]. A blocked w holds the matrix in column blocks of SPZ_BLOCK_COLS (spz.h), the block of columns [c, c + b)
 * at element c * n as a row-major [n, b] matrix: rows wider than L1 holds in fp32 x then stay one sequential
 * stream whose activations are read from L1 (see spz_gemv_dense).
 *
 * The sparse layout (built by kernels/cpu/gemv.py's pack_sparse, held read-only): per weight row r
 *   codes   uint16 [n, kb], kb = ceil(k / 8): one per group of 8 columns; bits 0-4 = the group's bytes of values
 *           (0 .. 16: redundant, but an AND instead of a table load, and the kernel is bound by loads), bit 5 + j
 *           = column 8g + j is nonzero (bit pattern != 0), bit 13 = the group stores 2-byte values
 *   values  uint8 stream, row r from row_start[r]: for each group in order, its nonzero values in column order,
 *           2 bytes each (the little-endian fp16 pattern) in a wide group, else 1 byte each (the high byte; the
 *           low byte is 0 -- an E5M2 value, what L2 rounding makes); VALUE_PAD readable bytes at the end.
 * A group expands with one pshufb whose control is read at byte offset code of the table (spz.h).
 * sparse_gemv(codes, values, row_start, x, y, n, k, m, threads) and sparse_unpack(..., out, n, k, out_f32,
 * threads), which writes the dense matrix as fp16 or fp32 for the many-row path.
 */
#include "spz.h"

#define TILE SPZ_TILE
#define TILES 4    /* tiles of one sparse row in flight at one activation row: 4 independent FMA chains */
/* The same for a dense row: 2. The dense kernel is bound by the memory stream, not by its FMA chains, and 2 tiles
 * streamed the 1.5B model's matrices faster than 4 (with 4 the sparse kernel, bound by its instructions, ran faster) */
#define DENSE_TILES 2
#define X_BLOCK 8  /* activation rows per pass over a weight row: 8 accumulators fit in registers */
/* Weight rows that take each chunk of columns in turn when the activations overflow L1: a multiple of ROWS_AVX512 */
#define BAND 9
#define ROWS_AVX512 3 /* weight rows per step of the AVX-512 band kernel: 3 x 4 accumulators of 2 activation rows */
#define ROWS_MAX ROWS_AVX512
/* Most activation rows for which the AVX-512 level multiplies sparse rows straight from their layout, again for
 * each pass of X_BLOCK rows (sparse_band_avx512): at 16 rows this ran 1.1x faster than expanding each band once
 * into scratch for all passes, at 32 1.03-1.09x slower and at 64 and 128 1.1-1.25x slower (random 2048 x 2048
 * matrices streamed from memory, 1 thread). */
#define FUSED_MAX_ROWS (2 * X_BLOCK)
#define X_L1_BYTES 32768 /* activations (fp32) up to which every weight row may read all of them from L1 */
#define GROUPS_PER_TURN 4 /* 8-column groups of one dense tile per turn: a 64-byte line of fp16 weights */
/* How far ahead of the AVX2 dense kernel's reads each line is prefetched when 2 or more activation rows share a pass
 * (the AVX-512 bands prefetch the next band instead: Ahead),
 * "non-temporal" so that the weights pass through without pushing x out of L1: on rows wider than L1 holds in fp32 x
 * (k = 8960: 35 KB) x and the weights evicted each other; 4-8 KB was best for both widths. At one activation row the
 * hardware prefetcher alone streams faster (the 1.5B model's matrices, held in huge pages, at 1 and 2 threads). */
#define PREFETCH_BYTES 6144
#define PREFETCH_MIN_ROWS 2
/* How far ahead of a sparse row's chunk its values are prefetched, and how many lines: a chunk of 4 tiles holds about
 * 9 lines of values with fp16 values at 50% and 5 with E5M2 ones. The sparse walk consumes its value stream too
 * slowly and too unevenly for the hardware prefetcher to run ahead: with these prefetches the 1.5B model's matrices,
 * streamed from memory at 1 and 2 activation rows on 1 thread, multiplied 1.1-1.3x faster; the code stream and
 * distances of 1-16 KB gained nothing more. */
#define SPARSE_PREFETCH_BYTES 4096
#define SPARSE_PREFETCH_LINES 8
#define VALUE_PAD 16 /* bytes readable past the last value: a group's values are loaded 16 bytes at a time */

static int64_t tile_cols(int64_t k, int64_t c0) { return k - c0 < TILE ? k - c0 : TILE; }

/* ------------------------------------------------------------------ one weight row, expanded or dense */

typedef struct {
    const uint16_t *code;  /* the row's group codes */
    const uint8_t *v;      /* its next value */
} Cursor;

typedef struct {
    const uint16_t *w;   /* dense: uint16 [n, k] */
    const uint16_t *codes;
    const uint8_t *values;
    const uint32_t *tile_start;
    const int64_t *row_start;
    const float *x;      /* [m, xk]: the job's k columns of each activation row */
    const float *xp;     /* x's rows in pairs for the AVX-512 bands (pair_rows), at the job's first column; or NULL,
                            and those bands are not used */
    float *y;            /* [m, n] */
    int64_t xk;          /* x's row stride: k, or the whole width for one column block of a blocked matrix */
    int acc;             /* add the products to y instead of writing them: a block after the first */
    void *out;           /* unpack: [n, k] fp16 or fp32 */
    int out_f32;
    int64_t n, k, m, kb, tiles;
} Job;

static Cursor row_cursor(const Job *j, int64_t r) {
    return (Cursor){j->codes + r * j->kb, j->values + j->row_start[r]};
}

/* Columns [c0, c0 + cols) of the row as fp16 bit patterns into buf[0 .. cols), column by column. */
static void expand_scalar(Cursor *c, int64_t c0, int64_t cols, uint16_t *buf) {
    for (int64_t i = 0; i < cols; i++) {
        int64_t col = c0 + i;
        const unsigned code = c->code[col >> 3];
        const int set = code >> (5 + (col & 7)) & 1, wide = code >> 13 & 1;
        buf[i] = !set ? 0 : wide ? (uint16_t)(c->v[0] | c->v[1] << 8) : (uint16_t)(c->v[0] << 8);
        c->v += set << wide;
    }
}

/* ------------------------------------------------------------------ portable kernels */

static void dense_rows_portable(const Job *j, int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t b = 0; b < j->m; b++) {
            float total = j->acc ? j->y[b * j->n + r] : 0.0f;
            for (int64_t c0 = 0; c0 < j->k; c0 += TILE)
                total += spz_dot_scalar(j->w + r * j->k + c0, j->x + b * j->xk + c0, tile_cols(j->k, c0));
            j->y[b * j->n + r] = total;
        }
}

static void sparse_rows_portable(const Job *j, int64_t row_begin, int64_t row_end) {
    uint16_t buf[TILE];
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t b = 0; b < j->m; b++) {
            Cursor c = row_cursor(j, r);
            float total = 0.0f;
            for (int64_t c0 = 0; c0 < j->k; c0 += TILE) {
                const int64_t cols = tile_cols(j->k, c0);
                expand_scalar(&c, c0, cols, buf);
                total += spz_dot_scalar(buf, j->x + b * j->xk + c0, cols);
            }
            j->y[b * j->n + r] = total;
        }
}

static void unpack_rows_portable(const Job *j, int64_t row_begin, int64_t row_end) {
    uint16_t buf[TILE];
    for (int64_t r = row_begin; r < row_end; r++) {
        Cursor c = row_cursor(j, r);
        for (int64_t c0 = 0; c0 < j->k; c0 += TILE) {
            const int64_t cols = tile_cols(j->k, c0);
            if (!j->out_f32) {
                expand_scalar(&c, c0, cols, (uint16_t *)j->out + r * j->k + c0);
                continue;
            }
            expand_scalar(&c, c0, cols, buf);
            for (int64_t i = 0; i < cols; i++) ((float *)j->out)[r * j->k + c0 + i] = spz_half(buf[i]);
        }
    }
}

/* ------------------------------------------------------------------ AVX2 kernels */

#ifdef SPZ_X86

/* The 8 columns of a sparse row's group whose code is `code` and whose values start at v (the caller then steps v by
 * code & 31: taking v by address instead made GCC keep the kernel's pointers on the stack). */
AVX2 __m128i expand_group(const uint8_t *v, unsigned code) {
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v),
                            _mm_loadu_si128((const __m128i *)((const uint8_t *)spz_expand_sparse + code)));
}

/* Tile t of row r's cursor: its values start tile_start[r, t] bytes into the row's, so the tiles of a row can be
 * expanded side by side. */
static Cursor tile_cursor(const Job *j, int64_t r, int64_t t) {
    return (Cursor){j->codes + r * j->kb, j->values + j->row_start[r] + j->tile_start[r * j->tiles + t]};
}

/* total[b] += each of the nt tiles' sums (from column c0, `cols` columns each) against activation row b, in tile
 * order: the lanes of acc[i * nb + b] added by spz_hsum8, plus the products of the last cols % 8 columns, whose fp16
 * patterns are `tail` (only a lone tile, nt = 1, has such columns). The shared summation order. */
AVX2 void add_tile_sums(const __m256 *acc, const uint16_t *tail, const float *x, int64_t k, int64_t c0, int64_t cols,
                        const int nt, const int nb, float *total) {
    const int64_t full = cols & ~(int64_t)7;
    for (int i = 0; i < nt; i++) {
        if (nb == X_BLOCK && full == cols) { /* all 8 sums at once */
            _mm256_storeu_ps(total, _mm256_add_ps(_mm256_loadu_ps(total), spz_hsum8x8(acc + i * nb)));
            continue;
        }
        for (int b = 0; b < nb; b++) {
            float sum = spz_hsum8(acc[i * nb + b]);
            if (full < cols) sum += spz_dot_scalar(tail, x + b * k + c0 + full, cols - full);
            total[b] += sum;
        }
    }
}

/* nt consecutive tiles of nr dense weight rows (row r at w + r * wk) from column c0, each `cols` columns (fewer than
 * TILE only when nt is 1), against nb activation rows: nr * nt * nb independent accumulators, row r's sums into
 * total[r]. A cache line (4 groups) of one tile, then of the next: each chain's products stay in column order and
 * the reads stay close to one sequential stream. Turning tiles every group, so that every step touched nt lines,
 * streamed a matrix from memory at two thirds of the speed. Each loaded activation vector feeds nr rows' FMAs.
 * Always inlined with constant nr, nt and nb. */
AVX2 void dense_tiles_avx2(const uint16_t *w, int64_t wk, const float *x, int64_t k, int64_t c0, int64_t cols,
                           const int nr, const int nt, const int nb, float (*total)[X_BLOCK]) {
    const int64_t full = cols & ~(int64_t)7, groups = full >> 3, turns = groups & ~(int64_t)(GROUPS_PER_TURN - 1);
    const uint16_t *wt = w + c0;
    const float *xt = x + c0;
    __m256 acc[ROWS_MAX * TILES * X_BLOCK];
    for (int a = 0; a < nr * nt * nb; a++) acc[a] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += GROUPS_PER_TURN)
        for (int i = 0; i < nt; i++) {
            for (int r = 0; nb >= PREFETCH_MIN_ROWS && r < nr; r++)
                _mm_prefetch((const char *)(wt + r * wk + i * TILE + 8 * g0) + PREFETCH_BYTES, _MM_HINT_NTA);
            for (int64_t g = g0; g < (g0 < turns ? g0 + GROUPS_PER_TURN : groups); g++) {
                __m256 wv[ROWS_MAX];
                for (int r = 0; r < nr; r++)
                    wv[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wt + r * wk + i * TILE + 8 * g)));
                for (int b = 0; b < nb; b++) {
                    const __m256 xv = _mm256_loadu_ps(xt + b * k + i * TILE + 8 * g);
                    for (int r = 0; r < nr; r++)
                        acc[(r * nt + i) * nb + b] = _mm256_fmadd_ps(wv[r], xv, acc[(r * nt + i) * nb + b]);
                }
            }
        }
    for (int r = 0; r < nr; r++)
        add_tile_sums(acc + r * nt * nb, wt + r * wk + full, x, k, c0, cols, nt, nb, total[r]);
}

/* The same from the sparse layout, the tiles expanded through their cursors c[0 .. nt). Here tiles turn every
 * group: the pointer steps of one tile's values then overlap with the other tiles' work. Every operand is a base
 * pointer plus a constant offset per tile and one shared group index, so that a group costs a handful of
 * instructions: the sparse kernel is bound by instructions per group, not by bytes. */
AVX2 void sparse_tiles_avx2(Cursor *c, const float *x, int64_t k, int64_t c0, int64_t cols, const int nt,
                            const int nb, float *total) {
    const int64_t full = cols & ~(int64_t)7;
    const uint16_t *code = c[0].code + (c0 >> 3); /* the tiles of a row share its code array */
    const float *xt = x + c0;
    const uint8_t *v[TILES];
    __m256 acc[TILES * X_BLOCK];
    for (int i = 0; i < nt; i++) v[i] = c[i].v;
    for (int a = 0; a < nt * nb; a++) acc[a] = _mm256_setzero_ps();
    for (int64_t g = 0; g < full >> 3; g++)
        for (int i = 0; i < nt; i++) {
            const unsigned group = code[i * (TILE / 8) + g];
            const __m256 wv = _mm256_cvtph_ps(expand_group(v[i], group));
            v[i] += spz_low_bits(group, 5);
            for (int b = 0; b < nb; b++)
                acc[i * nb + b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xt + b * k + i * TILE + 8 * g), acc[i * nb + b]);
        }
    for (int i = 0; i < nt; i++) c[i].v = v[i];
    uint16_t tail[8];
    if (full < cols) expand_scalar(&c[0], c0 + full, cols - full, tail);
    add_tile_sums(acc, tail, x, k, c0, cols, nt, nb, total);
}

/* One chunk of columns from c0 (nt tiles of `cols` columns; fewer than TILE only when nt is 1) of each of the
 * band's rows in turn, into total[i]. The rows are w (dense: row i at w + i * k, nr rows per step, the rest one by
 * one) or expanded from the sparse layout. Always inlined with constant nr, nt and nb. */
AVX2 void band_chunk_avx2(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, const float *x, int64_t c0,
                          int64_t cols, const int nr, const int nt, const int nb, const int dense,
                          float (*total)[X_BLOCK]) {
    if (dense) {
        int64_t i = 0;
        for (; nr > 1 && i + nr <= rows; i += nr)
            dense_tiles_avx2(w + i * j->k, j->k, x, j->xk, c0, cols, nr, nt, nb, total + i);
        for (; i < rows; i++) dense_tiles_avx2(w + i * j->k, j->k, x, j->xk, c0, cols, 1, nt, nb, total + i);
        return;
    }
    Cursor c[TILES];
    for (int64_t i = 0; i < rows; i++) {
        for (int t = 0; t < nt; t++) c[t] = tile_cursor(j, r0 + i, c0 / TILE + t);
        for (int l = 0; l < SPARSE_PREFETCH_LINES; l++)
            _mm_prefetch((const char *)c[0].v + SPARSE_PREFETCH_BYTES + 64 * l, _MM_HINT_T0);
        sparse_tiles_avx2(c, x, j->xk, c0, cols, nt, nb, total[i]);
    }
}

/* A band's running sums: y's when a previous column block's products are there to add to, else 0. */
static void load_totals(const Job *j, int64_t r0, int64_t rows, int64_t b0, int nb, float (*total)[X_BLOCK]) {
    for (int64_t i = 0; i < rows; i++)
        for (int b = 0; b < nb; b++) total[i][b] = j->acc ? j->y[(b0 + b) * j->n + r0 + i] : 0.0f;
}

static void store_totals(const Job *j, int64_t r0, int64_t rows, int64_t b0, int nb, float (*total)[X_BLOCK]) {
    for (int64_t i = 0; i < rows; i++)
        for (int b = 0; b < nb; b++) j->y[(b0 + b) * j->n + r0 + i] = total[i][b];
}

/* Weight rows r0 .. r0 + rows - 1 against activation rows b0 .. b0 + nb - 1, into y: the columns in chunks of nt
 * tiles (several tiles of a row in flight when nb is small: independent chains), each chunk for every row of the
 * band, so that the chunk's activations are read from L1 by all of them. */
AVX2 void band_avx2(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0, const int nb,
                    const int dense, const int nr) {
    const int tiles = dense ? DENSE_TILES : TILES, nt = nb >= tiles ? 1 : tiles / nb;
    const int64_t k = j->k;
    const float *x = j->x + b0 * j->xk;
    float total[BAND][X_BLOCK];
    load_totals(j, r0, rows, b0, nb, total);
    int64_t c0 = 0;
    for (; c0 + nt * TILE <= k; c0 += nt * TILE)
        band_chunk_avx2(j, w, r0, rows, x, c0, TILE, nr, nt, nb, dense, total);
    for (; c0 < k; c0 += TILE) band_chunk_avx2(j, w, r0, rows, x, c0, tile_cols(k, c0), nr, 1, nb, dense, total);
    store_totals(j, r0, rows, b0, nb, total);
}

/* One contiguous range of the band after this one (a dense band's rows; a sparse band's values, or its codes),
 * prefetched a slice per tile while this band is multiplied. A band walks each of its rows a chunk at a time: BAND
 * (sparse: 2 x BAND) short streams that the hardware prefetcher did not keep up with. With 8 activation rows, 30
 * random 2048 x 2048 sparse matrices streamed from memory at 310 ps per weight without a prefetch, 175-190
 * prefetching each row's next tiles and 120-145 with this one sequential prefetch of the next band; the random 1.2B
 * model's dense linears at 129-132 with each row's lines prefetched 6 KB ahead and 105-107 with this, as fast as
 * from cache (1 thread, `bench/linears.py --rows 8`). */
typedef struct {
    const char *next, *end;
    int64_t step; /* bytes per tile, whole lines */
} Ahead;

static Ahead ahead_of(const void *begin, const void *end, int64_t k) {
    const int64_t tiles = (k + TILE - 1) / TILE, bytes = (const char *)end - (const char *)begin;
    return (Ahead){begin, end, (bytes / tiles + 64) & ~(int64_t)63};
}

static void prefetch_tiles(Ahead *a, int64_t tiles) {
    const char *stop = a->next + tiles * a->step < a->end ? a->next + tiles * a->step : a->end;
    for (; a->next < stop; a->next += 64) _mm_prefetch(a->next, _MM_HINT_T0);
}

/* dense_tiles_avx2 with 512-bit vectors, each carrying two activation rows: lanes 0-7 row b, lanes 8-15 row b + 1,
 * read from x's copy in pairs (pair_rows), the weight group's 8 columns converted into both halves. Every lane
 * accumulates the same products in the same order as its 256-bit twin, so the sums are bit for bit AVX2's, with half
 * the FMA and conversion instructions: where the FMA units are 512 bits wide (AMD Zen 5) a batch's arithmetic takes
 * half the cycles; AMD Zen 4 splits each 512-bit FMA in two (the like change to the compressed product measured no
 * gain there, and no loss). An odd last row leaves its pair's upper half zero. Always inlined with constant nr, nt and
 * nb. */
AVX512 void dense_tiles_avx512(const uint16_t *w, int64_t wk, const float *x, const float *xp, int64_t k, int64_t c0,
                               int64_t cols, const int nr, const int nt, const int nb, float (*total)[X_BLOCK]) {
    const int np = (nb + 1) / 2;
    const int64_t full = cols & ~(int64_t)7, groups = full >> 3, turns = groups & ~(int64_t)(GROUPS_PER_TURN - 1);
    const uint16_t *wt = w + c0;
    const float *xt = xp + 2 * c0;
    __m512 acc[ROWS_MAX * DENSE_TILES * X_BLOCK / 2];
    for (int a = 0; a < nr * nt * np; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += GROUPS_PER_TURN)
        for (int i = 0; i < nt; i++) {
            for (int64_t g = g0; g < (g0 < turns ? g0 + GROUPS_PER_TURN : groups); g++) {
                __m512 wv[ROWS_MAX];
                for (int r = 0; r < nr; r++)
                    wv[r] = _mm512_cvtph_ps(_mm256_broadcastsi128_si256(
                        _mm_loadu_si128((const __m128i *)(wt + r * wk + i * TILE + 8 * g))));
                for (int p = 0; p < np; p++) {
                    __m512 xv = _mm512_loadu_ps(xt + 2 * (p * k + i * TILE + 8 * g));
                    __asm__("" : "+v"(xv)); /* one load per vector, not one folded into each row's FMA */
                    for (int r = 0; r < nr; r++)
                        acc[(r * nt + i) * np + p] = _mm512_fmadd_ps(wv[r], xv, acc[(r * nt + i) * np + p]);
                }
            }
        }
    for (int r = 0; r < nr; r++) {
        if (nb == X_BLOCK && full == cols) { /* nt is 1 */
            _mm256_storeu_ps(total[r], _mm256_add_ps(_mm256_loadu_ps(total[r]), spz_hsum8x8_pairs(acc + r * np)));
            continue;
        }
        __m256 halves[DENSE_TILES * X_BLOCK];
        for (int i = 0; i < nt; i++)
            for (int b = 0; b < nb; b++) {
                const __m512 pair = acc[(r * nt + i) * np + b / 2];
                halves[i * nb + b] = b % 2 ? spz_upper_half(pair) : _mm512_castps512_ps256(pair);
            }
        add_tile_sums(halves, wt + r * wk + full, x, k, c0, cols, nt, nb, total[r]);
    }
}

/* band_avx2 for the AVX-512 level's dense bands: its chunks through dense_tiles_avx512, ROWS_AVX512 rows at a time. */
AVX512 void dense_band_avx512(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0, const int nb) {
    const int nt = nb >= DENSE_TILES ? 1 : DENSE_TILES / nb;
    const int64_t k = j->k;
    const float *x = j->x + b0 * j->xk, *xp = j->xp + b0 * j->xk; /* b0 is even: pair b0 / 2, 2 xk floats each */
    float total[BAND][X_BLOCK];
    load_totals(j, r0, rows, b0, nb, total);
    /* the next band's rows follow these in the matrix (not in a sparse band's scratch: nothing to prefetch there) */
    const int64_t after = w == j->w + r0 * k ? (r0 + 2 * rows < j->n ? r0 + 2 * rows : j->n) : r0 + rows;
    Ahead weights = ahead_of(w + rows * k, w + (after - r0) * k, k);
    for (int64_t c0 = 0; c0 < k;) {
        const int whole = c0 + nt * TILE <= k; /* a chunk of nt whole tiles, else one tile (maybe partial) */
        const int64_t cols = whole ? TILE : tile_cols(k, c0);
        int64_t i = 0;
        prefetch_tiles(&weights, whole ? nt : 1);
        for (; i + ROWS_AVX512 <= rows; i += ROWS_AVX512)
            if (whole) dense_tiles_avx512(w + i * k, k, x, xp, j->xk, c0, cols, ROWS_AVX512, nt, nb, total + i);
            else dense_tiles_avx512(w + i * k, k, x, xp, j->xk, c0, cols, ROWS_AVX512, 1, nb, total + i);
        for (; i < rows; i++)
            if (whole) dense_tiles_avx512(w + i * k, k, x, xp, j->xk, c0, cols, 1, nt, nb, total + i);
            else dense_tiles_avx512(w + i * k, k, x, xp, j->xk, c0, cols, 1, 1, nb, total + i);
        c0 += whole ? nt * TILE : cols;
    }
    store_totals(j, r0, rows, b0, nb, total);
}

/* dense_tiles_avx512 for one tile of nr sparse rows from row r0, each group expanded in registers into both halves
 * of a 256-bit vector (its values and its pshufb control each loaded into both 128-bit lanes, one lane-wise
 * shuffle) and converted into both halves of a 512-bit one, then multiplied by nb activation rows in pairs: each
 * lane accumulates the same products in the same order as the AVX2 walk's, so the sums are bit for bit AVX2's. The
 * batch's FMAs then hide most of the expansion, where the AVX2 level expands a band into scratch first. Always
 * inlined with constant nr and nb. */
AVX512 void sparse_tiles_avx512(const Job *j, int64_t r0, const float *x, const float *xp, int64_t c0, int64_t cols,
                                const int nr, const int nb, float (*total)[X_BLOCK]) {
    const int np = (nb + 1) / 2;
    const int64_t full = cols & ~(int64_t)7, k = j->xk;
    const uint8_t *table = (const uint8_t *)spz_expand_sparse;
    const float *xt = xp + 2 * c0;
    Cursor c[ROWS_MAX];
    const uint8_t *v[ROWS_MAX];
    __m512 acc[ROWS_MAX * X_BLOCK / 2];
    for (int i = 0; i < nr; i++) {
        c[i] = tile_cursor(j, r0 + i, c0 / TILE);
        c[i].code += c0 >> 3;
        v[i] = c[i].v;
    }
    for (int a = 0; a < nr * np; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t g = 0; g < full >> 3; g++) {
        __m512 wv[ROWS_MAX];
        for (int i = 0; i < nr; i++) {
            const unsigned code = c[i].code[g];
            wv[i] = _mm512_cvtph_ps(_mm256_shuffle_epi8(
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)v[i])),
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + code)))));
            v[i] += spz_low_bits(code, 5);
        }
        for (int p = 0; p < np; p++) {
            __m512 xv = _mm512_loadu_ps(xt + 2 * (p * k + 8 * g));
            __asm__("" : "+v"(xv)); /* one load per vector, not one folded into each row's FMA */
            for (int i = 0; i < nr; i++) acc[i * np + p] = _mm512_fmadd_ps(wv[i], xv, acc[i * np + p]);
        }
    }
    for (int i = 0; i < nr; i++) {
        if (nb == X_BLOCK && full == cols) {
            _mm256_storeu_ps(total[i], _mm256_add_ps(_mm256_loadu_ps(total[i]), spz_hsum8x8_pairs(acc + i * np)));
            continue;
        }
        __m256 halves[X_BLOCK];
        uint16_t tail[8];
        for (int b = 0; b < nb; b++)
            halves[b] = b % 2 ? spz_upper_half(acc[i * np + b / 2]) : _mm512_castps512_ps256(acc[i * np + b / 2]);
        c[i].v = v[i];
        if (full < cols) expand_scalar(&c[i], full, cols - full, tail);
        add_tile_sums(halves, tail, x, k, c0, cols, 1, nb, total[i]);
    }
}

/* dense_band_avx512 for sparse rows: tile by tile, each for every row of the band, ROWS_AVX512 rows at a time. */
AVX512 void sparse_band_avx512(const Job *j, int64_t r0, int64_t rows, int64_t b0, const int nb) {
    const float *x = j->x + b0 * j->xk, *xp = j->xp + b0 * j->xk;
    float total[BAND][X_BLOCK];
    load_totals(j, r0, rows, b0, nb, total);
    const int64_t next = r0 + rows, after = next + rows < j->n ? next + rows : j->n;
    Ahead values = ahead_of(j->values + j->row_start[next], j->values + j->row_start[after], j->k);
    Ahead codes = ahead_of(j->codes + next * j->kb, j->codes + after * j->kb, j->k);
    for (int64_t c0 = 0; c0 < j->k; c0 += TILE) {
        const int64_t cols = tile_cols(j->k, c0);
        int64_t i = 0;
        prefetch_tiles(&values, 1);
        prefetch_tiles(&codes, 1);
        for (; i + ROWS_AVX512 <= rows; i += ROWS_AVX512)
            sparse_tiles_avx512(j, r0 + i, x, xp, c0, cols, ROWS_AVX512, nb, total + i);
        for (; i < rows; i++) sparse_tiles_avx512(j, r0 + i, x, xp, c0, cols, 1, nb, total + i);
    }
    store_totals(j, r0, rows, b0, nb, total);
}

/* band_avx2 for each constant nb and kind, each its own function: inlined all into one, the register allocator
 * kept the sparse kernel's pointers on the stack. A band of one row (every sparse one) is compiled as such: with a
 * loop over the band's rows around it, the one-row kernel took about 7% more instructions (callgrind). The AVX-512
 * level's dense bands (dense_band_avx512) hold the accumulators of ROWS_AVX512 weight rows at once in its 32 vector
 * registers, so each loaded activation vector feeds 3 rows' FMAs instead of 1 (with AVX2's 16 registers 2 rows ran
 * slower than 1), each FMA for two activation rows. */
typedef void (*BandFn)(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0);
#define BAND_FNS(NB)                                                                                                 \
    __attribute__((target(SPZ_TARGET_AVX2), noinline)) static void dense_band##NB(                                   \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        if (rows == 1) band_avx2(j, w, r0, 1, b0, NB, 1, 1);                                                         \
        else band_avx2(j, w, r0, rows, b0, NB, 1, 1);                                                                \
    }                                                                                                                \
    __attribute__((target(SPZ_TARGET_AVX512), noinline)) static void dense_band_avx512_##NB(                         \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        dense_band_avx512(j, w, r0, rows, b0, NB);                                                                   \
    }                                                                                                                \
    __attribute__((target(SPZ_TARGET_AVX2), noinline)) static void sparse_band##NB(                                  \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        for (int64_t i = 0; i < rows; i++) band_avx2(j, w, r0 + i, 1, b0, NB, 0, 1);                                 \
    }                                                                                                                \
    __attribute__((target(SPZ_TARGET_AVX512), noinline)) static void sparse_band_avx512_##NB(                        \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        (void)w;                                                                                                     \
        sparse_band_avx512(j, r0, rows, b0, NB);                                                                     \
    }
BAND_FNS(1)
BAND_FNS(2)
BAND_FNS(3)
BAND_FNS(4)
BAND_FNS(5)
BAND_FNS(6)
BAND_FNS(7)
BAND_FNS(8)
static const BandFn DENSE_BANDS[X_BLOCK + 1] = {NULL, dense_band1, dense_band2, dense_band3, dense_band4,
                                                dense_band5, dense_band6, dense_band7, dense_band8};
static const BandFn DENSE_BANDS_AVX512[X_BLOCK + 1] = {
    NULL, dense_band_avx512_1, dense_band_avx512_2, dense_band_avx512_3, dense_band_avx512_4,
    dense_band_avx512_5, dense_band_avx512_6, dense_band_avx512_7, dense_band_avx512_8};
static const BandFn SPARSE_BANDS[X_BLOCK + 1] = {NULL, sparse_band1, sparse_band2, sparse_band3, sparse_band4,
                                                 sparse_band5, sparse_band6, sparse_band7, sparse_band8};
static const BandFn SPARSE_BANDS_AVX512[X_BLOCK + 1] = {
    NULL, sparse_band_avx512_1, sparse_band_avx512_2, sparse_band_avx512_3, sparse_band_avx512_4,
    sparse_band_avx512_5, sparse_band_avx512_6, sparse_band_avx512_7, sparse_band_avx512_8};

/* Sparse row r as k fp16 patterns into out. */
AVX2 void expand_row_avx2(const Job *j, int64_t r, uint16_t *out) {
    const int64_t full = j->k & ~(int64_t)7;
    Cursor c = row_cursor(j, r);
    for (int64_t col = 0; col < full; col += 8) {
        _mm_storeu_si128((__m128i *)(out + col), expand_group(c.v, c.code[col >> 3]));
        c.v += spz_low_bits(c.code[col >> 3], 5);
    }
    if (full < j->k) expand_scalar(&c, full, j->k - full, out + full);
}

/* Every activation row against weight rows [row_begin, row_end), in bands of weight rows. Dense rows against 4 or
 * more activation rows that overflow L1 go BAND rows at a time, each chunk of columns for all of them before the
 * next: one row at a time, every weight row read all the activations from L2 (8 rows of k = 1536 are 48 KB), and at
 * 8 rows the kernel ran a fifth slower. Fewer activation rows, and sparse rows against fewer than 8, go one row at a
 * time: one sequential stream, which the memory system serves best (the sparse kernel ran slower banded straight from
 * its layout at every row count, at one activation row with two weight rows side by side, and with a wide row's
 * columns in L1-sized spans over 16 rows, though x then stays in L1). With more activation rows than a pass takes
 * (a prefill), or one full pass that overflows L1 (a batch of 8), a sparse band is expanded once into this thread's
 * scratch and multiplied as dense rows: the expansion is not repeated for every pass, and the band reads its
 * activations from L1 (at 8 rows this ran 1.03-1.18x faster than the one-row walk, though it executes a fifth more
 * instructions; even at 6 rows, slower at 4; at 8 rows that fit in L1, 0.92-0.97x). At the AVX-512 level, sparse
 * rows against 4 to FUSED_MAX_ROWS activation rows go BAND rows at a time straight from their layout instead
 * (sparse_band_avx512): with each FMA carrying two activation rows, expanding in registers costs less than the
 * scratch's stores and loads (against the expanded band, 1.1-1.3x at 4 to 8 rows and 1.4-1.6x at 8 with E5M2 values,
 * 2x with fp16 ones, streamed from memory at 1 thread). */
AVX2 void rows_avx2(const Job *j, int64_t row_begin, int64_t row_end, const int dense) {
    const int overflow = j->m * j->k * (int64_t)sizeof(float) > X_L1_BYTES;
    /* Expanding pays when several passes reuse it, or when one pass's band then reads x from L1. */
    const int fused = !dense && j->xp && j->m <= FUSED_MAX_ROWS;
    const int expand = !dense && !fused && (j->m > X_BLOCK || (j->m == X_BLOCK && overflow));
    const int64_t band = fused || ((dense || expand) && j->m >= X_BLOCK / 2 && overflow) ? BAND : 1;
    uint16_t *expanded = expand ? spz_scratch((size_t)(band * j->k) * sizeof(uint16_t)) : NULL;
    const BandFn *bands = fused                                    ? SPARSE_BANDS_AVX512
                          : !dense && !expanded                    ? SPARSE_BANDS
                          : band > 1 && j->xp                      ? DENSE_BANDS_AVX512
                                                                  : DENSE_BANDS;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += band) {
        const int64_t rows = row_end - r0 < band ? row_end - r0 : band;
        const uint16_t *w = dense ? j->w + r0 * j->k : expanded;
        for (int64_t i = 0; expanded && i < rows; i++) expand_row_avx2(j, r0 + i, expanded + i * j->k);
        for (int64_t b0 = 0; b0 < j->m; b0 += X_BLOCK) {
            const int nb = j->m - b0 < X_BLOCK ? (int)(j->m - b0) : X_BLOCK;
            bands[nb](j, w, r0, rows, b0);
        }
    }
}

__attribute__((target(SPZ_TARGET_AVX2))) static void dense_rows_avx2(const Job *j, int64_t row_begin,
                                                                     int64_t row_end) {
    rows_avx2(j, row_begin, row_end, 1);
}

__attribute__((target(SPZ_TARGET_AVX2))) static void sparse_rows_avx2(const Job *j, int64_t row_begin,
                                                                      int64_t row_end) {
    rows_avx2(j, row_begin, row_end, 0);
}

/* The dense matrix of rows [row_begin, row_end): 8 columns per pshufb, converted to fp32 when asked. */
__attribute__((target(SPZ_TARGET_AVX2))) static void unpack_rows_avx2(const Job *j, int64_t row_begin,
                                                                      int64_t row_end) {
    const int64_t full = j->k & ~(int64_t)7;
    for (int64_t r = row_begin; r < row_end; r++) {
        if (!j->out_f32) {
            expand_row_avx2(j, r, (uint16_t *)j->out + r * j->k);
            continue;
        }
        Cursor c = row_cursor(j, r);
        for (int64_t col = 0; col < full; col += 8) {
            _mm256_storeu_ps((float *)j->out + r * j->k + col, _mm256_cvtph_ps(expand_group(c.v, c.code[col >> 3])));
            c.v += spz_low_bits(c.code[col >> 3], 5);
        }
        if (full < j->k) {
            uint16_t tail[8];
            expand_scalar(&c, full, j->k - full, tail);
            for (int64_t i = 0; i < j->k - full; i++) ((float *)j->out)[r * j->k + full + i] = spz_half(tail[i]);
        }
    }
}
#endif

/* ------------------------------------------------------------------ dispatch and Python entry points */

typedef void (*RowsFn)(const Job *j, int64_t row_begin, int64_t row_end);

typedef struct {
    const Job *job;
    RowsFn rows;
} Part;

static void run_part(void *ctx, int part, int parts) {
    const Part *p = (const Part *)ctx;
    const int64_t n = p->job->n;
    p->rows(p->job, spz_part_begin(n, part, parts), spz_part_begin(n, part + 1, parts));
}

static RowsFn pick(RowsFn portable, RowsFn avx2) {
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) return avx2;
#endif
    (void)avx2;
    return portable;
}

/* On the pool; without the GIL when called from a Python entry point. */
static void run_rows(const Job *j, RowsFn portable, RowsFn avx2, int threads) {
    Part part = {j, pick(portable, avx2)};
    if (threads > j->n) threads = (int)j->n;
    spz_run_parts(run_part, &part, threads < 1 ? 1 : threads);
}

#ifndef SPZ_X86
#define dense_rows_avx2 dense_rows_portable
#define sparse_rows_avx2 sparse_rows_portable
#define unpack_rows_avx2 unpack_rows_portable
#endif

/* x [m, k] copied as rows in pairs for the AVX-512 bands, dense and sparse: pair p holds, for each whole group g of
 * 8 columns, row 2p's 8 values then row 2p + 1's (zeros for an odd m's last pair), 16 floats at 2 * (p * k + 8 * g),
 * so that one 512-bit load gives both rows' group. NULL when those bands cannot run here (or out of memory: the AVX2
 * bands, bit-identical, run instead); free() it after the call. */
static float *pair_rows(const float *x, int64_t m, int64_t k) {
    if (spz_level() < SPZ_AVX512 || m < X_BLOCK / 2) return NULL;
    float *xp = malloc((size_t)((m + 1) / 2 * 2 * k) * sizeof(float));
    for (int64_t p = 0; xp && p < (m + 1) / 2; p++)
        for (int64_t c = 0; c + 8 <= k; c += 8)
            for (int half = 0; half < 2; half++) {
                float *dst = xp + 2 * (p * k + c) + 8 * half;
                if (2 * p + half < m) memcpy(dst, x + (2 * p + half) * k + c, 8 * sizeof(float));
                else memset(dst, 0, 8 * sizeof(float));
            }
    return xp;
}

/* A blocked matrix goes one column block at a time, each block's products added to the previous blocks' in y:
 * every row's tile sums are still added in column order, so the floats are those of the row-major matrix. Read row
 * by row, a row wider than L1 holds in fp32 x made every x load miss L1 (k = 8960: 35 KB), and the fp16 matrix
 * streamed at less than half the speed of a narrow one on an AMD Zen 4 (32 KB of L1 data); going through the rows
 * block by block in the same row-major order, one column range at a time, broke the single stream and was slower
 * still; blocks stored one after the other keep it. */
void spz_gemv_dense(const uint16_t *w, const float *x, float *y, int64_t n, int64_t k, int64_t m, int blocked,
                    int threads) {
    const int64_t width = blocked ? SPZ_BLOCK_COLS : k;
    float *xp = pair_rows(x, m, k);
    for (int64_t c = 0; c < k; c += width) {
        const int64_t cols = k - c < width ? k - c : width;
        Job job = {.w = w + c * n, .x = x + c, .xp = xp ? xp + 2 * c : NULL, .y = y, .n = n, .k = cols, .m = m,
                   .xk = k, .acc = c > 0};
        run_rows(&job, dense_rows_portable, dense_rows_avx2, threads);
    }
    free(xp);
}

void spz_gemv_sparse(const SpzSparse *s, const float *x, float *y, int64_t m, int threads) {
    Job job = {.codes = s->codes, .values = s->values, .row_start = s->row_start, .tile_start = s->tile_start,
               .x = x, .xp = pair_rows(x, m, s->k), .y = y, .n = s->n, .k = s->k, .m = m, .kb = (s->k + 7) / 8,
               .tiles = (s->k + TILE - 1) / TILE, .xk = s->k};
    run_rows(&job, sparse_rows_portable, sparse_rows_avx2, threads);
    free((float *)job.xp);
}

PyObject *spz_py_gemv_f16(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer w, x, y;
    long long n, k, m;
    int threads, blocked;
    if (!PyArg_ParseTuple(args, "y*y*w*LLLpi", &w, &x, &y, &n, &k, &m, &blocked, &threads)) return NULL;
    PyObject *result = NULL;
    if (n < 1 || k < 1 || m < 1 || w.len != n * k * 2 || x.len != m * k * 4 || y.len != m * n * 4) {
        PyErr_SetString(PyExc_ValueError, "gemv_f16: buffer sizes do not match n, k, m");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    spz_gemv_dense(w.buf, x.buf, y.buf, n, k, m, blocked, threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return result;
}

int spz_sparse_check(const SpzSparse *s, Py_ssize_t codes_len, Py_ssize_t values_len, Py_ssize_t row_start_len,
                     Py_ssize_t tile_start_len) {
    if (s->n < 1 || s->k < 1 || s->k > INT32_MAX || codes_len != s->n * ((s->k + 7) / 8) * 2 ||
        row_start_len != (s->n + 1) * 8 || tile_start_len != s->n * ((s->k + TILE - 1) / TILE) * 4) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: array sizes do not match the shape");
        return -1;
    }
    if (s->row_start[0] != 0 || s->row_start[s->n] < 0 || s->row_start[s->n] > 2 * s->n * s->k ||
        s->row_start[s->n] + VALUE_PAD > values_len) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: the value stream is too short for its row offsets");
        return -1;
    }
    return 0;
}

/* sparse_gemv(codes, values, row_start, tile_start, x, y, n, k, m, threads)
 * sparse_unpack(codes, values, row_start, tile_start, out, n, k, out_f32, threads) */
static PyObject *sparse_call(PyObject *args, int unpack) {
    Py_buffer b[4], x = {0}, y = {0};
    int threads, out_f32 = 0;
    long long n, k, m = 1;
    int ok = unpack ? PyArg_ParseTuple(args, "y*y*y*y*w*LLpi", &b[0], &b[1], &b[2], &b[3], &y, &n, &k, &out_f32,
                                       &threads)
                    : PyArg_ParseTuple(args, "y*y*y*y*y*w*LLLi", &b[0], &b[1], &b[2], &b[3], &x, &y, &n, &k, &m,
                                       &threads);
    if (!ok) return NULL;
    PyObject *result = NULL;
    Job job = {.codes = b[0].buf, .values = b[1].buf, .row_start = b[2].buf, .tile_start = b[3].buf, .x = x.buf,
               .y = unpack ? NULL : y.buf, .out = unpack ? y.buf : NULL, .out_f32 = out_f32, .n = n, .k = k, .m = m,
               .kb = (k + 7) / 8, .tiles = (k + TILE - 1) / TILE, .xk = k};
    const SpzSparse sparse = {b[0].buf, b[1].buf, b[2].buf, b[3].buf, n, k};
    if (spz_sparse_check(&sparse, b[0].len, b[1].len, b[2].len, b[3].len)) goto done;
    if (m < 1 || (unpack && y.len != n * k * (out_f32 ? 4 : 2)) || (!unpack && (x.len != m * k * 4 || y.len != m * n * 4))) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: input or output buffer does not match n, k, m");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (unpack) run_rows(&job, unpack_rows_portable, unpack_rows_avx2, threads);
    else spz_gemv_sparse(&sparse, x.buf, y.buf, m, threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < 4; i++) PyBuffer_Release(&b[i]);
    if (!unpack) PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return result;
}

PyObject *spz_py_sparse_gemv(PyObject *self, PyObject *args) {
    (void)self;
    return sparse_call(args, 0);
}

PyObject *spz_py_sparse_unpack(PyObject *self, PyObject *args) {
    (void)self;
    return sparse_call(args, 1);
}
