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
 * The sparse layout (built by kernels/cpu/gemv.py's pack_sparse, held read-only): each weight row r goes in chunks
 * of CHUNK_TILES tiles (CHUNK columns; the last chunk holds what is left, its last tile maybe partial), and a chunk
 * interleaves its nt tiles' groups of 8 columns, group-major -- the order in which a walk with one accumulator per
 * tile takes them:
 *   codes       uint8 [n, 16 * tiles]: chunk c's bitmap bytes from 64 c, group g of its tile i at g * nt + i (bit j =
 *               column 8g + j is nonzero, i.e. its bit pattern != 0; 0 for a group past the row's end)
 *   values      uint8 stream, row r from row_start[r], chunk c from the low 48 bits of chunk_start[r, c] past it:
 *               the groups' nonzero values in the codes' order; the groups g of a chunk's tiles (its chunk group g)
 *               store 2 bytes a value (the little-endian fp16 pattern) when bit 48 + g of chunk_start[r, c] is set
 *               (a wide chunk group), else 1 byte a value (the high byte; the low byte is 0 -- an E5M2 value, what
 *               L2 rounding makes); VALUE_PAD readable bytes at the end.
 * So a group expands with one pshufb through spz_expand_sparse[wide][bitmap], and a whole chunk group, whose
 * bitmaps are one 32-bit load and whose values are contiguous, with one AVX-512 byte expansion.
 * sparse_gemv(codes, values, row_start, chunk_start, x, y, n, k, m, threads) and sparse_unpack(..., out, n, k,
 * out_f32, threads), which writes the dense matrix as fp16 or fp32 for the many-row path.
 */
#include "spz.h"

#define TILE SPZ_TILE
#define CHUNK_TILES 4 /* tiles of a sparse row's chunk, whose groups the layout interleaves: 4 independent FMA chains */
#define CHUNK (CHUNK_TILES * TILE)
#define GROUPS_PER_TILE (TILE / 8)
#define WIDE_SHIFT 48 /* chunk_start bit 48 + g: the chunk's group g is wide */
/* Tiles of a dense row in flight at one activation row: 2. The dense kernel is bound by the memory stream, not by its
 * FMA chains, and 2 tiles streamed the 1.5B model's matrices faster than 4 */
#define DENSE_TILES 2
#define X_BLOCK 8  /* activation rows per pass over a weight row: 8 accumulators fit in registers */
/* Weight rows that take each chunk of columns in turn when the activations overflow L1: a multiple of ROWS_AVX512 */
#define BAND 9
#define ROWS_AVX512 3 /* weight rows per step of the AVX-512 band kernel: 3 x 4 accumulators of 2 activation rows */
#define ROWS_MAX ROWS_AVX512
/* Most activation rows for which the AVX-512 level multiplies sparse rows straight from their layout
 * (sparse_band_avx512, every activation row 2 FMAs per chunk group): against expanding each band into scratch, 1.25x
 * faster at 2 and 4 rows, at 8 1.25x slower (random 2048 x 2048 matrices, 1 thread). */
#define FUSED_MAX_ROWS 4
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
#define VALUE_PAD 64 /* bytes readable past the last value: the AVX-512 walk loads a chunk group's 64 bytes at a time */
/* How far ahead of the AVX-512 walk's two rows each row's values are prefetched (every other group of the chunk):
 * two interleaved streams that the hardware prefetcher did not keep up with (a scratch loop over 32768 random 50%
 * rows of 2048 columns streamed at 0.72 ns per group of 8 without, 0.50 at 1 KB, 0.31 at 4 KB, 0.30 from cache).
 * Rows longer than that distance start unfetched, so the walk also prefetches the next two rows as one range: 6144
 * rows of 5632 columns streamed at 0.67-0.71 ns a group with the distance alone, 0.37-0.42 with both. */
#define PAIR_PREFETCH_BYTES 4096

static int64_t tile_cols(int64_t k, int64_t c0) { return k - c0 < TILE ? k - c0 : TILE; }

/* ------------------------------------------------------------------ one weight row, expanded or dense */

typedef struct {
    const uint16_t *w;   /* dense: uint16 [n, k] */
    const uint8_t *codes;
    const uint8_t *values;
    const uint64_t *chunk_start;
    const int64_t *row_start;
    const float *x;      /* [m, xk]: the job's k columns of each activation row */
    const float *xp;     /* x's rows in pairs for the AVX-512 bands (pair_rows), at the job's first column; or NULL,
                            and those bands are not used */
    const float *xq;     /* one activation row in whole chunks' order for the AVX-512 walk (chunk_order_x); or NULL */
    float *y;            /* [m, n] */
    int64_t xk;          /* x's row stride: k, or the whole width for one column block of a blocked matrix */
    int acc;             /* add the products to y instead of writing them: a block after the first */
    void *out;           /* unpack: [n, k] fp16 or fp32 */
    int out_f32;
    int64_t n, k, m, tiles, chunks;
} Job;

/* One chunk of a sparse row. */
typedef struct {
    const uint8_t *mask; /* its bitmap bytes: group g of tile i at mask[g * nt + i] */
    const uint8_t *v;    /* its first value */
    int nt;              /* its tiles */
    unsigned wides;      /* bit g: its group g stores 2 bytes per value, else 1 */
    int64_t cols;        /* its columns */
} Chunk;

static Chunk chunk_of(const Job *j, int64_t r, int64_t c) {
    const uint64_t start = j->chunk_start[r * j->chunks + c];
    const int64_t t0 = c * CHUNK_TILES;
    return (Chunk){j->codes + (r * j->tiles + t0) * GROUPS_PER_TILE,
                   j->values + j->row_start[r] + (int64_t)(start & ((1ULL << WIDE_SHIFT) - 1)),
                   (int)(j->tiles - t0 < CHUNK_TILES ? j->tiles - t0 : CHUNK_TILES), (unsigned)(start >> WIDE_SHIFT),
                   j->k - c * CHUNK < CHUNK ? j->k - c * CHUNK : CHUNK};
}

/* The first `cols` (1..8) columns of a group with bitmap m, its values at v, as fp16 patterns into out; returns the
 * bytes of values it took (the bitmap has no bits past the row's end). */
static int expand_group_scalar(const uint8_t *v, unsigned m, int wide, int cols, uint16_t *out) {
    int used = 0;
    for (int b = 0; b < cols; b++) {
        const int set = m >> b & 1;
        out[b] = !set ? 0 : wide ? (uint16_t)(v[used] | v[used + 1] << 8) : (uint16_t)(v[used] << 8);
        used += set << wide;
    }
    return used;
}

/* The chunk's columns as fp16 patterns into out[0 .. ch.cols). */
static void expand_chunk_scalar(Chunk ch, uint16_t *out) {
    const uint8_t *v = ch.v;
    for (int g = 0; g < GROUPS_PER_TILE; g++)
        for (int i = 0; i < ch.nt; i++) {
            const int64_t col = i * TILE + 8 * g;
            if (col < ch.cols)
                v += expand_group_scalar(v, ch.mask[g * ch.nt + i], ch.wides >> g & 1,
                                         ch.cols - col < 8 ? (int)(ch.cols - col) : 8, out + col);
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
    uint16_t buf[CHUNK];
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t b = 0; b < j->m; b++) {
            float total = 0.0f;
            for (int64_t c = 0; c < j->chunks; c++) {
                const Chunk ch = chunk_of(j, r, c);
                expand_chunk_scalar(ch, buf);
                for (int i = 0; i < ch.nt; i++)
                    total += spz_dot_scalar(buf + i * TILE, j->x + b * j->xk + c * CHUNK + i * TILE,
                                            tile_cols(ch.cols, i * TILE));
            }
            j->y[b * j->n + r] = total;
        }
}

static void unpack_rows_portable(const Job *j, int64_t row_begin, int64_t row_end) {
    uint16_t buf[CHUNK];
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t c = 0; c < j->chunks; c++) {
            const Chunk ch = chunk_of(j, r, c);
            const int64_t at = r * j->k + c * CHUNK;
            expand_chunk_scalar(ch, buf);
            for (int64_t i = 0; i < ch.cols; i++)
                if (j->out_f32) ((float *)j->out)[at + i] = spz_half(buf[i]);
                else ((uint16_t *)j->out)[at + i] = buf[i];
        }
}

