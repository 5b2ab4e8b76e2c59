/* The codec kernels' shared machinery: tile-parallel work with deterministic errors, bitmap checks, expansion of
 * compact values into rows, the product of a tile with x straight from its compact values, and the decode entry
 * point (spz_py_decode) that runs any coder's tile decoder. The coders' own parts are in codec_huff.c (huff-v2,
 * bitmap-v1) and codec_nibble.c (nibble-v3).
 *
 * Every function validates what it reads and reports the first bad tile as ValueError (the Python wrapper turns it
 * into SparsezipError); nothing is read outside the buffers it was given.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "codec.h"

/* ------------------------------------------------------------------ errors and threads */

void codec_err_init(ErrState *e) {
    pthread_mutex_init(&e->mu, NULL);
    e->failed = 0;
    e->tile = INT64_MAX;
    e->msg[0] = 0;
}

int codec_tile_error(ErrState *e, int64_t tile, const char *fmt, ...) {
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
        codec_tile_error(job->err, -1, "out of memory for a %zu-byte scratch buffer", job->scratch_bytes);
        return;
    }
    /* Units are taken in increasing order and every unit taken is run, so a unit below a failing one has always
     * run: the error names the lowest bad tile whatever the threads' timing. */
    while (!__atomic_load_n(&job->err->failed, __ATOMIC_RELAXED)) {
        int64_t t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (t >= job->count) break;
        job->fn(job->ctx, t, scratch);
    }
}

/* Run fn over tiles 0..count-1 on up to `threads` threads of the pool (the calling thread is one of them); call
 * without the GIL. Small jobs run on fewer threads: waking one costs more than decoding a few tiles. */
static void run_tiles(TileFn fn, void *ctx, ErrState *err, int64_t count, int threads, int64_t elements,
                      size_t scratch_bytes) {
    TileJob job = {fn, ctx, err, count, 0, scratch_bytes};
    int64_t by_work = elements / (1 << 17) + 1;
    if (threads > count) threads = (int)count;
    if (threads > by_work) threads = (int)by_work;
    spz_run_parts(tile_part, &job, threads < 1 ? 1 : threads);
}

void codec_parallel_tiles(TileFn fn, void *ctx, ErrState *err, int64_t count, int threads, int64_t elements,
                          size_t scratch_bytes) {
    Py_BEGIN_ALLOW_THREADS
    run_tiles(fn, ctx, err, count, threads, elements, scratch_bytes);
    Py_END_ALLOW_THREADS
}

