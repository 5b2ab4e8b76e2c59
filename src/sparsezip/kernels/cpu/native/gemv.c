/* y = x . W^T for fp16 weights and fp32 activations, for the few rows of a decode step.
 *
 * Why: at batch 1 a decoder is bound by the bytes of weight it reads per token. Keeping W in fp16
 * (as stored) halves those bytes against an fp32 copy, and converting in registers (F16C) costs
 * nothing next to the memory traffic. Accumulation is fp32, so results equal an fp32 matmul on the
 * same (fp16-exact) weights up to summation order.
 *
 * gemv_f16(w, x, y, n, k, m, threads): w uint16 [n, k] (fp16 bit patterns), x float32 [m, k],
 * y float32 [m, n] (written). Rows of W are split over `threads` threads of the shared pool.
 *
 * Summation order: spz.h's, which the product straight from codec tiles (codec.c) follows too, so that a W16A16SC
 * model gives bit-identical results whether its weights are decoded at load or multiplied from the tiles.
 *
 * sparse_gemv / sparse_unpack do the same for a weight held in the runtime's sparse layout (built by
 * kernels/cpu/gemv.py's pack_sparse; see SparseWeight there): per row, a bitmap of the nonzero entries and their values
 * in order -- either as fp16 bit patterns, or, when nearly every low byte is 0 (L2-rounded, E5M2-valued
 * weights), as their high bytes plus a per-row list of the exceptions' low bytes. The kernel expands 8 columns
 * at a time in registers (pshufb by the bitmap byte) and then runs exactly the dense kernel's arithmetic, so
 * both give bit-identical results on the same weights while the sparse one reads 3-4x fewer bytes.
 */
#include "spz.h"

#define TILE SPZ_TILE
#define CHUNK (32 * TILE) /* columns the sparse kernel expands at once: 8 KiB of fp16, in L1 */
#define X_BLOCK 8 /* activation rows handled per pass over a weight row: 8 accumulators fit in registers */


typedef struct {
    const uint16_t *w;
    const float *x;
    float *y;
    int64_t n, k, m;
} Job;

static inline float dot_tail(const uint16_t *w, const float *x, int64_t begin, int64_t end) {
    return spz_dot_scalar(w + begin, x + begin, end - begin);
}

static int64_t tile_cols(int64_t k, int64_t c0) { return k - c0 < TILE ? k - c0 : TILE; }

/* The portable kernel's tile: total[b] += the products of one tile's `cols` columns, in column order, for the
 * nb activation rows x + b * k. */
static void tile_sums_portable(const uint16_t *w, const float *x, int64_t k, int64_t cols, int64_t nb,
                               float *total) {
    for (int64_t b = 0; b < nb; b++) total[b] += dot_tail(w, x + b * k, 0, cols);
}

static void rows_portable(const Job *j, int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; r++) {
        float total[1];
        for (int64_t b = 0; b < j->m; b++) {
            total[0] = 0.0f;
            for (int64_t c0 = 0; c0 < j->k; c0 += TILE)
                tile_sums_portable(j->w + r * j->k + c0, j->x + b * j->k + c0, j->k, tile_cols(j->k, c0), 1, total);
            j->y[b * j->n + r] = total[0];
        }
    }
}