/* ------------------------------------------------------------------ AVX2 kernels */

#ifdef SPZ_X86

/* The 8 columns of a group with bitmap m whose values start at v, as fp16 patterns; table = spz_expand_sparse[wide]. */
AVX2 __m128i expand_group(const uint8_t *v, const uint8_t *table, unsigned m) {
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v),
                            _mm_load_si128((const __m128i *)(table + spz_shift_left(m, 4))));
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
    __m256 acc[ROWS_MAX * DENSE_TILES * X_BLOCK];
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

/* One chunk of columns from c0 (nt tiles of `cols` columns; fewer than TILE only when nt is 1) of each of the
 * band's dense rows (row i at w + i * k) in turn, nr rows per step and the rest one by one, into total[i]. Always
 * inlined with constant nr, nt and nb. */
AVX2 void band_chunk_avx2(const Job *j, const uint16_t *w, int64_t rows, const float *x, int64_t c0, int64_t cols,
                          const int nr, const int nt, const int nb, float (*total)[X_BLOCK]) {
    int64_t i = 0;
    for (; nr > 1 && i + nr <= rows; i += nr)
        dense_tiles_avx2(w + i * j->k, j->k, x, j->xk, c0, cols, nr, nt, nb, total + i);
    for (; i < rows; i++) dense_tiles_avx2(w + i * j->k, j->k, x, j->xk, c0, cols, 1, nt, nb, total + i);
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

/* Dense weight rows r0 .. r0 + rows - 1 (at w) against activation rows b0 .. b0 + nb - 1, into y: the columns in
 * chunks of nt tiles (several tiles of a row in flight when nb is small: independent chains), each chunk for every
 * row of the band, so that the chunk's activations are read from L1 by all of them. */
AVX2 void band_avx2(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0, const int nb,
                    const int nr) {
    const int nt = nb >= DENSE_TILES ? 1 : DENSE_TILES / nb;
    const int64_t k = j->k;
    const float *x = j->x + b0 * j->xk;
    float total[BAND][X_BLOCK];
    load_totals(j, r0, rows, b0, nb, total);
    int64_t c0 = 0;
    for (; c0 + nt * TILE <= k; c0 += nt * TILE) band_chunk_avx2(j, w, rows, x, c0, TILE, nr, nt, nb, total);
    for (; c0 < k; c0 += TILE) band_chunk_avx2(j, w, rows, x, c0, tile_cols(k, c0), nr, 1, nb, total);
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

/* The bitmaps of whole chunk group g (at mask + 4 g), tile i's in bits 8i .. 8i + 7. */
static inline uint32_t whole_group_masks(const uint8_t *mask, int g) {
    uint32_t masks;
    memcpy(&masks, mask + CHUNK_TILES * g, sizeof masks);
    return masks;
}

/* The AVX-512 walk of one activation row needs AVX-512 BW (byte masks) and VBMI2 (expansions), which features.c
 * requires of that level. */
#define AVX512_WALK __attribute__((target(SPZ_TARGET_AVX512 ",avx512bw,avx512vbmi2"), always_inline)) static inline

/* The bytes of a whole chunk group's 32 fp16 patterns that its values fill (masks = whole_group_masks): the high
 * byte of each present column, and its low byte too when the group is wide. */
AVX2 uint64_t value_bytes(uint32_t masks, int wide) {
    const uint64_t low = _pdep_u64(masks, 0x5555555555555555ULL);
    return low << 1 | (low & (0 - (uint64_t)wide));
}

/* The 32 columns of a whole chunk group (8 of each tile), expanded from its values at v into the bytes `bytes`
 * (value_bytes): fp16 patterns, tile i's in 16-bit lanes 8i .. 8i + 7. One byte expansion does what 4 table
 * shuffles do, for narrow and wide groups alike. */
AVX512_WALK __m512i expand_chunk_group(const uint8_t *v, uint64_t bytes) {
    __m512i raw = _mm512_loadu_si512(v), zero;
    __asm__("" : "+v"(raw)); /* from a register: with its memory operand folded in, vpexpandb ran 2-3x slower (Zen 5) */
    /* A fresh zero to merge into: with zero-masking alone the expansion waited on its destination's last writer, a
     * chain through the loop that ran it at a third of the speed (Zen 5). */
    __asm__("vpxord %0, %0, %0" : "=v"(zero));
    return _mm512_mask_expand_epi8(zero, _cvtu64_mask64(bytes), raw);
}

/* The tile sums of whole chunk (mask, v, wides) of one sparse row against nb activation rows in chunk order (row b's
 * at xq + b * k: per chunk group, each tile's 8 activations side by side) into sums[4 b .. 4 b + 4): each chunk
 * group's 4 tiles expand at once (one vpexpandb), and for each activation row two 512-bit FMAs carry them, lanes 0-7
 * and 8-15 two tiles' chains, every lane adding the same products in the same order as the AVX2 walk's. Always
 * inlined with constant nb. */
AVX512_WALK void chunk_rows_avx512(const uint8_t *mask, const uint8_t *v, unsigned wides, const float *xq, int64_t k,
                                   const int nb, float *sums) {
    __m512 acc[2 * FUSED_MAX_ROWS];
    for (int a = 0; a < 2 * nb; a++) acc[a] = _mm512_setzero_ps();
    for (int g = 0; g < GROUPS_PER_TILE; g++) {
        const uint64_t bytes = value_bytes(whole_group_masks(mask, g), wides >> g & 1);
        const __m512i h = expand_chunk_group(v, bytes);
        v += __builtin_popcountll(bytes);
        const __m512 w01 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
        const __m512 w23 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
        for (int b = 0; b < nb; b++) {
            acc[2 * b] = _mm512_fmadd_ps(w01, _mm512_loadu_ps(xq + b * k + 32 * g), acc[2 * b]);
            acc[2 * b + 1] = _mm512_fmadd_ps(w23, _mm512_loadu_ps(xq + b * k + 32 * g + 16), acc[2 * b + 1]);
        }
    }
    for (int b = 0; b < 2 * nb; b++) {
        sums[2 * b] = spz_hsum8(_mm512_castps512_ps256(acc[b]));
        sums[2 * b + 1] = spz_hsum8(spz_upper_half(acc[b]));
    }
}

static void partial_chunk_avx2(const Job *j, int64_t r, int64_t c, const float *x, float *total);

/* Sparse weight rows r0 .. r0 + rows - 1 against activation rows b0 .. b0 + nb - 1, chunk by chunk, each chunk for
 * every row of the band (so that the chunk's activations, 2 KB a row, are read from L1 by all of them), its whole
 * chunks by chunk_rows_avx512 and a last partial one by the AVX2 walk; the next band's bytes are prefetched as one
 * sequential range, a slice per chunk (a band reads 2 x BAND short streams that the hardware prefetcher did not
 * follow). */
AVX512_WALK void sparse_band_avx512(const Job *j, int64_t r0, int64_t rows, int64_t b0, const int nb) {
    const int64_t whole = j->k / CHUNK, per_row = j->tiles * GROUPS_PER_TILE;
    const int64_t next = r0 + rows, after = next + rows < j->n ? next + rows : j->n;
    float total[BAND][X_BLOCK], sums[CHUNK_TILES * FUSED_MAX_ROWS];
    load_totals(j, r0, rows, b0, nb, total);
    Ahead values = ahead_of(j->values + j->row_start[next], j->values + j->row_start[after], j->k);
    Ahead codes = ahead_of(j->codes + next * per_row, j->codes + after * per_row, j->k);
    for (int64_t c = 0; c < j->chunks; c++) {
        prefetch_tiles(&values, CHUNK_TILES);
        prefetch_tiles(&codes, CHUNK_TILES);
        for (int64_t i = 0; i < rows; i++) {
            if (c >= whole) {
                for (int b = 0; b < nb; b++)
                    partial_chunk_avx2(j, r0 + i, c, j->x + (b0 + b) * j->xk + c * CHUNK, &total[i][b]);
                continue;
            }
            const Chunk ch = chunk_of(j, r0 + i, c);
            chunk_rows_avx512(ch.mask, ch.v, ch.wides, j->xq + b0 * j->xk + c * CHUNK, j->xk, nb, sums);
            for (int b = 0; b < nb; b++)
                for (int t = 0; t < CHUNK_TILES; t++) total[i][b] += sums[CHUNK_TILES * b + t]; /* in tile order */
        }
    }
    store_totals(j, r0, rows, b0, nb, total);
}

/* band_avx2 for each constant nb and kind, each its own function: inlined all into one, the register allocator
 * kept the kernels' pointers on the stack. A band of one row is compiled as such: with a loop over the band's rows
 * around it, the one-row kernel took about 7% more instructions (callgrind). The AVX-512
 * level's dense bands (dense_band_avx512) hold the accumulators of ROWS_AVX512 weight rows at once in its 32 vector
 * registers, so each loaded activation vector feeds 3 rows' FMAs instead of 1 (with AVX2's 16 registers 2 rows ran
 * slower than 1), each FMA for two activation rows. */
typedef void (*BandFn)(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0);
#define BAND_FNS(NB)                                                                                                 \
    __attribute__((target(SPZ_TARGET_AVX2), noinline)) static void dense_band##NB(                                   \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        if (rows == 1) band_avx2(j, w, r0, 1, b0, NB, 1);                                                            \
        else band_avx2(j, w, r0, rows, b0, NB, 1);                                                                   \
    }                                                                                                                \
    __attribute__((target(SPZ_TARGET_AVX512), noinline)) static void dense_band_avx512_##NB(                         \
        const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {                                     \
        dense_band_avx512(j, w, r0, rows, b0, NB);                                                                   \
    }                                                                                                                \

#define SPARSE_BAND_FN(NB)                                                                                           \
    __attribute__((target(SPZ_TARGET_AVX512 ",avx512bw,avx512vbmi2"), noinline)) static void                         \
        sparse_band_avx512_##NB(const Job *j, const uint16_t *w, int64_t r0, int64_t rows, int64_t b0) {             \
        (void)w;                                                                                                     \
        sparse_band_avx512(j, r0, rows, b0, NB);                                                                     \
    }
