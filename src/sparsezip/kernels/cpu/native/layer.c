/* A decode step through every decoder layer in one call: per layer RMSNorm, the fused q/k/v product (+ bias),
 * optional per-head q/k norms, rotary attention against the KV cache, the o product and residual, RMSNorm, the
 * fused gate/up product, SiLU(gate) * up, the down product and residual.
 *
 * Why: on small models a decode step's time went to the Python and torch calls around the kernels -- a dozen per
 * layer, each with its own dispatch, allocation and buffer handling -- not to reading the weights. Here Python
 * makes one call per step; the GIL is released for each layer's arithmetic, and the pool's threads stay awake
 * from one product to the next.
 *
 * The same kernels as the per-operation path (gemv.c, decode.c) in the same order, so the results are bit-identical
 * to it at every kernel level: model.py uses this path only where the per-operation path would have called exactly
 * these kernels (one rank, fp32 activations on the CPU, few rows, dense fp16, sparse-layout or codec weights).
 *
 * decoder_layers(x, layers, cos, sin, pos, mask, batch, tokens, hidden, heads, kv_heads, head_dim, width, max_len,
 *                used, rope_rows, mask_rows, eps, threads)
 *   x       float32 [batch, tokens, hidden], updated in place: the hidden states after the last layer
 *   layers  a sequence, per layer the tuple (input_norm, post_attention_norm, q_norm, k_norm, qkv, o, gate_up, down,
 *           k_cache, v_cache): norms float32 [hidden] (q_norm and k_norm [head_dim], or None); caches as decode.c's
 *           attend takes them. A product is (PRODUCT_DENSE, bias, w, blocked) with w the fp16 matrix [n, k] (in
 *           column blocks when blocked is true: gemv.c),
 *           (PRODUCT_SPARSE, bias, codes, values, row_start, chunk_start) in gemv.c's sparse layout, or
 *           (PRODUCT_CODEC, bias, codec_id, payload, offsets), a codec stream multiplied straight from its tiles
 *           (codec.c); bias float32 [n] or None.
 *   cos, sin, pos, mask as decode.c's attend; width is the MLP's intermediate size (of this rank).
 */
#include <stdlib.h>

#include "codec.h"

#define MAX_HELD 32 /* buffers one layer holds: 10 tensors and 4 products of up to 5 arrays */
#define PRODUCTS 4  /* per layer: qkv, o, gate_up, down */

/* What one layer's call holds while it runs: Python buffers and the opened codec streams. */
typedef struct {
    Py_buffer b[MAX_HELD];
    int count;
    DecCtx *streams[PRODUCTS];
    int stream_count;
} Held;

static void release_all(Held *h) {
    for (int i = 0; i < h->count; i++) PyBuffer_Release(&h->b[i]);
    for (int i = 0; i < h->stream_count; i++) free(h->streams[i]);
    h->count = h->stream_count = 0;
}

/* The buffer of `obj` (writable when asked), which must hold `len` bytes (any when len < 0); NULL with a Python
 * error otherwise. */
static void *hold(Held *h, PyObject *obj, int writable, Py_ssize_t len, const char *what) {
    if (h->count == MAX_HELD) {
        PyErr_SetString(PyExc_ValueError, "decoder_layers: too many buffers in one layer");
        return NULL;
    }
    Py_buffer *b = &h->b[h->count];
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS)) return NULL;
    h->count++;
    if (len >= 0 && b->len != len) {
        PyErr_Format(PyExc_ValueError, "decoder_layers: %s has %zd bytes, expected %zd", what, b->len, len);
        return NULL;
    }
    return b->buf;
}

static Py_ssize_t last_len(const Held *h) { return h->b[h->count - 1].len; }

/* How a product's weight is held (the first item of its tuple; the module constants PRODUCT_*). */
enum { PRODUCT_DENSE = 0, PRODUCT_SPARSE = 1, PRODUCT_CODEC = 2 };