int codec_check_shape(long long n, long long k) {
    if (n < 1 || k < 1 || n > INT32_MAX || k > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "matrix shape must be 1..2^31-1 on each side, got %lld x %lld", n, k);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ expand: compact values -> dense rows */

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
__attribute__((target("avx2,f16c"))) static int expand_f16_avx2(const uint8_t *bm, int cols, const uint16_t *vals,
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

__attribute__((target("avx2,f16c"))) static int expand_f32_avx2(const uint8_t *bm, int cols, const uint16_t *vals,
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
    if (spz_level() >= SPZ_AVX2) return out_f32 ? expand_f32_avx2 : expand_f16_avx2;
#endif
    return out_f32 ? expand_f32_scalar : expand_f16_scalar;
}

/* ------------------------------------------------------------------ compact: dense row -> bitmap + values */

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
__attribute__((target("avx2"))) static int compact_avx2(const uint16_t *src, int cols, uint16_t *vals, uint8_t *bm) {
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

CompactFn codec_compact_fn(void) {
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) return compact_avx2;
#endif
    return compact_scalar;
}

/* ------------------------------------------------------------------ tiles: bitmap, signs, low bytes */

/* Bits set in a bitmap row: 8 bytes per popcount, the last row_bytes % 8 through the byte table. */
__attribute__((always_inline)) static inline int row_bits(const uint8_t *row, int row_bytes) {
    int cnt = 0, b = 0;
    for (; b + 8 <= row_bytes; b += 8) {
        uint64_t word;
        memcpy(&word, row + b, 8);
        cnt += __builtin_popcountll(word);
    }
    for (; b < row_bytes; b++) cnt += POP8[row[b]];
    return cnt;
}

/* row_cnt[r] and gcnt[q] for `rows` bitmap rows of row_bytes each; returns their total. Inlined with a constant
 * row_bytes for full-width tiles (every tile but the last of a band): two popcounts a row. The sums stay in
 * registers: adding each row's count into gcnt[] in memory made every row wait on the store before it. */
__attribute__((always_inline)) static inline int count_rows(const uint8_t *bm, int rows, int row_bytes, int *row_cnt,
                                                            int *gcnt) {
    int nnz = 0;
    for (int q = 0; q < GROUPS; q++) {
        int group = 0;
        for (int r = q * GROUP_ROWS; r < (q + 1) * GROUP_ROWS && r < rows; r++) {
            const int cnt = row_bits(bm + r * row_bytes, row_bytes);
            row_cnt[r] = cnt;
            group += cnt;
        }
        gcnt[q] = group;
        nnz += group;
    }
    return nnz;
}

/* row_cnt[r] and gcnt[q] for the tile's bitmap; -1 when a row marks a column past the tile's last. */
__attribute__((always_inline)) static inline int scan_rows(const Geom *g, const uint8_t *bm, int *row_cnt,
                                                           int *gcnt) {
    if (g->cols == TILE) return count_rows(bm, g->rows, TILE / 8, row_cnt, gcnt);
    const int tail = g->cols & 7;
    for (int r = 0; tail && r < g->rows; r++)
        if (bm[r * g->row_bytes + g->row_bytes - 1] >> tail) return -1;
    return count_rows(bm, g->rows, g->row_bytes, row_cnt, gcnt);
}

/* Without the popcnt instruction, __builtin_popcountll is a libgcc call: a fifth of a tile's decode time. */
#ifdef SPZ_X86
__attribute__((target("popcnt"))) static int scan_rows_popcnt(const Geom *g, const uint8_t *bm, int *row_cnt,
                                                             int *gcnt) {
    return scan_rows(g, bm, row_cnt, gcnt);
}
#endif

int codec_scan_bitmap(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, int *row_cnt, int *gcnt) {
    int nnz;
#ifdef SPZ_X86
    if (c->simd) nnz = scan_rows_popcnt(g, bm, row_cnt, gcnt);
    else
#endif
        nnz = scan_rows(g, bm, row_cnt, gcnt);
    if (nnz < 0)
        return codec_tile_error(&c->err, t,
                                "bitmap marks entries outside the matrix; the weight stream is corrupted "
                                "or info has the wrong shape");
    return nnz;
}

int codec_check_signs(DecCtx *c, int64_t t, const char *coder, int nnz, const uint8_t *signs) {
    if ((nnz & 7) && signs[nnz >> 3] >> (nnz & 7))
        return codec_tile_error(&c->err, t, "%s stream is corrupted: nonzero padding bits in the sign bits of tile %lld",
                                coder, (long long)t);
    return 0;
}

void codec_apply_signs(uint16_t *vals, int nnz, const uint8_t *signs) {
    for (int b = 0; b < (nnz + 7) / 8; b++) { /* 8 values at a time, as two 64-bit words */
        uint64_t s[2], v[2];
        memcpy(s, spz_sign16[signs[b]], 16);
        memcpy(v, vals + 8 * b, 16);
        v[0] |= s[0];
        v[1] |= s[1];
        memcpy(vals + 8 * b, v, 16);
    }
}

/* 1 when an exception list is valid: positions (u16) strictly increasing and below nnz, bytes nonzero. Checked
 * before any value changes, so the loop that applies the list is a plain scatter. */
static int lows_valid_scalar(const uint8_t *pos, const uint8_t *bytes, int from, int nexc, int nnz) {
    int prev = from ? rd16(pos + 2 * (from - 1)) : -1, bad = 0;
    for (int i = from; i < nexc; i++) {
        const int p = rd16(pos + 2 * i);
        bad |= (p <= prev) | (p >= nnz) | (bytes[i] == 0);
        prev = p;
    }
    return !bad;
}

#ifdef SPZ_X86
/* The same 16 positions and 32 bytes at a time. Positions compare as signed 16-bit numbers: the first is checked
 * against nnz (at most TILE * TILE, below 2^15) alone, and each next one must exceed the one before, so a valid list
 * never reaches the sign bit and an invalid one fails some comparison. */
__attribute__((target("avx2"))) static int lows_valid_avx2(const uint8_t *pos, const uint8_t *bytes, int nexc,
                                                            int nnz) {
    if (nexc == 0) return 1;
    if (rd16(pos) >= nnz) return 0;
    const __m256i limit = _mm256_set1_epi16((short)nnz), zero = _mm256_setzero_si256();
    __m256i bad = zero;
    int i = 1;
    for (; i + 16 <= nexc; i += 16) {
        const __m256i p = _mm256_loadu_si256((const __m256i *)(pos + 2 * i));
        const __m256i before = _mm256_loadu_si256((const __m256i *)(pos + 2 * (i - 1)));
        const __m256i rising = _mm256_cmpgt_epi16(p, before), inside = _mm256_cmpgt_epi16(limit, p);
        bad = _mm256_or_si256(bad, _mm256_xor_si256(_mm256_and_si256(rising, inside), _mm256_set1_epi8(-1)));
    }
    int b = 0;
    for (; b + 32 <= nexc; b += 32)
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(bytes + b)), zero));
    if (!_mm256_testz_si256(bad, bad)) return 0;
    for (; b < i; b++) /* the bytes that neither the 32-byte steps nor the scalar check from i cover */
        if (!bytes[b]) return 0;
    return lows_valid_scalar(pos, bytes, i, nexc, nnz);
}
#endif