SPARSE_BAND_FN(1)
SPARSE_BAND_FN(2)
SPARSE_BAND_FN(3)
SPARSE_BAND_FN(4)
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
static const BandFn SPARSE_BANDS_AVX512[FUSED_MAX_ROWS + 1] = {NULL, sparse_band_avx512_1, sparse_band_avx512_2,
                                                                 sparse_band_avx512_3, sparse_band_avx512_4};

/* The chunk's columns as fp16 patterns into out[0 .. ch.cols). Always inlined with constant `whole` (CHUNK_TILES
 * whole tiles). */
AVX2 void expand_chunk_avx2(Chunk ch, uint16_t *out, const int whole) {
    const int nt = whole ? CHUNK_TILES : ch.nt;
    const uint8_t *v = ch.v;
    for (int g = 0; g < GROUPS_PER_TILE; g++) {
        const int wide = ch.wides >> g & 1;
        const uint8_t *table = (const uint8_t *)spz_expand_sparse[wide];
        for (int i = 0; i < nt; i++) {
            const unsigned m = ch.mask[g * nt + i];
            const int64_t col = i * TILE + 8 * g;
            if (whole || col + 8 <= ch.cols) {
                _mm_storeu_si128((__m128i *)(out + col), expand_group(v, table, m));
                v += (size_t)__builtin_popcount(m) << wide;
            } else if (col < ch.cols) {
                v += expand_group_scalar(v, m, wide, (int)(ch.cols - col), out + col);
            }
        }
    }
}