typedef struct {
    int kind;
    int64_t n, k;
    const uint16_t *w;    /* dense fp16 [n, k] */
    int blocked;          /* w in gemv.c's column blocks */
    SpzSparse s;          /* sparse layout */
    DecCtx *stream;       /* codec stream, opened */
    const float *bias;    /* [n] or NULL */
} Product;

/* (PRODUCT_DENSE, bias, w, blocked), (PRODUCT_SPARSE, bias, codes, values, row_start, chunk_start) or
 * (PRODUCT_CODEC, bias, codec_id, payload, offsets). */
static int parse_product(Held *h, PyObject *spec, int64_t n, int64_t k, const char *what, Product *p) {
    static const Py_ssize_t ITEMS[] = {4, 6, 5};
    const Py_ssize_t items = PyTuple_Check(spec) ? PyTuple_GET_SIZE(spec) : 0;
    const long kind = items ? PyLong_AsLong(PyTuple_GET_ITEM(spec, 0)) : -1;
    if (kind == -1 && PyErr_Occurred()) return -1;
    if (kind < PRODUCT_DENSE || kind > PRODUCT_CODEC || items != ITEMS[kind]) {
        PyErr_Format(PyExc_ValueError, "decoder_layers: %s is not a product tuple", what);
        return -1;
    }
    PyObject **item = &PyTuple_GET_ITEM(spec, 0);
    *p = (Product){.kind = (int)kind, .n = n, .k = k};
    if (item[1] != Py_None && !(p->bias = hold(h, item[1], 0, n * 4, what))) return -1;
    if (kind == PRODUCT_DENSE) {
        if ((p->blocked = PyObject_IsTrue(item[3])) < 0) return -1;
        return (p->w = hold(h, item[2], 0, n * k * 2, what)) ? 0 : -1;
    }
    if (kind == PRODUCT_CODEC) {
        const long codec_id = PyLong_AsLong(item[2]);
        const uint8_t *payload = hold(h, item[3], 0, -1, what);
        const Py_ssize_t payload_len = payload ? last_len(h) : 0;
        const int64_t *offsets = payload ? hold(h, item[4], 0, -1, what) : NULL;
        if ((codec_id == -1 && PyErr_Occurred()) || !offsets) return -1;
        if (!(p->stream = codec_open((int)codec_id, payload, payload_len, offsets, last_len(h), n, k))) return -1;
        h->streams[h->stream_count++] = p->stream;
        return 0;
    }
    Py_ssize_t lens[4];
    const void *arrays[4];
    for (int i = 0; i < 4; i++) {
        if (!(arrays[i] = hold(h, item[2 + i], 0, -1, what))) return -1;
        lens[i] = last_len(h);
    }
    p->s = (SpzSparse){arrays[0], arrays[1], arrays[2], arrays[3], n, k};
    return spz_sparse_check(&p->s, lens[0], lens[1], lens[2], lens[3]);
}

/* y = x W^T (+ bias); -1 when a codec tile is damaged, its error copied into `damaged`. */
static int product(const Product *p, const float *x, float *y, int64_t rows, int threads, char *damaged) {
    if (p->kind == PRODUCT_CODEC) {
        if (codec_linear(p->stream, x, y, rows, threads)) {
            memcpy(damaged, p->stream->err.msg, sizeof p->stream->err.msg);
            return -1;
        }
    } else {
        threads = spz_threads_for(threads, p->n * p->k * rows);
        if (p->kind == PRODUCT_SPARSE) spz_gemv_sparse(&p->s, x, y, rows, threads);
        else spz_gemv_dense(p->w, x, y, p->n, p->k, rows, p->blocked, threads);
    }
    if (p->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < p->n; i++) y[r * p->n + i] += p->bias[i];
    return 0;
}

static void add_into(float *x, const float *y, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] = x[i] + y[i];
}

typedef struct {
    int64_t rows, hidden, heads, kv_heads, d, width;
    float eps;
    int threads;
} Dims;

typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    Product qkv, o, gate_up, down;
} Layer;

/* Per-step work buffers, one allocation. */
typedef struct {
    float *normed, *qkv, *attn, *y, *gate_up, *act;
} Work;