#ifdef SPZ_X86
/* The AVX2 kernel's tile: total[b] += one tile's sum for nb <= X_BLOCK activation rows x + b * k. Always
 * inlined with a constant nb, so the accumulators live in registers and the inner loop is fully unrolled. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void tile_sums_avx2(
    const uint16_t *w, const float *x, int64_t k, int64_t cols, const int nb, float *total) {
    const int64_t full = cols & ~(int64_t)7;
    __m256 acc[X_BLOCK];
    for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8) {
        __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + c)));
        for (int b = 0; b < nb; b++) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * k + c), acc[b]);
    }
    for (int b = 0; b < nb; b++) {
        float tile = spz_hsum8(acc[b]);
        if (full < cols) tile += dot_tail(w, x + b * k, full, cols);
        total[b] += tile;
    }
}

/* One weight row against nb activation rows starting at b0. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void row_block_avx2(const Job *j, int64_t r,
                                                                                        int64_t b0, const int nb) {
    float total[X_BLOCK] = {0};
    for (int64_t c0 = 0; c0 < j->k; c0 += TILE)
        tile_sums_avx2(j->w + r * j->k + c0, j->x + b0 * j->k + c0, j->k, tile_cols(j->k, c0), nb, total);
    for (int b = 0; b < nb; b++) j->y[(b0 + b) * j->n + r] = total[b];
}

/* Calls BLOCK(nb) with a constant nb = min(rows left, X_BLOCK), so each case compiles its own unrolled loop. */
#define FOR_CONSTANT_NB(rows_left, BLOCK)                                  \
    switch ((rows_left) < X_BLOCK ? (rows_left) : X_BLOCK) {              \
        case 1: BLOCK(1); break;                                          \
        case 2: BLOCK(2); break;                                          \
        case 3: BLOCK(3); break;                                          \
        case 4: BLOCK(4); break;                                          \
        case 5: BLOCK(5); break;                                          \
        case 6: BLOCK(6); break;                                          \
        case 7: BLOCK(7); break;                                          \
        default: BLOCK(8); break;                                         \
    }

__attribute__((target("avx2,fma,f16c,popcnt"))) static void rows_avx2(const Job *j, int64_t row_begin, int64_t row_end) {
#define DENSE_BLOCK(nb) row_block_avx2(j, r, b0, nb)
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t b0 = 0; b0 < j->m; b0 += X_BLOCK) FOR_CONSTANT_NB(j->m - b0, DENSE_BLOCK)
#undef DENSE_BLOCK
}
#endif

static int use_avx2(void) { return spz_level() >= SPZ_AVX2; }

static void dense_part(void *ctx, int part, int parts) {
    const Job *j = (const Job *)ctx;
    int64_t begin = spz_part_begin(j->n, part, parts), end = spz_part_begin(j->n, part + 1, parts);
#ifdef SPZ_X86
    if (use_avx2()) {
        rows_avx2(j, begin, end);
        return;
    }
#endif
    rows_portable(j, begin, end);
}

static int clamp_threads(int threads, int64_t n) {
    if (threads < 1) threads = 1;
    if (threads > SPZ_MAX_THREADS) threads = SPZ_MAX_THREADS;
    return threads > n ? (int)n : threads;
}

PyObject *spz_py_gemv_f16(PyObject *self, PyObject *args) {
    Py_buffer w, x, y;
    long long n, k, m;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*w*LLLi", &w, &x, &y, &n, &k, &m, &threads)) return NULL;
    PyObject *result = NULL;
    if (n < 1 || k < 1 || m < 1 || w.len != n * k * 2 || x.len != m * k * 4 || y.len != m * n * 4) {
        PyErr_SetString(PyExc_ValueError, "gemv_f16: buffer sizes do not match n, k, m");
        goto done;
    }
    Job job = {w.buf, x.buf, y.buf, n, k, m};
    threads = clamp_threads(threads, n);
    spz_run_parts_nogil(dense_part, &job, threads);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return result;
}

/* ------------------------------------------------------------------ sparse layout (see the top comment) */

typedef struct {
    const uint8_t *bitmap;     /* [n, kb]: bit j of byte b = column 8b + j is nonzero */
    const uint8_t *values;     /* e5m2: u8 high bytes; else u16 bit patterns; row r's start at row_start[r] */
    const int64_t *row_start;  /* [n + 1] */
    const int32_t *exc_col;    /* e5m2: column of each value with a nonzero low byte, increasing within a row */
    const uint8_t *exc_low;    /* that low byte */
    const int64_t *row_exc;    /* [n + 1]: row r's exceptions are exc_col[row_exc[r] .. row_exc[r + 1]) */
    int e5m2;
    const float *x;            /* sparse_gemv: [m, k] */
    float *y;                  /* sparse_gemv: [m, n] */
    uint16_t *out;             /* sparse_unpack: [n, k] */
    int64_t n, k, m, kb;
} SparseJob;