/* Sparse row r as k fp16 patterns into out. */
AVX2 void expand_row_avx2(const Job *j, int64_t r, uint16_t *out) {
    for (int64_t c = 0; c < j->chunks; c++) {
        const Chunk ch = chunk_of(j, r, c);
        if (ch.nt == CHUNK_TILES && ch.cols == CHUNK) expand_chunk_avx2(ch, out + c * CHUNK, 1);
        else expand_chunk_avx2(ch, out + c * CHUNK, 0);
    }
}

/* *total += the chunk's tile sums against one activation row (x at the chunk's first column), in tile order: one
 * accumulator per tile, fed a group of each in turn, as the layout interleaves them, so that the 4 tiles' FMA chains
 * run side by side on one sequential stream. Always inlined with constant `whole` (a chunk of CHUNK_TILES whole
 * tiles: every group whole, a constant tile count) and `widths`: ALL_NARROW or ALL_WIDE when every chunk group of
 * ch is such, else MIXED (each group's width read from ch.wides). */
enum { ALL_NARROW, ALL_WIDE, MIXED };
AVX2 void chunk_sums_avx2(Chunk ch, const float *x, const int whole, const int widths, float *total) {
    const int nt = whole ? CHUNK_TILES : ch.nt;
    const uint8_t *v = ch.v;
    __m256 acc[CHUNK_TILES];
    uint16_t tail[CHUNK_TILES][8];
    for (int i = 0; i < nt; i++) acc[i] = _mm256_setzero_ps();
    for (int l = 0; l < SPARSE_PREFETCH_LINES; l++)
        _mm_prefetch((const char *)v + SPARSE_PREFETCH_BYTES + 64 * l, _MM_HINT_T0);
    for (int g = 0; g < GROUPS_PER_TILE; g++) {
        const int wide = widths == MIXED ? (int)(ch.wides >> g & 1) : widths == ALL_WIDE;
        const uint8_t *table = (const uint8_t *)spz_expand_sparse[wide];
        for (int i = 0; i < nt; i++) {
            const unsigned m = ch.mask[g * nt + i];
            const int64_t col = i * TILE + 8 * g;
            if (whole || col + 8 <= ch.cols) {
                acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(expand_group(v, table, m)), _mm256_loadu_ps(x + col), acc[i]);
                v += (size_t)__builtin_popcount(m) << wide;
            } else if (col < ch.cols) {
                v += expand_group_scalar(v, m, wide, (int)(ch.cols - col), tail[i]);
            }
        }
    }
    for (int i = 0; i < nt; i++) {
        const int64_t cols = whole ? TILE : tile_cols(ch.cols, i * TILE), full = cols & ~(int64_t)7;
        float sum = spz_hsum8(acc[i]);
        if (full < cols) sum += spz_dot_scalar(tail[i], x + i * TILE + full, cols - full);
        *total += sum;
    }
}