static int parse_layer(Held *h, PyObject *spec, const Dims *dm, SpzAttend *a, Layer *l) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 10) {
        PyErr_SetString(PyExc_ValueError, "decoder_layers: a layer is not a tuple of 10 items");
        return -1;
    }
    PyObject **item = &PyTuple_GET_ITEM(spec, 0);
    const int64_t q_width = dm->heads * dm->d, qkv_width = (dm->heads + 2 * dm->kv_heads) * dm->d;
    const Py_ssize_t cache = a->batch * a->kv_heads * a->max_len * a->d * 4;
    *l = (Layer){0};
    if (!(l->input_norm = hold(h, item[0], 0, dm->hidden * 4, "input_norm")) ||
        !(l->post_norm = hold(h, item[1], 0, dm->hidden * 4, "post_attention_norm")))
        return -1;
    if (item[2] != Py_None && !(l->q_norm = hold(h, item[2], 0, dm->d * 4, "q_norm"))) return -1;
    if (item[3] != Py_None && !(l->k_norm = hold(h, item[3], 0, dm->d * 4, "k_norm"))) return -1;
    if (!l->q_norm != !l->k_norm) {
        PyErr_SetString(PyExc_ValueError, "decoder_layers: q_norm and k_norm come together");
        return -1;
    }
    if (parse_product(h, item[4], qkv_width, dm->hidden, "qkv", &l->qkv) ||
        parse_product(h, item[5], dm->hidden, q_width, "o", &l->o) ||
        parse_product(h, item[6], 2 * dm->width, dm->hidden, "gate_up", &l->gate_up) ||
        parse_product(h, item[7], dm->hidden, dm->width, "down", &l->down))
        return -1;
    if (!(a->k_cache = hold(h, item[8], 1, cache, "k_cache")) || !(a->v_cache = hold(h, item[9], 1, cache, "v_cache")))
        return -1;
    return 0;
}

enum { LAYER_OK = 0, LAYER_NO_MEMORY, LAYER_DAMAGED };

/* One layer on x [rows, hidden], in place. Runs without the GIL. */
static int run_layer(const Layer *l, const Dims *dm, SpzAttend *a, float *x, const Work *w, char *damaged) {
    const int64_t rows = dm->rows, qkv_width = (dm->heads + 2 * dm->kv_heads) * dm->d;
    spz_rms_norm_rows(x, l->input_norm, w->normed, rows, dm->hidden, dm->eps);
    if (product(&l->qkv, w->normed, w->qkv, rows, dm->threads, damaged)) return LAYER_DAMAGED;
    if (l->q_norm)
        for (int64_t r = 0; r < rows; r++) {
            float *q = w->qkv + r * qkv_width, *k = q + dm->heads * dm->d;
            spz_rms_norm_rows(q, l->q_norm, q, dm->heads, dm->d, dm->eps);
            spz_rms_norm_rows(k, l->k_norm, k, dm->kv_heads, dm->d, dm->eps);
        }
    a->qkv = w->qkv;
    a->out = w->attn;
    a->failed = 0;
    if (spz_attend(a, spz_threads_for(dm->threads, a->batch * a->heads * a->tokens * a->used * a->d * 2)))
        return LAYER_NO_MEMORY;
    if (product(&l->o, w->attn, w->y, rows, dm->threads, damaged)) return LAYER_DAMAGED;
    add_into(x, w->y, rows * dm->hidden);
    spz_rms_norm_rows(x, l->post_norm, w->normed, rows, dm->hidden, dm->eps);
    if (product(&l->gate_up, w->normed, w->gate_up, rows, dm->threads, damaged)) return LAYER_DAMAGED;
    spz_silu_mul_rows(w->gate_up, w->act, rows, dm->width);
    if (product(&l->down, w->act, w->y, rows, dm->threads, damaged)) return LAYER_DAMAGED;
    add_into(x, w->y, rows * dm->hidden);
    return LAYER_OK;
}

