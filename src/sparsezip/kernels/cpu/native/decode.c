/* The steps of a decoder layer between its weight products, in fp32, for the few tokens of a decode step:
 * RMSNorm, SiLU(gate) * up, and attention of the new tokens (rotary embedding applied, their keys and values
 * written into the KV cache) against the cache.
 *
 * Why: a decode step's work between products is small, but in torch it is some sixty operator calls per layer,
 * each with a fixed dispatch cost; on small models those costs, not memory bandwidth, bound decoding. Plain C
 * loops: the compiler may not reorder float sums, so results do not depend on the kernel level (the attention is
 * compiled twice, portable and AVX2, from the same C; a test holds their floats equal). The rotary
 * embedding follows model.py's apply_rope operation for operation (bit-identical); norms and attention sum in
 * their own order (allclose to torch's, not bit-identical).
 *
 * rms_norm(x, weight, out, rows, dim, eps): out[r] = weight * (x[r] / sqrt(mean(x[r]^2) + eps))
 * silu_mul(gate_up, out, rows, width): out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i]
 * attend(qkv, cos, sin, k_cache, v_cache, pos, mask, out, batch, tokens, heads, kv_heads, head_dim, max_len, used,
 *        rope_rows, mask_rows, threads):
 *   qkv     float32 [batch, tokens, (heads + 2 kv_heads) * head_dim]: q, then k, then v, head by head
 *   cos/sin float32 [rope_rows, tokens, head_dim], rope_rows 1 (shared) or batch
 *   caches  float32 [batch, kv_heads, max_len, head_dim]; token t is written at slot pos[t]
 *   mask    uint8 [mask_rows, tokens, used], mask_rows 1 or batch: 1 where token t may see slot s
 *   out     float32 [batch, tokens, heads * head_dim]
 */
#include <math.h>
#include <stdlib.h>

#include "spz.h"

void spz_rms_norm_rows(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++, x += dim, out += dim) {
        double squares = 0.0;
        for (int64_t i = 0; i < dim; i++) squares += (double)x[i] * x[i];
        const float inv = 1.0f / sqrtf((float)(squares / (double)dim) + eps);
        for (int64_t i = 0; i < dim; i++) out[i] = w[i] * (x[i] * inv);
    }
}

void spz_silu_mul_rows(const float *gate_up, float *out, int64_t rows, int64_t width) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * width, *up = gate + width;
        float *o = out + r * width;
        for (int64_t i = 0; i < width; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Inlined into each kernel level's copy of the attention below. */
#define INLINE static inline __attribute__((always_inline))

/* x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), as model.py computes it: rotated * sin + x * cos. */
INLINE void rope(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        const float rotated = i < half ? -x[i + half] : x[i - half];
        out[i] = rotated * sin[i] + x[i] * cos[i];
    }
}

typedef SpzAttend Attend;

static const float *rope_row(const Attend *a, const float *table, int64_t b, int64_t t) {
    return table + ((a->rope_rows == 1 ? 0 : b) * a->tokens + t) * a->d;
}

static const float *qkv_head(const Attend *a, int64_t b, int64_t t, int64_t head) {
    return a->qkv + (b * a->tokens + t) * (a->heads + 2 * a->kv_heads) * a->d + head * a->d;
}

static float *cache_slot(const Attend *a, float *cache, int64_t b, int64_t g, int64_t slot) {
    return cache + ((b * a->kv_heads + g) * a->max_len + slot) * a->d;
}

/* The new tokens' keys (rotated) and values into their cache slots. */
static void fill_cache(const Attend *a) {
    for (int64_t b = 0; b < a->batch; b++)
        for (int64_t t = 0; t < a->tokens; t++)
            for (int64_t g = 0; g < a->kv_heads; g++) {
                rope(qkv_head(a, b, t, a->heads + g), rope_row(a, a->cos, b, t), rope_row(a, a->sin, b, t), a->d,
                     cache_slot(a, a->k_cache, b, g, a->pos[t]));
                memcpy(cache_slot(a, a->v_cache, b, g, a->pos[t]), qkv_head(a, b, t, a->heads + a->kv_heads + g),
                       (size_t)a->d * sizeof(float));
            }
}

/* q . k in 8 independent lanes, then their sum in lane order: a fixed order that the compiler may vectorise. */
INLINE float dot(const float *q, const float *k, int64_t d) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += q[i + j] * k[i + j];
    for (; i < d; i++) lane[0] += q[i] * k[i];
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/* Query head h of token t in row b: softmax over the visible slots of q.k / sqrt(d), times the values. */
INLINE void attend_one(const Attend *a, int64_t b, int64_t h, int64_t t, float *q, float *scores) {
    const int64_t d = a->d, g = h / (a->heads / a->kv_heads);
    const uint8_t *visible = a->mask + ((a->mask_rows == 1 ? 0 : b) * a->tokens + t) * a->used;
    const float scale = 1.0f / sqrtf((float)d);
    rope(qkv_head(a, b, t, h), rope_row(a, a->cos, b, t), rope_row(a, a->sin, b, t), d, q);
    float top = -INFINITY;
    for (int64_t s = 0; s < a->used; s++) {
        if (!visible[s]) continue;
        scores[s] = dot(q, cache_slot(a, a->k_cache, b, g, s), d) * scale;
        if (scores[s] > top) top = scores[s];
    }
    float *out = a->out + (b * a->tokens + t) * a->heads * d + h * d;
    memset(out, 0, (size_t)d * sizeof(float));
    float total = 0.0f;
    for (int64_t s = 0; s < a->used; s++) {
        if (!visible[s]) continue;
        const float p = expf(scores[s] - top);
        const float *v = cache_slot(a, a->v_cache, b, g, s);
        for (int64_t i = 0; i < d; i++) out[i] += p * v[i];
        total += p;
    }
    for (int64_t i = 0; i < d; i++) out[i] /= total;
}