/* y[r] against the activation row x (k floats): the sparse row walked chunk by chunk, each in registers. */
__attribute__((target(SPZ_TARGET_AVX2), noinline)) static float sparse_row_avx2(const Job *j, int64_t r,
                                                                               const float *x) {
    float total = 0.0f;
    for (int64_t c = 0; c < j->chunks; c++) {
        const Chunk ch = chunk_of(j, r, c);
        const float *xc = x + c * CHUNK;
        if (ch.nt < CHUNK_TILES || ch.cols < CHUNK) chunk_sums_avx2(ch, xc, 0, MIXED, &total);
        else if (ch.wides == 0) chunk_sums_avx2(ch, xc, 1, ALL_NARROW, &total);
        else if (ch.wides == 0xFFFF) chunk_sums_avx2(ch, xc, 1, ALL_WIDE, &total);
        else chunk_sums_avx2(ch, xc, 1, MIXED, &total);
    }
    return total;
}

/* *total += the tile sums of chunk c (a partial one) of row r against x (at the chunk's first column). */
__attribute__((target(SPZ_TARGET_AVX2), noinline)) static void partial_chunk_avx2(const Job *j, int64_t r, int64_t c,
                                                                                  const float *x, float *total) {
    chunk_sums_avx2(chunk_of(j, r, c), x, 0, MIXED, total);
}