static float *work_alloc(const Dims *dm, Work *w) {
    const int64_t r = dm->rows, qkv_width = (dm->heads + 2 * dm->kv_heads) * dm->d;
    const int64_t sizes[6] = {r * dm->hidden, r * qkv_width, r * dm->heads * dm->d, r * dm->hidden,
                              r * 2 * dm->width, r * dm->width};
    int64_t total = 0;
    for (int i = 0; i < 6; i++) total += sizes[i];
    float *block = malloc((size_t)total * sizeof(float));
    if (!block) return NULL;
    float **slots[6] = {&w->normed, &w->qkv, &w->attn, &w->y, &w->gate_up, &w->act};
    float *next = block;
    for (int i = 0; i < 6; i++) {
        *slots[i] = next;
        next += sizes[i];
    }
    return block;
}

PyObject *spz_py_decoder_layers(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *x_obj, *layers_obj;
    Py_buffer b[4]; /* cos, sin, pos, mask */
    long long batch, tokens, hidden, heads, kv_heads, d, width, max_len, used, rope_rows, mask_rows;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "OOy*y*y*y*LLLLLLLLLLLfi", &x_obj, &layers_obj, &b[0], &b[1], &b[2], &b[3], &batch,
                          &tokens, &hidden, &heads, &kv_heads, &d, &width, &max_len, &used, &rope_rows, &mask_rows,
                          &eps, &threads))
        return NULL;
    PyObject *result = NULL, *layers = NULL;
    float *block = NULL;
    Held x_held = {.count = 0}, held = {.count = 0};
    const Dims dm = {batch * tokens, hidden, heads, kv_heads, d, width, eps, threads};
    SpzAttend a = {.cos = b[0].buf, .sin = b[1].buf, .pos = b[2].buf, .mask = b[3].buf, .batch = batch,
                   .tokens = tokens, .heads = heads, .kv_heads = kv_heads, .d = d, .max_len = max_len, .used = used,
                   .rope_rows = rope_rows, .mask_rows = mask_rows};
    Work work;
    if (batch < 1 || tokens < 1 || hidden < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "decoder_layers: bad shape");
        goto done;
    }
    float *x = hold(&x_held, x_obj, 1, dm.rows * hidden * 4, "x");
    if (!x || !(layers = PySequence_Fast(layers_obj, "decoder_layers: layers is not a sequence"))) goto done;
    /* attend's own size check, with the lengths its buffers would have (the caches are checked per layer) */
    const Py_ssize_t cache = batch * kv_heads * max_len * d * 4;
    const Py_ssize_t lens[8] = {dm.rows * (heads + 2 * kv_heads) * d * 4, b[0].len, b[1].len, cache, cache, b[2].len,
                                b[3].len, dm.rows * heads * d * 4};
    if (!spz_attend_sizes_ok(&a, lens)) {
        PyErr_SetString(PyExc_ValueError, "decoder_layers: attention buffers or positions do not match the shape");
        goto done;
    }
    if (!(block = work_alloc(&dm, &work))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(layers); i++) {
        Layer layer;
        if (parse_layer(&held, PySequence_Fast_GET_ITEM(layers, i), &dm, &a, &layer)) goto done;
        int outcome;
        char damaged[sizeof ((ErrState *)0)->msg];
        Py_BEGIN_ALLOW_THREADS
        outcome = run_layer(&layer, &dm, &a, x, &work, damaged);
        Py_END_ALLOW_THREADS
        release_all(&held);
        if (outcome == LAYER_NO_MEMORY) PyErr_NoMemory();
        if (outcome == LAYER_DAMAGED) PyErr_SetString(PyExc_ValueError, damaged);
        if (outcome != LAYER_OK) goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(block);
    release_all(&held);
    release_all(&x_held);
    Py_XDECREF(layers);
    for (int i = 0; i < 4; i++) PyBuffer_Release(&b[i]);
    return result;
}

int spz_add_product_kinds(PyObject *module) {
    return PyModule_AddIntConstant(module, "PRODUCT_DENSE", PRODUCT_DENSE) ||
           PyModule_AddIntConstant(module, "PRODUCT_SPARSE", PRODUCT_SPARSE) ||
           PyModule_AddIntConstant(module, "PRODUCT_CODEC", PRODUCT_CODEC);
}