/* Where one row's expansion stands: its next value and its next exception. */
typedef struct {
    const uint8_t *bm;
    const uint8_t *v8;
    const uint16_t *v16;
    int64_t p; /* values of this row consumed so far */
    const int32_t *ec, *ee;
    const uint8_t *el;
} Cursor;

static Cursor row_cursor(const SparseJob *j, int64_t r) {
    const int64_t v0 = j->row_start[r], e0 = j->row_exc[r];
    return (Cursor){j->bitmap + r * j->kb, j->values + v0, (const uint16_t *)j->values + v0, 0,
                    j->exc_col + e0, j->exc_col + j->row_exc[r + 1], j->exc_low + e0};
}

/* Columns [c0, c0 + cols) of the row as fp16 bit patterns into buf[0 .. cols), column by column. */
static inline void expand_scalar(Cursor *c, int e5m2, int64_t c0, int64_t cols, uint16_t *buf) {
    for (int64_t i = 0; i < cols; i++) {
        int64_t col = c0 + i;
        int set = c->bm[col >> 3] >> (col & 7) & 1;
        buf[i] = !set ? 0 : e5m2 ? (uint16_t)(c->v8[c->p] << 8) : c->v16[c->p];
        c->p += set;
    }
}

/* ORs the low bytes of the row's exceptions in columns [c0, c0 + cols) into buf (e5m2 only). */
static inline void patch_exceptions(Cursor *c, int64_t c0, int64_t cols, uint16_t *buf) {
    for (; c->ec < c->ee && *c->ec < c0 + cols; c->ec++, c->el++) buf[*c->ec - c0] |= *c->el;
}

static void sparse_rows_portable(const SparseJob *j, int64_t row_begin, int64_t row_end) {
    uint16_t buf[TILE];
    for (int64_t r = row_begin; r < row_end; r++) {
        for (int64_t b = 0; b < j->m; b++) {
            Cursor c = row_cursor(j, r);
            float total[1] = {0.0f};
            for (int64_t c0 = 0; c0 < j->k; c0 += TILE) {
                const int64_t cols = tile_cols(j->k, c0);
                expand_scalar(&c, j->e5m2, c0, cols, buf);
                patch_exceptions(&c, c0, cols, buf);
                tile_sums_portable(buf, j->x + b * j->k + c0, j->k, cols, 1, total);
            }
            j->y[b * j->n + r] = total[0];
        }
    }
}

static void unpack_rows_portable(const SparseJob *j, int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; r++) {
        Cursor c = row_cursor(j, r);
        expand_scalar(&c, j->e5m2, 0, j->k, j->out + r * j->k);
        patch_exceptions(&c, 0, j->k, j->out + r * j->k);
    }
}