/* Every activation row against weight rows [row_begin, row_end), in bands of weight rows. Dense rows against 4 or
 * more activation rows that overflow L1 go BAND rows at a time, each chunk of columns for all of them before the
 * next: one row at a time, every weight row read all the activations from L2 (8 rows of k = 1536 are 48 KB), and at
 * 8 rows the kernel ran a fifth slower. Fewer activation rows go one row at a time: one sequential stream, which the
 * memory system serves best. Sparse rows against 2 or more activation rows are expanded, a band at a time, into
 * this thread's scratch and multiplied as dense rows: the expansion is not repeated for every activation row (and
 * for every pass of a prefill), and a band reads its activations from L1. At the AVX-512 level, sparse rows against
 * 2 to FUSED_MAX_ROWS activation rows go BAND rows at a time straight from their layout instead
 * (sparse_band_avx512), one expansion per chunk group for all of them. */
AVX2 void rows_avx2(const Job *j, int64_t row_begin, int64_t row_end, const int dense) {
    const int overflow = j->m * j->k * (int64_t)sizeof(float) > X_L1_BYTES;
    const int fused = !dense && j->xq && j->m <= FUSED_MAX_ROWS;
    const int expand = !dense && !fused;
    const int64_t band = fused || (j->m >= X_BLOCK / 2 && overflow) ? BAND : 1;
    uint16_t *expanded = expand ? spz_scratch((size_t)(band * j->k) * sizeof(uint16_t)) : NULL;
    if (expand && !expanded) { /* out of memory for the scratch: the one-row walk, for each activation row */
        for (int64_t r = row_begin; r < row_end; r++)
            for (int64_t b = 0; b < j->m; b++) j->y[b * j->n + r] = sparse_row_avx2(j, r, j->x + b * j->xk);
        return;
    }
    const BandFn *bands = fused ? SPARSE_BANDS_AVX512 : band > 1 && j->xp ? DENSE_BANDS_AVX512 : DENSE_BANDS;
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

/* The tile sums of whole chunk a (of one row) and of whole chunk b (of the next) against x in chunk order (xq: per
 * chunk group, each tile's 8 activations side by side) into sums[0 .. 4) and sums[4 .. 8): each chunk group's 4
 * tiles expand at once, and two 512-bit FMAs carry them, lanes 0-7 and 8-15 two tiles' chains; every lane adds the
 * same products in the same order as the AVX2 walk's, so the sums are bit for bit AVX2's. Two rows side by side
 * share each activation load and keep more work in flight. A function of its own with flat arguments: inlined into
 * the row loop, GCC kept the loop's state on the stack. */
__attribute__((target(SPZ_TARGET_AVX512 ",avx512bw,avx512vbmi2"), noinline)) static void
chunk_pair_avx512(const uint8_t *mask_a, const uint8_t *va, unsigned wides_a, const uint8_t *mask_b,
                  const uint8_t *vb, unsigned wides_b, const float *xq, float *sums) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int g = 0; g < GROUPS_PER_TILE; g++) {
        if (!(g & 1)) {
            _mm_prefetch((const char *)va + PAIR_PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)vb + PAIR_PREFETCH_BYTES, _MM_HINT_T0);
        }
        const uint64_t ba = value_bytes(whole_group_masks(mask_a, g), wides_a >> g & 1);
        const uint64_t bb = value_bytes(whole_group_masks(mask_b, g), wides_b >> g & 1);
        const __m512i ha = expand_chunk_group(va, ba), hb = expand_chunk_group(vb, bb);
        va += __builtin_popcountll(ba);
        vb += __builtin_popcountll(bb);
        const __m512 x01 = _mm512_loadu_ps(xq + 32 * g), x23 = _mm512_loadu_ps(xq + 32 * g + 16);
        acc[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(ha)), x01, acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(ha, 1)), x23, acc[1]);
        acc[2] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(hb)), x01, acc[2]);
        acc[3] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(hb, 1)), x23, acc[3]);
    }
    for (int h = 0; h < 4; h++) {
        sums[2 * h] = spz_hsum8(_mm512_castps512_ps256(acc[h]));
        sums[2 * h + 1] = spz_hsum8(spz_upper_half(acc[h]));
    }
}