int codec_apply_lows(DecCtx *c, int64_t t, const char *coder, uint16_t *vals, int nnz, int mode, int nexc,
                     const uint8_t *lows) {
    if (mode == 0) {
        for (int i = 0; i < nnz; i++) vals[i] |= lows[i];
        return 0;
    }
    const uint8_t *pos = lows, *bytes = lows + 2 * nexc;
    int valid;
#ifdef SPZ_X86
    if (c->simd) valid = lows_valid_avx2(pos, bytes, nexc, nnz);
    else
#endif
        valid = lows_valid_scalar(pos, bytes, 0, nexc, nnz);
    if (!valid)
        return codec_tile_error(&c->err, t,
                                "%s stream is corrupted: tile %lld has an invalid exception list (positions "
                                "must increase and be below the tile's value count, bytes nonzero)",
                                coder, (long long)t);
    for (int64_t i = 0; i < nexc; i++) vals[rd16(pos + 2 * i)] |= bytes[i];
    return 0;
}

/* ------------------------------------------------------------------ tiles: written out or multiplied with x */

static void expand_tile(DecCtx *c, const Geom *g, const uint8_t *bm, const uint16_t *vals) {
    size_t esz = c->out_kind == OUT_F32 ? 4 : 2;
    uint8_t *base = (uint8_t *)c->out + ((size_t)g->r0 * (size_t)c->k + (size_t)g->c0) * esz;
    int p = 0;
    for (int r = 0; r < g->rows; r++)
        p += c->expand(bm + r * g->row_bytes, g->cols, vals + p, base + (size_t)r * (size_t)c->k * esz);
}

/* One tile row's dot product with x from its bitmap bytes and compact values, in the shared summation order
 * (spz.h): the scalar tail adds only the present values, which is what adding the absent ones as zeros gives. */
static float dot_scalar(const uint8_t *bm, int cols, const uint16_t *vals, const float *x) {
    float sum = 0;
    for (int col = 0, p = 0; col < cols; col++)
        if (bm[col >> 3] >> (col & 7) & 1) sum += spz_half(vals[p++]) * x[col];
    return sum;
}

#ifdef SPZ_X86
/* ROWS tile rows at once (independent FMA chains), each in the shared order: 8 lanes over the whole groups of 8
 * columns, lanes added by spz_hsum8, then the tail. Each row's values are a cursor that steps by the popcount of
 * its bitmap byte, and the rows' bitmap bytes are one pointer plus multiples of the row stride: with indexes into
 * shared arrays instead, GCC kept them on the stack and a group cost half as many instructions again. */
#define ROWS 4
#define X_ROWS 8 /* activation rows per pass over a tile row: 8 accumulators fit in registers */
#define ROWS_WIDE 3 /* tile rows per step of the multi-row product at the AVX-512 level: 3 x 4 accumulators */

/* The 8 columns of a group whose bitmap byte is m, its present values starting at v, as fp16 patterns (absent ones
 * 0), and as fp32. */
AVX2 __m128i group_halves(const uint16_t *v, unsigned m) {
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)v),
                            _mm_load_si128((const __m128i *)((const uint8_t *)spz_expand16 + spz_shift_left(m, 4))));
}

AVX2 __m256 group_values(const uint16_t *v, unsigned m) { return _mm256_cvtph_ps(group_halves(v, m)); }

/* group_halves in both 128-bit lanes: values and control loaded into both (loads, no shuffle), one lane-wise pshufb. */
AVX2 __m256i group_halves_twice(const uint16_t *v, unsigned m) {
    return _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)v)),
        _mm256_broadcastsi128_si256(
            _mm_load_si128((const __m128i *)((const uint8_t *)spz_expand16 + spz_shift_left(m, 4)))));
}

AVX2 void dot_rows_avx2(const uint8_t *bm, int64_t row_bytes, int cols, const uint16_t *const *vals, const float *x,
                        const int nr, float *out) {
    __m256 acc[ROWS];
    const uint16_t *v[ROWS];
    for (int i = 0; i < nr; i++) {
        acc[i] = _mm256_setzero_ps();
        v[i] = vals[i];
    }
    const int full = cols >> 3;
    for (int b = 0; b < full; b++) {
        const __m256 xv = _mm256_loadu_ps(x + 8 * b);
        for (int i = 0; i < nr; i++) {
            const unsigned m = bm[b + i * row_bytes];
            acc[i] = _mm256_fmadd_ps(group_values(v[i], m), xv, acc[i]);
            v[i] += POP8[m];
        }
    }
    for (int i = 0; i < nr; i++) {
        out[i] = spz_hsum8(acc[i]);
        if (cols & 7) out[i] += dot_scalar(bm + i * row_bytes + full, cols & 7, v[i], x + 8 * full);
    }
}

