/* y = x . W^T for fp16 weights and fp32 activations, for the few rows of a decode step.
 *
 * Why: at batch 1 a decoder is bound by the bytes of weight it reads per token. Keeping W in fp16
 * (as stored) halves those bytes against an fp32 copy, and converting in registers (F16C) costs
 * nothing next to the memory traffic. Accumulation is fp32, so results equal an fp32 matmul on the
 * same (fp16-exact) weights up to summation order.
 *
 * gemv_f16(w, x, y, n, k, m, threads): w uint16 [n, k] (fp16 bit patterns), x float32 [m, k],
 * y float32 [m, n] (written). Rows of W are split over `threads` POSIX threads.
 *
 * Summation order (kept equal to the fused compressed linear of _cpucodec.c, so that a W16A16SC model
 * gives bit-identical results whether its weights are decoded at load or multiplied from the tiles):
 * each 128-column tile of a row is summed on its own (8 SIMD lanes over its whole groups of 8 columns,
 * lanes added pairwise, then its last cols % 8 products one by one), and the tile sums are added to 0
 * left to right. Zero weights take part as exact zeros, as absent entries do there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define MAX_THREADS 64
#define TILE 128 /* the codec's tile width: the unit of the summation order above */
#define X_BLOCK 8 /* activation rows handled per pass over a weight row: 8 accumulators fit in registers */

typedef struct {
    const uint16_t *w;
    const float *x;
    float *y;
    int64_t n, k, m, row_begin, row_end;
} Job;

static float half_to_float(uint16_t h) {
    /* portable IEEE binary16 -> binary32, subnormals and inf/NaN included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Products w[c] * x[c] for c in [begin, end), added one by one to 0. Never contracted into FMAs
 * (-ffp-contract=off), like the fused kernel's scalar path. */
static float dot_tail(const uint16_t *w, const float *x, int64_t begin, int64_t end) {
    float sum = 0.0f;
    for (int64_t c = begin; c < end; c++) sum += half_to_float(w[c]) * x[c];
    return sum;
}

static void rows_portable(const Job *j) {
    for (int64_t r = j->row_begin; r < j->row_end; r++) {
        const uint16_t *wr = j->w + r * j->k;
        for (int64_t b = 0; b < j->m; b++) {
            const float *xb = j->x + b * j->k;
            float total = 0.0f;
            for (int64_t c0 = 0; c0 < j->k; c0 += TILE)
                total += dot_tail(wr, xb, c0, c0 + TILE < j->k ? c0 + TILE : j->k);
            j->y[b * j->n + r] = total;
        }
    }
}

#ifdef HAVE_X86
__attribute__((target("avx2,fma,f16c"))) static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One weight row against nb <= X_BLOCK activation rows starting at b0. Always inlined with a constant
 * nb (see rows_avx2), so the accumulators live in registers and the inner loop is fully unrolled. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void row_block_avx2(const Job *j, int64_t r,
                                                                                        int64_t b0, const int nb) {
    const uint16_t *wr = j->w + r * j->k;
    float total[X_BLOCK] = {0};
    for (int64_t c0 = 0; c0 < j->k; c0 += TILE) {
        const int64_t cols = j->k - c0 < TILE ? j->k - c0 : TILE, full = c0 + (cols & ~(int64_t)7);
        __m256 acc[X_BLOCK];
        for (int b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();
        for (int64_t c = c0; c < full; c += 8) {
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr + c)));
            for (int b = 0; b < nb; b++)
                acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(j->x + (b0 + b) * j->k + c), acc[b]);
        }
        for (int b = 0; b < nb; b++) {
            float tile = hsum(acc[b]);
            if (full < c0 + cols) tile += dot_tail(wr, j->x + (b0 + b) * j->k, full, c0 + cols);
            total[b] += tile;
        }
    }
    for (int b = 0; b < nb; b++) j->y[(b0 + b) * j->n + r] = total[b];
}

__attribute__((target("avx2,fma,f16c"))) static void rows_avx2(const Job *j) {
    for (int64_t r = j->row_begin; r < j->row_end; r++) {
        for (int64_t b0 = 0; b0 < j->m; b0 += X_BLOCK) {
            switch (j->m - b0 < X_BLOCK ? j->m - b0 : X_BLOCK) {
                case 1: row_block_avx2(j, r, b0, 1); break;
                case 2: row_block_avx2(j, r, b0, 2); break;
                case 3: row_block_avx2(j, r, b0, 3); break;
                case 4: row_block_avx2(j, r, b0, 4); break;
                case 5: row_block_avx2(j, r, b0, 5); break;
                case 6: row_block_avx2(j, r, b0, 6); break;
                case 7: row_block_avx2(j, r, b0, 7); break;
                default: row_block_avx2(j, r, b0, 8); break;
            }
        }
    }
}
#endif

static int use_avx2(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static void *run_job(void *arg) {
    const Job *j = (const Job *)arg;
#ifdef HAVE_X86
    if (use_avx2()) {
        rows_avx2(j);
        return NULL;
    }
#endif
    rows_portable(j);
    return NULL;
}

static PyObject *py_gemv_f16(PyObject *self, PyObject *args) {
    Py_buffer w, x, y;
    long long n, k, m;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*w*LLLi", &w, &x, &y, &n, &k, &m, &threads)) return NULL;
    PyObject *result = NULL;
    if (n < 1 || k < 1 || m < 1 || w.len != n * k * 2 || x.len != m * k * 4 || y.len != m * n * 4) {
        PyErr_SetString(PyExc_ValueError, "gemv_f16: buffer sizes do not match n, k, m");
        goto done;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (Job){w.buf, x.buf, y.buf, n, k, m, n * t / threads, n * (t + 1) / threads};
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_job(&jobs[t]); /* could not start a thread: do its rows here */
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    return result;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(use_avx2() ? "avx2+fma+f16c" : "portable");
}

static PyMethodDef METHODS[] = {
    {"gemv_f16", py_gemv_f16, METH_VARARGS, "gemv_f16(w, x, y, n, k, m, threads): y[m,n] = x[m,k] . w[n,k]^T"},
    {"simd", py_simd, METH_NOARGS, "which kernel variant this CPU runs"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_cpugemv", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__cpugemv(void) { return PyModule_Create(&MODULE); }