/* One activation row at the AVX-512 level: weight rows two at a time, their whole chunks by chunk_pair_avx512 and
 * the rest (a last partial chunk, a lone last row) by the AVX2 walk. */
__attribute__((target(SPZ_TARGET_AVX512 ",avx512bw,avx512vbmi2"), noinline)) static void
sparse_rows_one_avx512(const Job *j, int64_t row_begin, int64_t row_end) {
    const int64_t whole = j->k / CHUNK;
    int64_t r = row_begin;
    const int64_t per_row = j->tiles * GROUPS_PER_TILE;
    for (; r + 2 <= row_end; r += 2) {
        float ta = 0.0f, tb = 0.0f, sums[2 * CHUNK_TILES];
        const int64_t next = r + 2, after = r + 4 < j->n ? r + 4 : j->n;
        Ahead values = ahead_of(j->values + j->row_start[next], j->values + j->row_start[after], j->k);
        Ahead codes = ahead_of(j->codes + next * per_row, j->codes + after * per_row, j->k);
        for (int64_t c = 0; c < whole; c++) {
            const Chunk a = chunk_of(j, r, c), b = chunk_of(j, r + 1, c);
            prefetch_tiles(&values, CHUNK_TILES);
            prefetch_tiles(&codes, CHUNK_TILES);
            chunk_pair_avx512(a.mask, a.v, a.wides, b.mask, b.v, b.wides, j->xq + c * CHUNK, sums);
            for (int i = 0; i < CHUNK_TILES; i++) { /* tile by tile: the shared order */
                ta += sums[i];
                tb += sums[CHUNK_TILES + i];
            }
        }
        for (int64_t c = whole; c < j->chunks; c++) { /* a last partial chunk */
            chunk_sums_avx2(chunk_of(j, r, c), j->x + c * CHUNK, 0, MIXED, &ta);
            chunk_sums_avx2(chunk_of(j, r + 1, c), j->x + c * CHUNK, 0, MIXED, &tb);
        }
        j->y[r] = ta;
        j->y[r + 1] = tb;
    }
    for (; r < row_end; r++) j->y[r] = sparse_row_avx2(j, r, j->x);
}

__attribute__((target(SPZ_TARGET_AVX2))) static void dense_rows_avx2(const Job *j, int64_t row_begin,
                                                                     int64_t row_end) {
    rows_avx2(j, row_begin, row_end, 1);
}

__attribute__((target(SPZ_TARGET_AVX2))) static void sparse_rows_avx2(const Job *j, int64_t row_begin,
                                                                      int64_t row_end) {
    if (j->m > 1) rows_avx2(j, row_begin, row_end, 0);
    else if (j->xq) sparse_rows_one_avx512(j, row_begin, row_end);
    else
        for (int64_t r = row_begin; r < row_end; r++) j->y[r] = sparse_row_avx2(j, r, j->x);
}