/* Always inlined: a full-width tile passes the constant row_bytes TILE / 8, so the rows' bitmap bytes are one
 * pointer plus constant offsets and the kernel's pointers all stay in registers. */
AVX2 void dot_rows_of_tile(const Geom *g, int64_t row_bytes, const uint8_t *bm, const int *row_cnt,
                           const uint16_t *vals, const float *x, float *part) {
    const uint16_t *rows[ROWS];
    int r = 0;
    for (; r + ROWS <= g->rows; r += ROWS) {
        for (int i = 0; i < ROWS; i++) {
            rows[i] = vals;
            vals += row_cnt[r + i];
        }
        dot_rows_avx2(bm + r * row_bytes, row_bytes, g->cols, rows, x, ROWS, part + r);
    }
    for (; r < g->rows; r++) {
        rows[0] = vals;
        vals += row_cnt[r];
        dot_rows_avx2(bm + r * row_bytes, row_bytes, g->cols, rows, x, 1, part + r);
    }
}

__attribute__((target(SPZ_TARGET_AVX2))) static void dot_tile_avx2(const Geom *g, const uint8_t *bm,
                                                                                 const int *row_cnt,
                                                                                 const uint16_t *vals, const float *x,
                                                                                 float *part) {
    if (g->cols == TILE) dot_rows_of_tile(g, TILE / 8, bm, row_cnt, vals, x, part);
    else dot_rows_of_tile(g, g->row_bytes, bm, row_cnt, vals, x, part);
}

/* sums[b * TILE] = the lanes of acc[b] added by spz_hsum8, plus tail[b] (the sum of the row's last cols % 8
 * products; NULL when there are none), for nb activation rows: all 8 in one reduction when there is no tail. */
AVX2 void store_row_sums(const __m256 *acc, const float *tail, const int nb, float *sums) {
    if (nb == X_ROWS && !tail) {
        float lanes[X_ROWS];
        _mm256_storeu_ps(lanes, spz_hsum8x8(acc));
        for (int b = 0; b < nb; b++) sums[b * TILE] = lanes[b];
        return;
    }
    for (int b = 0; b < nb; b++) sums[b * TILE] = tail ? spz_hsum8(acc[b]) + tail[b] : spz_hsum8(acc[b]);
}

/* nr tile rows straight from their bitmap bytes (row i's at bm + i * row_bytes) and compact values vals[i] against
 * nb activation rows, whose tile columns were copied to xt (TILE floats apart, so each row's operand is one pointer
 * plus a constant offset): sums[b * TILE + i] = row i's tile sum against activation row b in the shared order. Each
 * loaded activation vector feeds the nr rows' FMAs. Always inlined with constant nr and nb. */
AVX2 void compact_rows_sums_avx2(const uint8_t *bm, int64_t row_bytes, int cols, const uint16_t *const *vals,
                                 const float *xt, const int nr, const int nb, float *sums) {
    __m256 acc[ROWS_WIDE * X_ROWS];
    const uint16_t *v[ROWS_WIDE];
    for (int i = 0; i < nr; i++) v[i] = vals[i];
    for (int a = 0; a < nr * nb; a++) acc[a] = _mm256_setzero_ps();
    const int full = cols >> 3;
    for (int g = 0; g < full; g++) {
        __m256 wv[ROWS_WIDE];
        for (int i = 0; i < nr; i++) {
            const unsigned m = bm[i * row_bytes + g];
            wv[i] = group_values(v[i], m);
            v[i] += POP8[m];
        }
        for (int b = 0; b < nb; b++) {
            const __m256 xv = _mm256_loadu_ps(xt + b * TILE + 8 * g);
            for (int i = 0; i < nr; i++) acc[i * nb + b] = _mm256_fmadd_ps(wv[i], xv, acc[i * nb + b]);
        }
    }
    for (int i = 0; i < nr; i++) {
        float tail[X_ROWS];
        for (int b = 0; (cols & 7) && b < nb; b++)
            tail[b] = dot_scalar(bm + i * row_bytes + full, cols & 7, v[i], xt + b * TILE + 8 * full);
        store_row_sums(acc + i * nb, cols & 7 ? tail : NULL, nb, sums + i);
    }
}

/* compact_rows_sums_avx2 with 512-bit vectors that each carry two activation rows (as gemv.c's AVX-512 dense
 * bands): xt holds the pass's tile columns in pairs (tile_rows_in_pairs), each group's 8 values are converted into
 * both halves, and each lane accumulates the same products in the same order as its 256-bit twin, so the sums are
 * the same bit for bit with half the FMAs. Always inlined with constant nr and nb. */