INLINE void attend_jobs(const Attend *a, int64_t first, int64_t end, float *scratch) {
    for (int64_t job = first; job < end; job++)
        for (int64_t t = 0; t < a->tokens; t++) attend_one(a, job / a->heads, job % a->heads, t, scratch + a->used, scratch);
}

/* The same C compiled twice: the AVX2 copy's vector code computes each lane exactly as the portable copy does
 * (no FMA contraction, the lanes' sums in the written order), so both give the same floats. */
static void attend_jobs_portable(const Attend *a, int64_t first, int64_t end, float *scratch) {
    attend_jobs(a, first, end, scratch);
}

#ifdef SPZ_X86
__attribute__((target("avx2"))) static void attend_jobs_avx2(const Attend *a, int64_t first, int64_t end,
                                                              float *scratch) {
    attend_jobs(a, first, end, scratch);
}
#else
#define attend_jobs_avx2 attend_jobs_portable
#endif

static void attend_part(void *ctx, int part, int parts) {
    Attend *a = (Attend *)ctx;
    const int64_t jobs = a->batch * a->heads;
    float *scratch = malloc((size_t)(a->used + a->d) * sizeof(float));
    if (!scratch) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    const int64_t first = spz_part_begin(jobs, part, parts), end = spz_part_begin(jobs, part + 1, parts);
    if (spz_level() >= SPZ_AVX2) attend_jobs_avx2(a, first, end, scratch);
    else attend_jobs_portable(a, first, end, scratch);
    free(scratch);
}

/* ------------------------------------------------------------------ Python entry points */

PyObject *spz_py_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, w, out;
    long long rows, dim;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*w*LLf", &x, &w, &out, &rows, &dim, &eps)) return NULL;
    PyObject *result = NULL;
    if (rows < 1 || dim < 1 || x.len != rows * dim * 4 || out.len != x.len || w.len != dim * 4) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: buffer sizes do not match rows, dim");
    } else {
        spz_rms_norm_rows(x.buf, w.buf, out.buf, rows, dim, eps);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return result;
}

PyObject *spz_py_silu_mul(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer gate_up, out;
    long long rows, width;
    if (!PyArg_ParseTuple(args, "y*w*LL", &gate_up, &out, &rows, &width)) return NULL;
    PyObject *result = NULL;
    if (rows < 1 || width < 1 || gate_up.len != rows * width * 8 || out.len != rows * width * 4) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: buffer sizes do not match rows, width");
    } else {
        spz_silu_mul_rows(gate_up.buf, out.buf, rows, width);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&gate_up);
    PyBuffer_Release(&out);
    return result;
}

int spz_attend(Attend *a, int threads) {
    fill_cache(a);
    if (threads > a->batch * a->heads) threads = (int)(a->batch * a->heads);
    spz_run_parts(attend_part, a, threads < 1 ? 1 : threads);
    return a->failed ? -1 : 0;
}

int spz_attend_sizes_ok(const Attend *a, const Py_ssize_t *lens) {
    const int64_t width = (a->heads + 2 * a->kv_heads) * a->d, cache = a->batch * a->kv_heads * a->max_len * a->d;
    if (a->batch < 1 || a->tokens < 1 || a->kv_heads < 1 || a->heads % a->kv_heads || a->d < 2 || a->d % 2 ||
        a->used < 1 || a->used > a->max_len || (a->rope_rows != 1 && a->rope_rows != a->batch) ||
        (a->mask_rows != 1 && a->mask_rows != a->batch))
        return 0;
    if (lens[0] != a->batch * a->tokens * width * 4 || lens[1] != a->rope_rows * a->tokens * a->d * 4 ||
        lens[2] != lens[1] || lens[3] != cache * 4 || lens[4] != cache * 4 || lens[5] != a->tokens * 8 ||
        lens[6] != a->mask_rows * a->tokens * a->used || lens[7] != a->batch * a->tokens * a->heads * a->d * 4)
        return 0;
    for (int64_t t = 0; t < a->tokens; t++)
        if (a->pos[t] < 0 || a->pos[t] >= a->max_len) return 0;
    return 1;
}

PyObject *spz_py_attend(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[8];
    long long batch, tokens, heads, kv_heads, d, max_len, used, rope_rows, mask_rows;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*y*y*w*LLLLLLLLLi", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &b[6], &b[7],
                          &batch, &tokens, &heads, &kv_heads, &d, &max_len, &used, &rope_rows, &mask_rows, &threads))
        return NULL;
    Attend a = {b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[7].buf, b[5].buf, b[6].buf, batch, tokens, heads,
                kv_heads, d, max_len, used, rope_rows, mask_rows, 0};
    Py_ssize_t lens[8];
    for (int i = 0; i < 8; i++) lens[i] = b[i].len;
    PyObject *result = NULL;
    if (!spz_attend_sizes_ok(&a, lens)) {
        PyErr_SetString(PyExc_ValueError, "attend: buffer sizes or positions do not match the shape");
    } else {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = spz_attend(&a, threads);
        Py_END_ALLOW_THREADS
        if (failed) PyErr_NoMemory();
        else result = Py_NewRef(Py_None);
    }
    for (int i = 0; i < 8; i++) PyBuffer_Release(&b[i]);
    return result;
}
