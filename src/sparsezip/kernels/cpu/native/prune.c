/* Pruning kernels for the CPU: SparseGPT's column-by-column OBS loop over one lazy block, and the k-th smallest
 * value of a score array (float_sparse's whole-matrix mask, 15 times per linear).
 *
 * Why: the loop is sequential in the columns (each pruned column's error moves every later column), so in
 * torch it is a few small ops per column, and a model has hundreds of thousands of columns: Python and dispatch
 * overhead dominate. Every output row is independent of the others, though, so here each thread takes a range of rows,
 * copies CHUNK of them at a time into an L1-sized buffer and runs the whole block on it.
 *
 * obs_block(w, h, dead, err, b, rows, prune_k, n, m, threads):
 *   w    float32 [b, rows]  the block's columns of W, transposed (column j of W is row j of w); updated in place
 *                           and masked (pruned entries become +0.0)
 *   h    float32 [b, b]     the block's diagonal block of the upper factor U (U^T U = H^-1)
 *   dead uint8   [b]        inputs never activated: saliency 0, so they are pruned first
 *   err  float32 [b, rows]  written: err[j] = w_j / U_jj where pruned, 0 where kept (for the lazy update)
 *   Unstructured (m == 0): each row prunes its prune_k least salient columns of the block, chosen at the start.
 *   N:M (m > 0): each row prunes the m - n least salient of every group of m columns when the group is reached.
 * Saliency is w^2 / U_jj^2 as in the torch path (pruners._obs_score); ties go to the lower column index.
 * The padding rows of a last, partial chunk are zeros: selected and updated like the others, never written back.
 * Results equal the torch path's up to fp32 summation order (it updates 16 columns by rank-1 steps and the
 * rest of the block by a GEMM). The AVX2 variant updates by fused multiply-adds, the portable one by a product
 * and a difference.
 *
 * kth_smallest(values, k): the k-th smallest (1-based) of a float32 array, exactly torch.kthvalue's value, by
 * three histogram passes over the values' bits (11, 11 and 10 bits) instead of a quickselect on a copy: three
 * streaming reads and no copy. NaN ranks above +inf.
 */
#include "spz.h"

#define MAX_B 256     /* block width limit (SparseGPT uses 128) */
#define CHUNK 64      /* rows processed together: 128 columns x 64 rows x 4 bytes = 32 KiB, one L1 */
#define ROWS_PER_THREAD 1024 /* below this, waking a thread costs more than its share of the rows saves */

typedef struct {
    float *w, *err;
    const float *h;
    const uint8_t *dead;
    int64_t b, rows;
    int prune_k, n, m;
    int avx2; /* the kernel level allows AVX2 and FMA */
} Job;


#define LANES 8      /* rows handled together by the selection loops: one AVX2 vector of int32 */
#define FEW_COLS 32  /* up to this many columns (N:M groups) ranking by pairs is cheaper than the bisection */

typedef int32_t Lanes __attribute__((vector_size(4 * LANES))); /* GCC/Clang vectors: AVX2, or two SSE halves */

#define lanes_at(p) (*(const Lanes *)(p)) /* a macro: a vector-returning function would warn about its ABI */

/* For each of the CHUNK rows, set prune[j][r] for the k of columns j < cols whose saliency bits key[j][r] come first
 * in the pruning order (lower saliency, then lower column). Saliencies are non-negative floats, so their bit
 * patterns order like them, as signed ints too (which SIMD compares). The rows go LANES at a time through vector
 * compares (a comparison is -1 where true), with no data-dependent branch. key is 32-byte aligned. */
static inline __attribute__((always_inline)) void mark_least(const int32_t *key, int cols, int k, uint8_t *prune) {
    if (k <= 0) return;
    const Lanes zero = {0}, kk = zero + k;
    for (int r0 = 0; r0 < CHUNK; r0 += LANES) {
        const int32_t *kr = key + r0;
        Lanes pick[MAX_B];
        if (cols <= FEW_COLS) { /* rank of column i = how many columns come before it */
            for (int i = 0; i < cols; i++) {
                Lanes rank = zero, ki = lanes_at(kr + i * CHUNK);
                for (int j = 0; j < cols; j++) {
                    Lanes kj = lanes_at(kr + j * CHUNK);
                    rank -= j < i ? kj <= ki : kj < ki;
                }
                pick[i] = rank < kk;
            }
        } else { /* bisection on the bits for each row's k-th smallest saliency: 31 halvings of [+0, +inf] */
            Lanes lo = zero, hi = zero + 0x7F800000;
            for (int step = 0; step < 31; step++) {
                Lanes mid = lo + ((hi - lo) >> 1), count = zero;
                for (int j = 0; j < cols; j++) count -= lanes_at(kr + j * CHUNK) <= mid;
                Lanes enough = count >= kk;
                lo = (enough & lo) | (~enough & (mid + 1));
                hi = (enough & mid) | (~enough & hi);
            }
            /* lo is the k-th smallest: take every column below it, then its ties from the left */
            Lanes taken = zero;
            for (int j = 0; j < cols; j++) {
                pick[j] = lanes_at(kr + j * CHUNK) < lo;
                taken -= pick[j];
            }
            for (int j = 0; j < cols; j++) {
                Lanes tie = (lanes_at(kr + j * CHUNK) == lo) & (taken < kk);
                pick[j] |= tie;
                taken -= tie;
            }
        }
        for (int j = 0; j < cols; j++)
            for (int r = 0; r < LANES; r++) prune[j * CHUNK + r0 + r] = (uint8_t)(pick[j][r] & 1);
    }
}