AVX512 void compact_rows_sums_avx512(const uint8_t *bm, int64_t row_bytes, int cols, const uint16_t *const *vals,
                                     const float *xt, const int nr, const int nb, float *sums) {
    const int np = (nb + 1) / 2;
    __m512 acc[ROWS_WIDE * X_ROWS / 2];
    const uint16_t *v[ROWS_WIDE];
    for (int i = 0; i < nr; i++) v[i] = vals[i];
    for (int a = 0; a < nr * np; a++) acc[a] = _mm512_setzero_ps();
    const int full = cols >> 3;
    for (int g = 0; g < full; g++) {
        __m512 wv[ROWS_WIDE];
        for (int i = 0; i < nr; i++) {
            const unsigned m = bm[i * row_bytes + g];
            wv[i] = _mm512_cvtph_ps(group_halves_twice(v[i], m));
            v[i] += POP8[m];
        }
        for (int p = 0; p < np; p++) {
            __m512 xv = _mm512_loadu_ps(xt + p * 2 * TILE + 16 * g);
            __asm__("" : "+v"(xv)); /* one load per vector, not one folded into each row's FMA */
            for (int i = 0; i < nr; i++) acc[i * np + p] = _mm512_fmadd_ps(wv[i], xv, acc[i * np + p]);
        }
    }
    for (int i = 0; i < nr; i++) {
        if (nb == X_ROWS && !(cols & 7)) {
            float lanes[X_ROWS];
            _mm256_storeu_ps(lanes, spz_hsum8x8_pairs(acc + i * np));
            for (int b = 0; b < nb; b++) sums[b * TILE + i] = lanes[b];
            continue;
        }
        __m256 halves[X_ROWS];
        float tail[X_ROWS];
        for (int b = 0; b < nb; b++) {
            halves[b] = b % 2 ? spz_upper_half(acc[i * np + b / 2]) : _mm512_castps512_ps256(acc[i * np + b / 2]);
            if (cols & 7)
                tail[b] = dot_scalar(bm + i * row_bytes + full, cols & 7, v[i],
                                     xt + b / 2 * 2 * TILE + 16 * full + 8 * (b % 2));
        }
        store_row_sums(halves, cols & 7 ? tail : NULL, nb, sums + i);
    }
}

/* y[b * n + r] += sums[b * TILE + r] for the tile's rows: added after the tile's last row, a vector at a time, not
 * as each sum is made: y's rows are n floats apart and share their low address bits when n * 4 is a multiple of 4096,
 * so a load from row b + 1 waited on the store just made to row b. */
AVX2 void add_tile_sums_to_y(const float *sums, int rows, const int nb, float *y, int64_t n) {
    const int full = rows & ~7;
    for (int b = 0; b < nb; b++) {
        float *yb = y + b * n;
        const float *sb = sums + b * TILE;
        for (int i = 0; i < full; i += 8)
            _mm256_storeu_ps(yb + i, _mm256_add_ps(_mm256_loadu_ps(yb + i), _mm256_loadu_ps(sb + i)));
        for (int i = full; i < rows; i++) yb[i] += sb[i];
    }
}

/* Every row of a tile against nb activation rows, the tile never expanded, nr rows per step and the rest one by one,
 * each step's sums by SUMS (compact_rows_sums_avx2, or _avx512 with xt in pairs): y[b * n + r] += row r's tile sum
 * against activation row b. One definition for both targets (a helper compiled for AVX-512 cannot be inlined into
 * an AVX2 one). Always inlined with constant nr and nb. */
#define COMPACT_TILE_ROWS(NAME, TARGET, SUMS)                                                                         \
    TARGET void NAME(const Geom *g, const uint8_t *bm, const int *row_cnt, const uint16_t *vals, const float *xt,   \
                     const int nr, const int nb, float *y, int64_t n) {                                             \
        float sums[X_ROWS * TILE];                                                                                   \
        const uint16_t *rows[ROWS_WIDE];                                                                             \
        int r = 0;                                                                                                   \
        for (; nr > 1 && r + nr <= g->rows; r += nr) {                                                               \
            for (int i = 0; i < nr; i++) {                                                                           \
                rows[i] = vals;                                                                                      \
                vals += row_cnt[r + i];                                                                              \
            }                                                                                                        \
            SUMS(bm + r * g->row_bytes, g->row_bytes, g->cols, rows, xt, nr, nb, sums + r);                          \
        }                                                                                                            \
        for (; r < g->rows; r++) {                                                                                   \
            rows[0] = vals;                                                                                          \
            vals += row_cnt[r];                                                                                      \
            SUMS(bm + r * g->row_bytes, g->row_bytes, g->cols, rows, xt, 1, nb, sums + r);                           \
        }                                                                                                            \
        add_tile_sums_to_y(sums, g->rows, nb, y, n);                                                                 \
    }