/* The dense matrix of rows [row_begin, row_end), converted to fp32 when asked (through this thread's scratch). */
__attribute__((target(SPZ_TARGET_AVX2))) static void unpack_rows_avx2(const Job *j, int64_t row_begin,
                                                                      int64_t row_end) {
    uint16_t *row = j->out_f32 ? spz_scratch((size_t)j->k * sizeof(uint16_t)) : NULL;
    if (j->out_f32 && !row) {
        unpack_rows_portable(j, row_begin, row_end);
        return;
    }
    for (int64_t r = row_begin; r < row_end; r++) {
        if (!j->out_f32) {
            expand_row_avx2(j, r, (uint16_t *)j->out + r * j->k);
            continue;
        }
        float *out = (float *)j->out + r * j->k;
        int64_t col = 0;
        expand_row_avx2(j, r, row);
        for (; col + 8 <= j->k; col += 8)
            _mm256_storeu_ps(out + col, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + col))));
        for (; col < j->k; col++) out[col] = spz_half(row[col]);
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

/* The activation rows' whole chunks in the order of the AVX-512 walks (chunk_pair_avx512, chunk_rows_avx512), row b
 * at xq + b * k: per chunk and chunk group, each tile's 8 activations side by side. NULL when those walks cannot run
 * here (or out of memory: the AVX2 code, bit-identical, runs instead); free() it after the call. */
static float *chunk_order_x(const float *x, int64_t m, int64_t k) {
    const int64_t whole = k / CHUNK;
    if (spz_level() < SPZ_AVX512 || m > FUSED_MAX_ROWS || !whole) return NULL;
    /* on a 64-byte boundary: the walks load whole lines of it (unaligned, every load took two lines, and a batch of 4
     * ran 1.3x slower) */
    float *xq = aligned_alloc(64, (size_t)((m * k * sizeof(float) + 63) & ~(size_t)63));
    for (int64_t b = 0; xq && b < m; b++)
        for (int64_t c = 0; c < whole; c++)
            for (int g = 0; g < GROUPS_PER_TILE; g++)
                for (int i = 0; i < CHUNK_TILES; i++)
                    memcpy(xq + b * k + c * CHUNK + 32 * g + 8 * i, x + b * k + c * CHUNK + i * TILE + 8 * g,
                           8 * sizeof(float));
    return xq;
}

void spz_gemv_sparse(const SpzSparse *s, const float *x, float *y, int64_t m, int threads) {
    const int64_t tiles = (s->k + TILE - 1) / TILE;
    Job job = {.codes = s->codes, .values = s->values, .row_start = s->row_start, .chunk_start = s->chunk_start,
               .x = x, .xp = pair_rows(x, m, s->k), .xq = chunk_order_x(x, m, s->k), .y = y, .n = s->n, .k = s->k,
               .m = m, .tiles = tiles, .chunks = (tiles + CHUNK_TILES - 1) / CHUNK_TILES, .xk = s->k};
    run_rows(&job, sparse_rows_portable, sparse_rows_avx2, threads);
    free((float *)job.xp);
    free((float *)job.xq);
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
                     Py_ssize_t chunk_start_len) {
    const int64_t tiles = (s->k + TILE - 1) / TILE, chunks = (tiles + CHUNK_TILES - 1) / CHUNK_TILES;
    if (s->n < 1 || s->k < 1 || s->k > INT32_MAX || codes_len != s->n * tiles * GROUPS_PER_TILE ||
        row_start_len != (s->n + 1) * 8 || chunk_start_len != s->n * chunks * 8) {
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

/* sparse_gemv(codes, values, row_start, chunk_start, x, y, n, k, m, threads)
 * sparse_unpack(codes, values, row_start, chunk_start, out, n, k, out_f32, threads) */
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
    const int64_t tiles = (k + TILE - 1) / TILE;
    Job job = {.codes = b[0].buf, .values = b[1].buf, .row_start = b[2].buf, .chunk_start = b[3].buf, .x = x.buf,
               .y = unpack ? NULL : y.buf, .out = unpack ? y.buf : NULL, .out_f32 = out_f32, .n = n, .k = k, .m = m,
               .tiles = tiles, .chunks = (tiles + CHUNK_TILES - 1) / CHUNK_TILES, .xk = k};
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