/* saliency w^2 / d^2 of columns [j0, j0 + cols) as bit patterns; dead inputs 0 */
static inline __attribute__((always_inline)) void saliency_keys(const Job *J, const float *buf, int64_t j0, int cols, int32_t *key) {
    const int64_t b = J->b;
    for (int j = 0; j < cols; j++) {
        const float d = J->h[(j0 + j) * b + j0 + j];
        const int dead = J->dead[j0 + j];
        for (int r = 0; r < CHUNK; r++) {
            float w = buf[(j0 + j) * CHUNK + r];
            float s = dead ? 0.0f : (w * w) / (d * d);
            memcpy(&key[j * CHUNK + r], &s, 4);
        }
    }
}

/* One chunk of rows: buf [b][CHUNK] holds their weights, transposed as in the block. Compiled twice (below):
 * for AVX2+FMA and portable, chosen at run time. */
static inline __attribute__((always_inline)) void obs_chunk_body(const Job *J, float *buf, float *ebuf, uint8_t *prune, int32_t *key,
                                                                 const int fused) {
    const int64_t b = J->b;
    const float *h = J->h;
    memset(prune, 0, (size_t)(b * CHUNK));
    if (J->m == 0) {
        saliency_keys(J, buf, 0, (int)b, key);
        mark_least(key, (int)b, J->prune_k, prune);
    }
    for (int64_t j = 0; j < b; j++) {
        if (J->m && j % J->m == 0) { /* the group's weights are up to date now: choose its mask */
            saliency_keys(J, buf, j, J->m, key);
            mark_least(key, J->m, J->m - J->n, prune + j * CHUNK);
        }
        const float d = h[j * b + j];
        float *wj = buf + j * CHUNK, *e = ebuf + j * CHUNK;
        const uint8_t *pj = prune + j * CHUNK;
        for (int r = 0; r < CHUNK; r++) e[r] = pj[r] ? wj[r] / d : 0.0f;
        for (int64_t k = j + 1; k < b; k++) {
            const float hk = h[j * b + k];
            float *wk = buf + k * CHUNK;
            if (fused)
                for (int r = 0; r < CHUNK; r++) wk[r] = __builtin_fmaf(-hk, e[r], wk[r]);
            else
                for (int r = 0; r < CHUNK; r++) wk[r] -= hk * e[r];
        }
        for (int r = 0; r < CHUNK; r++)
            if (pj[r]) wj[r] = 0.0f;
    }
}

#ifdef SPZ_X86
__attribute__((target("avx2,fma"))) static void obs_chunk_avx2(const Job *J, float *buf, float *ebuf, uint8_t *prune,
                                                                int32_t *key) {
    obs_chunk_body(J, buf, ebuf, prune, key, 1);
}
#endif

static void obs_chunk_portable(const Job *J, float *buf, float *ebuf, uint8_t *prune, int32_t *key) {
    obs_chunk_body(J, buf, ebuf, prune, key, 0);
}

static void obs_chunk(const Job *J, float *buf, float *ebuf, uint8_t *prune, int32_t *key) {
#ifdef SPZ_X86
    if (J->avx2) {
        obs_chunk_avx2(J, buf, ebuf, prune, key);
        return;
    }
#endif
    obs_chunk_portable(J, buf, ebuf, prune, key);
}