COMPACT_TILE_ROWS(compact_tile_rows_avx2, AVX2, compact_rows_sums_avx2)
COMPACT_TILE_ROWS(compact_tile_rows_avx512, AVX512, compact_rows_sums_avx512)

/* One function per constant nb. The AVX-512 level's hold ROWS_WIDE tile rows' accumulators at once in AVX-512's 32
 * vector registers (with AVX2's 16, one row's), two activation rows per vector. */
#define COMPACT_TILE_FN(NB)                                                                                          \
    __attribute__((target(SPZ_TARGET_AVX2), noinline)) static void compact_tile##NB(                                 \
        const Geom *g, const uint8_t *bm, const int *row_cnt, const uint16_t *vals, const float *xt, float *y,       \
        int64_t n) {                                                                                                 \
        compact_tile_rows_avx2(g, bm, row_cnt, vals, xt, 1, NB, y, n);                                               \
    }                                                                                                                \
    __attribute__((target(SPZ_TARGET_AVX512), noinline)) static void compact_tile_wide##NB(                          \
        const Geom *g, const uint8_t *bm, const int *row_cnt, const uint16_t *vals, const float *xt, float *y,       \
        int64_t n) {                                                                                                 \
        compact_tile_rows_avx512(g, bm, row_cnt, vals, xt, ROWS_WIDE, NB, y, n);                                     \
    }
COMPACT_TILE_FN(1)
COMPACT_TILE_FN(2)
COMPACT_TILE_FN(3)
COMPACT_TILE_FN(4)
COMPACT_TILE_FN(5)
COMPACT_TILE_FN(6)
COMPACT_TILE_FN(7)
COMPACT_TILE_FN(8)
typedef void (*CompactTileFn)(const Geom *g, const uint8_t *bm, const int *row_cnt, const uint16_t *vals,
                              const float *xt, float *y, int64_t n);
static const CompactTileFn COMPACT_TILES[X_ROWS + 1] = {NULL,          compact_tile1, compact_tile2, compact_tile3,
                                                        compact_tile4, compact_tile5, compact_tile6, compact_tile7,
                                                        compact_tile8};
static const CompactTileFn COMPACT_TILES_WIDE[X_ROWS + 1] = {
    NULL, compact_tile_wide1, compact_tile_wide2, compact_tile_wide3, compact_tile_wide4, compact_tile_wide5,
    compact_tile_wide6, compact_tile_wide7, compact_tile_wide8};
#endif

/* One activation row: each tile row's sum straight from the compact values. */
static void tile_times_x(const DecCtx *c, const Geom *g, const uint8_t *bm, const int *row_cnt, const uint16_t *vals,
                         float *y) {
    float part[TILE];
    const float *x = c->x + g->c0;
#ifdef SPZ_X86
    if (c->simd) dot_tile_avx2(g, bm, row_cnt, vals, x, part);
    else
#endif
        for (int r = 0; r < g->rows; r++) {
            part[r] = dot_scalar(bm + r * g->row_bytes, g->cols, vals, x);
            vals += row_cnt[r];
        }
    for (int r = 0; r < g->rows; r++) y[r] += part[r];
}

/* The tile's `cols` columns of nb activation rows (row b at x + b * k) into xt in pairs for the AVX-512 product:
 * pair p's columns in groups of 8, row 2p's then row 2p + 1's (zeros for an odd nb's last), group g at
 * xt[p * 2 * TILE + 16 * g], a last partial group included. */
static void tile_rows_in_pairs(const float *x, int64_t k, int cols, int nb, float *xt) {
    for (int p = 0; p < (nb + 1) / 2; p++)
        for (int c = 0; c < cols; c += 8)
            for (int half = 0; half < 2; half++) {
                float *dst = xt + p * 2 * TILE + 2 * c + 8 * half;
                const int width = cols - c < 8 ? cols - c : 8;
                if (2 * p + half < nb) memcpy(dst, x + (2 * p + half) * k + c, (size_t)width * sizeof(float));
                else memset(dst, 0, (size_t)width * sizeof(float));
            }
}

/* Several activation rows, in passes of up to X_ROWS: each tile row is multiplied straight from its compact values
 * with the pass's tile columns of x copied side by side. Expanding each row into a buffer once for all passes, and
 * addressing the x rows k apart, had cost more instructions than walking the compact values again for every pass.
 * Either way the tile is decoded once per call whatever the rows. */