#ifdef SPZ_X86
/* patch_exceptions for buffers just written 16 bytes at a time: each patch reads, ORs and writes back the whole
 * 16-byte group, so the later 16-byte loads forward from a store of their own size instead of stalling on a
 * 2-byte store (which cost ~35 cycles per exception). Groups past the last whole one are patched bytewise. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void patch_exceptions_avx2(Cursor *c,
                                                                                               int64_t c0,
                                                                                               int64_t cols,
                                                                                               uint16_t *buf) {
    const int64_t full = cols & ~(int64_t)7;
    for (; c->ec < c->ee && *c->ec < c0 + full; c->ec++, c->el++) {
        const int64_t at = *c->ec - c0;
        __m128i *group = (__m128i *)(buf + (at & ~(int64_t)7));
        __m128i low = _mm_and_si128(_mm_set1_epi8((char)*c->el), _mm_load_si128((const __m128i *)spz_low_lane[at & 7]));
        _mm_storeu_si128(group, _mm_or_si128(_mm_loadu_si128(group), low));
    }
    patch_exceptions(c, c0, cols, buf);
}

/* 8 columns with bitmap byte m from the row's next values into buf (16 bytes), advancing the cursor. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void expand_group(Cursor *c, unsigned m,
                                                                                            uint16_t *buf,
                                                                                            const int e5m2) {
    __m128i v = e5m2 ? _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(c->v8 + c->p)),
                                        _mm_load_si128((const __m128i *)spz_expand8hi[m]))
                     : _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(c->v16 + c->p)),
                                        _mm_load_si128((const __m128i *)spz_expand16[m]));
    _mm_storeu_si128((__m128i *)buf, v);
    c->p += __builtin_popcount(m);
}

/* Columns [c0, c0 + cols) of the row into buf, exceptions included: 8 columns per pshufb (the values array
 * is padded, so the 16-byte loads never leave it), the last cols % 8 one by one. The bitmap is read 8 bytes
 * at a time and counted with popcnt: the loop is bound by its loads, so every table lookup saved counts.
 * e5m2 is a constant. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void expand_avx2(Cursor *c, int64_t c0,
                                                                                            int64_t cols,
                                                                                            uint16_t *buf,
                                                                                            const int e5m2) {
    const int64_t full = cols & ~(int64_t)7;
    int64_t g = 0;
    for (; g + 64 <= full; g += 64) {
        uint64_t bits;
        memcpy(&bits, c->bm + ((c0 + g) >> 3), 8);
        for (int i = 0; i < 8; i++, bits >>= 8) expand_group(c, (unsigned)(bits & 0xFF), buf + g + 8 * i, e5m2);
    }
    for (; g < full; g += 8) expand_group(c, c->bm[(c0 + g) >> 3], buf + g, e5m2);
    if (full < cols) expand_scalar(c, e5m2, c0 + full, cols - full, buf + full);
    if (e5m2) patch_exceptions_avx2(c, c0, cols, buf);
}

/* row_block_avx2 on the row expanded into a buffer in L1, CHUNK columns at a time: the same arithmetic on the
 * same fp16 values, hence the same bits. Whole chunks (not tiles) keep the exception loop's exit -- the one
 * branch that mispredicts -- to once per chunk. */
__attribute__((target("avx2,fma,f16c,popcnt"), always_inline)) static inline void sparse_block_avx2(
    const SparseJob *j, int64_t r, int64_t b0, const int nb, const int e5m2) {
    uint16_t buf[CHUNK] __attribute__((aligned(32)));
    Cursor c = row_cursor(j, r);
    float total[X_BLOCK] = {0};
    for (int64_t s0 = 0; s0 < j->k; s0 += CHUNK) {
        const int64_t span = j->k - s0 < CHUNK ? j->k - s0 : CHUNK;
        expand_avx2(&c, s0, span, buf, e5m2);
        for (int64_t c0 = 0; c0 < span; c0 += TILE)
            tile_sums_avx2(buf + c0, j->x + b0 * j->k + s0 + c0, j->k, tile_cols(span, c0), nb, total);
    }
    for (int b = 0; b < nb; b++) j->y[(b0 + b) * j->n + r] = total[b];
}

__attribute__((target("avx2,fma,f16c,popcnt"))) static void sparse_rows_avx2(const SparseJob *j, int64_t row_begin,
                                                                       int64_t row_end) {
#define E5M2_BLOCK(nb) sparse_block_avx2(j, r, b0, nb, 1)
#define FP16_BLOCK(nb) sparse_block_avx2(j, r, b0, nb, 0)
    for (int64_t r = row_begin; r < row_end; r++)
        for (int64_t b0 = 0; b0 < j->m; b0 += X_BLOCK) {
            if (j->e5m2) FOR_CONSTANT_NB(j->m - b0, E5M2_BLOCK)
            else FOR_CONSTANT_NB(j->m - b0, FP16_BLOCK)
        }
#undef E5M2_BLOCK
#undef FP16_BLOCK
}