/* Pool part: a range of whole chunks of rows. */
static void obs_part(void *arg, int part, int parts) {
    const Job *J = arg;
    const int64_t chunks = (J->rows + CHUNK - 1) / CHUNK;
    const int64_t row_begin = spz_part_begin(chunks, part, parts) * CHUNK;
    int64_t row_end = spz_part_begin(chunks, part + 1, parts) * CHUNK;
    if (row_end > J->rows) row_end = J->rows;
    float buf[MAX_B * CHUNK], ebuf[MAX_B * CHUNK]; /* 3 x 64 KiB: within any thread's stack */
    int32_t key[MAX_B * CHUNK] __attribute__((aligned(32)));
    uint8_t prune[MAX_B * CHUNK];
    for (int64_t r0 = row_begin; r0 < row_end; r0 += CHUNK) {
        int cnt = (int)(row_end - r0 < CHUNK ? row_end - r0 : CHUNK);
        for (int64_t j = 0; j < J->b; j++) {  /* copy in; the padding rows are zeros and stay unused */
            memcpy(buf + j * CHUNK, J->w + j * J->rows + r0, (size_t)cnt * 4);
            memset(buf + j * CHUNK + cnt, 0, (size_t)(CHUNK - cnt) * 4);
        }
        obs_chunk(J, buf, ebuf, prune, key);
        for (int64_t j = 0; j < J->b; j++) {
            memcpy(J->w + j * J->rows + r0, buf + j * CHUNK, (size_t)cnt * 4);
            memcpy(J->err + j * J->rows + r0, ebuf + j * CHUNK, (size_t)cnt * 4);
        }
    }
}

PyObject *spz_py_obs_block(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer w, h, dead, err;
    long long b, rows;
    int prune_k, n, m, threads;
    if (!PyArg_ParseTuple(args, "w*y*y*w*LLiiii", &w, &h, &dead, &err, &b, &rows, &prune_k, &n, &m, &threads))
        return NULL;
    PyObject *result = NULL;
    if (b < 1 || b > MAX_B || rows < 1 || w.len != b * rows * 4 || err.len != b * rows * 4 || h.len != b * b * 4 ||
        dead.len != b || prune_k < 0 || prune_k > b || m < 0 || n < 0 || (m && (n > m || b % m))) {
        PyErr_SetString(PyExc_ValueError, "obs_block: buffer sizes or pattern do not match b, rows");
        goto done;
    }
    Job job = {w.buf, err.buf, h.buf, dead.buf, b, rows, prune_k, n, m, spz_level() >= SPZ_AVX2};
    if (threads > rows / ROWS_PER_THREAD) threads = (int)(rows / ROWS_PER_THREAD);
    spz_run_parts_nogil(obs_part, &job, threads);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&h);
    PyBuffer_Release(&dead);
    PyBuffer_Release(&err);
    return result;
}

/* float bits -> an unsigned key in the floats' order (negatives reversed below the positives) */
static uint32_t order_key(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static float key_float(uint32_t key) {
    uint32_t b = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Which bin of hist[0..bins) holds the k-th (1-based) entry; k becomes its rank within that bin. */
static uint32_t bin_of_rank(const uint64_t *hist, uint32_t bins, uint64_t *k) {
    uint32_t b = 0;
    while (b + 1 < bins && hist[b] < *k) *k -= hist[b++];
    return b;
}

/* Pass `shift`: histogram of key bits [shift, shift + width) over the keys whose bits above shift + width equal
 * `prefix`. Four interleaved histograms, so that runs of equal bins do not wait on each other's increments. */
static void histogram(const float *v, int64_t n, int shift, int width, uint32_t prefix, int whole, uint64_t *hist) {
    enum { WAYS = 4 };
    const uint32_t bins = 1u << width, mask = bins - 1;
    uint64_t part[WAYS * 2048] = {0}; /* width <= 11: 64 KiB on the stack, no allocation to fail */
    const int top = shift + width;
    for (int64_t i = 0; i < n; i++) {
        uint32_t key = order_key(v[i]);
        if (whole || (key >> top) == prefix) part[(i % WAYS) * bins + ((key >> shift) & mask)]++;
    }
    for (uint32_t b = 0; b < bins; b++) hist[b] = part[b] + part[bins + b] + part[2 * bins + b] + part[3 * bins + b];
}

PyObject *spz_py_kth_smallest(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer v;
    long long k;
    if (!PyArg_ParseTuple(args, "y*L", &v, &k)) return NULL;
    int64_t n = v.len / 4;
    if (v.len % 4 || k < 1 || k > n) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "kth_smallest: k must be in [1, n] for a float32 buffer of n values");
        return NULL;
    }
    static const int WIDTH[3] = {11, 11, 10}, SHIFT[3] = {21, 10, 0};
    uint64_t hist[2048], rank = (uint64_t)k;
    uint32_t prefix = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int pass = 0; pass < 3; pass++) {
        histogram(v.buf, n, SHIFT[pass], WIDTH[pass], prefix, pass == 0, hist);
        prefix = (prefix << WIDTH[pass]) | bin_of_rank(hist, 1u << WIDTH[pass], &rank);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyFloat_FromDouble((double)key_float(prefix));
}