static void tile_times_rows(const DecCtx *c, const Geom *g, const uint8_t *bm, const int *row_cnt,
                            const uint16_t *vals, float *y) {
    const float *x = c->x + g->c0;
#ifdef SPZ_X86
    if (c->simd) {
        float xt[X_ROWS * TILE];
        for (int64_t b0 = 0; b0 < c->m; b0 += X_ROWS) {
            const int nb = c->m - b0 < X_ROWS ? (int)(c->m - b0) : X_ROWS;
            if (c->wide) {
                tile_rows_in_pairs(x + b0 * c->k, c->k, g->cols, nb, xt);
                COMPACT_TILES_WIDE[nb](g, bm, row_cnt, vals, xt, y + b0 * c->n, c->n);
                continue;
            }
            for (int b = 0; b < nb; b++)
                memcpy(xt + b * TILE, x + (b0 + b) * c->k, (size_t)g->cols * sizeof(float));
            COMPACT_TILES[nb](g, bm, row_cnt, vals, xt, y + b0 * c->n, c->n);
        }
        return;
    }
#endif
    uint16_t w[TILE];
    for (int r = 0; r < g->rows; r++) {
        vals += c->expand(bm + r * g->row_bytes, g->cols, vals, w);
        for (int64_t b = 0; b < c->m; b++) y[b * c->n + r] += spz_dot_scalar(w, x + b * c->k, g->cols);
    }
}

void codec_finish_tile(DecCtx *c, int64_t t, const Geom *g, const uint8_t *bm, const int *row_cnt,
                       const uint16_t *vals) {
    (void)t;
    if (c->out_kind != OUT_LINEAR) expand_tile(c, g, bm, vals);
    else if (c->m == 1) tile_times_x(c, g, bm, row_cnt, vals, c->y + g->r0);
    else tile_times_rows(c, g, bm, row_cnt, vals, c->y + g->r0);
}

/* ------------------------------------------------------------------ the encoders' two passes */

PyObject *codec_encode_tiles(TileFn size_tile, TileFn write_tile, void *ctx, EncodeOut *out, const uint8_t *table,
                             int64_t table_len, int64_t n, int64_t k, Py_ssize_t prefix, int threads) {
    PyObject *stream = NULL, *index = NULL, *result = NULL;
    const int64_t tiles = tile_count(n, k);
    int64_t *sizes = malloc((size_t)tiles * sizeof *sizes), *offsets = malloc((size_t)tiles * sizeof *offsets);
    if (!sizes || !offsets) {
        PyErr_NoMemory();
        goto done;
    }
    ErrState err;
    codec_err_init(&err);
    const size_t scratch = 2 * (TILE * TILE + READ_PAD);
    out->sizes = sizes;
    codec_parallel_tiles(size_tile, ctx, &err, tiles, threads, n * k, scratch);
    int64_t total = table_len;
    for (int64_t t = 0; t < tiles; t++) {
        offsets[t] = total;
        total += sizes[t];
    }
    stream = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(prefix + total));
    if (!stream) goto done;
    uint8_t *dst = (uint8_t *)PyByteArray_AS_STRING(stream) + prefix;
    memset(dst - prefix, 0, (size_t)prefix);
    memcpy(dst, table, (size_t)table_len);
    out->dst = dst;
    out->offsets = offsets;
    codec_parallel_tiles(write_tile, ctx, &err, tiles, threads, n * k, scratch);
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
    return result;
}

/* ------------------------------------------------------------------ the decode entry point */

typedef struct {
    int codec_id;
    int64_t first; /* payload offset of tile 0: after the coder's matrix table */
    TileFn decode_one;
    int (*prepare)(DecCtx *c);
} Coder;

static const Coder CODERS[] = {
    {1, 0, codec_v1_decode_one, NULL},
    {2, HUFF_TABLE_SIZE, codec_v2_decode_one, codec_v2_prepare},
    {3, 16, codec_v3_decode_one, codec_v3_prepare},
};

static const Coder *coder_of(int codec_id) {
    for (size_t i = 0; i < sizeof CODERS / sizeof CODERS[0]; i++)
        if (CODERS[i].codec_id == codec_id) return &CODERS[i];
    return NULL;
}

/* The next tile's bytes, asked into L2 while this tile decodes. A tile's fields are read by separate loops one after
 * another (bitmap, signs, codes, low bytes), so the hardware prefetchers start afresh at each field and the decode
 * waited on memory at every field's first lines; a prefetch into L1 instead evicted the tile being decoded. Always
 * inlined: as a function of its own GCC finds it free of side effects and drops the call. */
__attribute__((always_inline)) static inline void prefetch_tile(const DecCtx *c, int64_t t) {
#ifdef SPZ_X86
    if (t < c->tiles) {
        const uint8_t *from = c->payload + c->offsets[t], *to = c->payload + tile_end(c, t);
        for (const uint8_t *line = from; line < to; line += 64) _mm_prefetch((const char *)line, _MM_HINT_T1);
    }
#else
    (void)c;
    (void)t;
#endif
}