__attribute__((target("avx2,fma,f16c,popcnt"))) static void unpack_rows_avx2(const SparseJob *j, int64_t row_begin,
                                                                       int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; r++) {
        Cursor c = row_cursor(j, r);
        if (j->e5m2) expand_avx2(&c, 0, j->k, j->out + r * j->k, 1);
        else expand_avx2(&c, 0, j->k, j->out + r * j->k, 0);
    }
}
#endif

static void sparse_part(void *ctx, int part, int parts) {
    const SparseJob *j = (const SparseJob *)ctx;
    int64_t begin = spz_part_begin(j->n, part, parts), end = spz_part_begin(j->n, part + 1, parts);
#ifdef SPZ_X86
    if (use_avx2()) {
        if (j->out) unpack_rows_avx2(j, begin, end);
        else sparse_rows_avx2(j, begin, end);
        return;
    }
#endif
    if (j->out) unpack_rows_portable(j, begin, end);
    else sparse_rows_portable(j, begin, end);
}

#define VALUE_PAD 16 /* bytes readable past the last value: expand8 loads 16 bytes at a time */

/* O(1) consistency checks of the layout's arrays against n, k; the arrays themselves are built by
 * gemv.py's pack_sparse and held read-only, so their contents are trusted. */
static int check_sparse(const SparseJob *j, const Py_buffer *bitmap, const Py_buffer *values, const Py_buffer *row_start,
                        const Py_buffer *exc_col, const Py_buffer *exc_low, const Py_buffer *row_exc) {
    if (j->n < 1 || j->k < 1 || j->k > INT32_MAX || bitmap->len != j->n * j->kb ||
        row_start->len != (j->n + 1) * 8 || row_exc->len != (j->n + 1) * 8) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: array sizes do not match the shape");
        return -1;
    }
    int64_t nnz = j->row_start[j->n], exceptions = j->row_exc[j->n];
    if (j->row_start[0] != 0 || nnz < 0 || nnz > j->n * j->k || values->len < nnz * (j->e5m2 ? 1 : 2) + VALUE_PAD ||
        j->row_exc[0] != 0 || exceptions < 0 || exc_col->len < exceptions * 4 || exc_low->len < exceptions ||
        (!j->e5m2 && exceptions)) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: value or exception arrays are too short");
        return -1;
    }
    return 0;
}

/* sparse_gemv(bitmap, values, row_start, exc_col, exc_low, row_exc, e5m2, x, y, n, k, m, threads)
 * sparse_unpack(bitmap, values, row_start, exc_col, exc_low, row_exc, e5m2, out, n, k, threads) */
static PyObject *sparse_call(PyObject *args, int unpack) {
    Py_buffer b[6], x = {0}, y = {0};
    int e5m2, threads;
    long long n, k, m = 1;
    int ok = unpack ? PyArg_ParseTuple(args, "y*y*y*y*y*y*pw*LLi", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &e5m2,
                                       &y, &n, &k, &threads)
                    : PyArg_ParseTuple(args, "y*y*y*y*y*y*py*w*LLLi", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5],
                                       &e5m2, &x, &y, &n, &k, &m, &threads);
    if (!ok) return NULL;
    PyObject *result = NULL;
    SparseJob job = {b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, e5m2, x.buf, y.buf, NULL,
                     n, k, m, (k + 7) / 8};
    if (unpack) {
        job.y = NULL;
        job.out = y.buf;
    }
    if (n < 1 || k < 1 || m < 1 || check_sparse(&job, &b[0], &b[1], &b[2], &b[3], &b[4], &b[5])) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "sparse layout: bad shape");
        goto done;
    }
    if ((unpack && y.len != n * k * 2) || (!unpack && (x.len != m * k * 4 || y.len != m * n * 4))) {
        PyErr_SetString(PyExc_ValueError, "sparse layout: input or output buffer does not match n, k, m");
        goto done;
    }
    threads = clamp_threads(threads, n);
    spz_run_parts_nogil(sparse_part, &job, threads);
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < 6; i++) PyBuffer_Release(&b[i]);
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