/* The tiles of one band of TILE weight rows in column order: a product adds each tile's row sums into y in the
 * shared summation order, so a band belongs to one thread. */
static int decode_band(void *ctx, int64_t band, void *scratch) {
    DecCtx *c = (DecCtx *)ctx;
    const int64_t per_band = (c->k + TILE - 1) / TILE;
    for (int64_t t = band * per_band; t < (band + 1) * per_band; t++) {
        prefetch_tile(c, t + 1);
        if (c->decode_one(c, t, scratch)) return -1;
    }
    return 0;
}

DecCtx *codec_open(int codec_id, const uint8_t *payload, Py_ssize_t payload_len, const int64_t *offsets,
                   Py_ssize_t offsets_len, long long n, long long k) {
    const Coder *coder = coder_of(codec_id);
    if (codec_check_shape(n, k)) return NULL;
    const int64_t tiles = tile_count(n, k);
    if (!coder || offsets_len != tiles * 8) {
        PyErr_SetString(PyExc_ValueError, "decode: bad arguments (codec id or index size)");
        return NULL;
    }
    DecCtx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        PyErr_NoMemory();
        return NULL;
    }
    *ctx = (DecCtx){.payload = payload, .payload_len = payload_len, .offsets = offsets, .n = n, .k = k, .tiles = tiles,
                    .simd = spz_level() >= SPZ_AVX2, .wide = spz_level() >= SPZ_AVX512, .expand = expand_fn(0),
                    .decode_one = coder->decode_one};
    codec_err_init(&ctx->err);
    /* Offsets must lie in the payload and not decrease; tile sizes are then checked per tile. */
    if (payload_len < coder->first || offsets[0] != coder->first) {
        PyErr_Format(PyExc_ValueError, "index offsets do not match the stream: tile 0 starts at %lld, not %lld",
                     (long long)offsets[0], (long long)coder->first);
        goto fail;
    }
    for (int64_t t = 0; t < tiles; t++)
        if (offsets[t] > tile_end(ctx, t) || offsets[t] > payload_len) {
            PyErr_Format(PyExc_ValueError, "index offsets do not match the stream: tile %lld starts at %lld, after "
                         "the next tile or the %lld-byte payload", (long long)t, (long long)offsets[t],
                         (long long)payload_len);
            goto fail;
        }
    if (coder->prepare && coder->prepare(ctx)) goto fail;
    return ctx;
fail:
    free(ctx);
    return NULL;
}

int codec_linear(DecCtx *ctx, const float *x, float *y, int64_t m, int threads) {
    ctx->x = x;
    ctx->y = y;
    ctx->m = m;
    ctx->out = y;
    ctx->out_kind = OUT_LINEAR;
    memset(y, 0, (size_t)(m * ctx->n) * sizeof(float));
    run_tiles(decode_band, ctx, &ctx->err, (ctx->n + TILE - 1) / TILE, threads, ctx->n * ctx->k * m, SCRATCH_BYTES);
    return ctx->err.failed ? -1 : 0;
}

/* decode(codec_id, payload, offsets, n, k, out, out_kind, threads[, x]): validates and writes out [n, k], or for
 * OUT_LINEAR out = y [m, n] = x [m, k] W^T. */
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
    if (codec_check_shape(n, k)) goto done;
    const long long m = out_kind == OUT_LINEAR ? (long long)(x.len / (4 * k)) : 0;
    const int sizes_ok = out_kind == OUT_LINEAR
                             ? m >= 1 && x.len == (Py_ssize_t)(4 * k * m) && out.len == (Py_ssize_t)(4 * n * m)
                             : out.len == (Py_ssize_t)(n * k * (out_kind == OUT_F32 ? 4 : 2));
    if (out_kind < OUT_F16 || out_kind > OUT_LINEAR || !sizes_ok) {
        PyErr_SetString(PyExc_ValueError, "decode: bad arguments (output kind or buffer sizes)");
        goto done;
    }
    if (!(ctx = codec_open(codec_id, payload.buf, payload.len, offsets.buf, offsets.len, n, k))) goto done;
    int failed;
    if (out_kind == OUT_LINEAR) {
        Py_BEGIN_ALLOW_THREADS
        failed = codec_linear(ctx, x.buf, out.buf, m, threads);
        Py_END_ALLOW_THREADS
    } else {
        ctx->out = out.buf;
        ctx->out_kind = out_kind;
        ctx->expand = expand_fn(out_kind == OUT_F32);
        codec_parallel_tiles(ctx->decode_one, ctx, &ctx->err, ctx->tiles, threads, n * k, SCRATCH_BYTES);
        failed = ctx->err.failed;
    }
    if (failed) {
        PyErr_SetString(PyExc_ValueError, ctx->err.msg);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(ctx);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    if (x.buf) PyBuffer_Release(&x);
    return result;
}
