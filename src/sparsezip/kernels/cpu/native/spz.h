/* The native core shared by every CPU kernel of sparsezip (one extension, sparsezip.kernels.cpu._native):
 * one CPU-feature detection that picks the kernel level at run time, one persistent thread pool, the lookup
 * tables of the bitmap kernels, and the summation order that every kernel which must agree bit for bit follows.
 *
 * Kernels are compiled for several levels in one binary (function target attributes, never -march=native) and
 * choose by spz_level() on every call, so one build runs on any x86-64 CPU and tests can force the fallbacks.
 */
#ifndef SPZ_H
#define SPZ_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPZ_X86 1
#endif

#define SPZ_TILE 128        /* the codec's tile edge: the unit of the summation order below */
/* Columns per block of a column-blocked dense matrix (gemv.c): 8 KB of fp32 x, a whole number of tiles. */
#define SPZ_BLOCK_COLS 2048
#define SPZ_MAX_THREADS 64

/* ------------------------------------------------------------------ CPU features (features.c) */

/* Kernel levels, each a superset of the one before. AVX2 means AVX2 + FMA + F16C + POPCNT + BMI2 (and SSSE3),
 * all enabled by the OS; AVX512 adds AVX-512 F/BW/VL/VBMI2 with the OS saving the ZMM state. */
enum { SPZ_SCALAR = 0, SPZ_AVX2 = 1, SPZ_AVX512 = 2, SPZ_LEVELS = 3 };
/* The instructions a level's code is compiled with (function target attributes); features.c grants each level
 * only when the CPU has them and the OS enabled them. */
#define SPZ_TARGET_AVX2 "avx2,fma,f16c,popcnt,bmi2"
#define SPZ_TARGET_AVX512 SPZ_TARGET_AVX2 ",avx512f,avx512vl"
/* A helper of the AVX2 kernels, inlined into each (also into the AVX-512 level's, whose target includes AVX2's). */
#define AVX2 __attribute__((target(SPZ_TARGET_AVX2), always_inline)) static inline
#define AVX512 __attribute__((target(SPZ_TARGET_AVX512), always_inline)) static inline

void spz_features_init(void);
int spz_level(void);                    /* the level kernels use now: the best detected, capped by spz_set_level */
int spz_detected_level(void);           /* the best level this CPU and OS support */
int spz_set_level(int level);           /* cap the level (tests force fallbacks); returns the previous cap */
const char *spz_level_name(int level);
PyObject *spz_features_dict(void);      /* every feature flag, for `sparsezip info` */

/* ------------------------------------------------------------------ thread pool (pool.c) */

/* fn(ctx, part, parts) for part in 0..parts-1 on the pool's persistent threads, the caller running part 0;
 * returns when all are done. Call without the GIL. */
typedef void (*SpzPartFn)(void *ctx, int part, int parts);
void spz_run_parts(SpzPartFn fn, void *ctx, int parts);
void spz_run_parts_nogil(SpzPartFn fn, void *ctx, int parts); /* the same from a Python entry point */
void spz_pool_init(void);
/* This thread's scratch buffer of at least `bytes` (kept between calls, freed when the thread ends); NULL when
 * out of memory. */
void *spz_scratch(size_t bytes);
static inline int64_t spz_part_begin(int64_t n, int part, int parts) { return n * part / parts; }

/* ------------------------------------------------------------------ tables (tables.c) */

extern uint8_t spz_pop8[256];                /* bits set in a byte */
extern uint8_t spz_expand16[256][16];        /* pshufb: the next popcount(m) u16 values into the lanes set in m */
extern uint8_t spz_expand_sparse[2][256][16]; /* pshufb for a group of the sparse layout (gemv.c) with bitmap m:
                                                 its values 1 byte each into the lanes' high byte ([0][m]) or 2
                                                 bytes each ([1][m], spz_expand16's) */
extern uint8_t spz_compact16[256][16];       /* pshufb: the u16 lanes set in m, packed to the front */
extern uint16_t spz_sign16[256][8];          /* 0x8000 in u16 lane j when bit j of the byte is set */
void spz_tables_init(void);

/* ------------------------------------------------------------------ fp16 and the shared summation order */

/* IEEE binary16 -> binary32 bits, subnormals and inf/NaN payloads included. */
static inline uint32_t spz_half_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return sign | 0x7F800000u | man << 13;
    if (exp) return sign | (exp + 112) << 23 | man << 13;
    if (!man) return sign;
    exp = 113; /* subnormal: normalise */
    while (!(man & 0x400)) {
        man <<= 1;
        exp--;
    }
    return sign | exp << 23 | (man & 0x3FF) << 13;
}

static inline float spz_half(uint16_t h) {
    uint32_t bits = spz_half_bits(h);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* THE SUMMATION ORDER. Every kernel whose results must agree bit for bit -- the dense fp16 GEMV, the sparse
 * layout's GEMV and the product straight from codec tiles -- computes a dot product of a weight row with x as:
 *   the sum, left to right starting from 0, of its 128-column tile sums; and a tile sum is
 *   SCALAR: its products added one by one, from 0, in column order;
 *   AVX2:   8 fp32 lanes, lane j accumulating (by fma, from 0) the products of the tile's columns 8g + j over its
 *           whole groups of 8, the lanes added by spz_hsum8; then the tile's last cols % 8 products added one by
 *           one to their own sum from 0, which is added to the lanes' sum.
 * Absent (pruned) entries take part as exact zeros where a kernel works on 8-column groups. The file is built
 * with -ffp-contract=off so that no compiler contracts the scalar steps into FMAs on its own. */
static inline float spz_dot_scalar(const uint16_t *w, const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t c = 0; c < n; c++) sum += spz_half(w[c]) * x[c];
    return sum;
}

#ifdef SPZ_X86
__attribute__((target("avx2,fma,f16c"))) static inline float spz_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x & ((1 << bits) - 1), and x << shift, each one BMI2 instruction into its own register. Written plainly, GCC
 * copies x (a mov) and masks or shifts the copy when x stays in use (a group's code is also its table offset), and
 * the kernels that use these are bound by instructions per 8-column group. */
__attribute__((target("bmi2"))) static inline uint64_t spz_low_bits(uint64_t x, uint64_t bits) {
    uint64_t out;
    __asm__("bzhi %2, %1, %0" : "=&r"(out) : "r"(x), "r"(bits));
    return out;
}

__attribute__((target("bmi2"))) static inline uint64_t spz_shift_left(uint64_t x, uint64_t shift) {
    uint64_t out;
    __asm__("shlx %2, %1, %0" : "=&r"(out) : "r"(x), "r"(shift));
    return out;
}

/* Lane b = spz_hsum8(v[b]) for 8 accumulators at once, bit for bit: the same pairs added in the same tree (lanes
 * i + 4, then 0 + 2 and 1 + 3, then those two), in 23 instructions instead of 8 x 6. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 spz_hsum8x8(const __m256 *v) {
    __m256 half[4], quarter[2];
    for (int i = 0; i < 4; i++) /* [v[2i] lanes 0-3 + 4-7 | v[2i+1] lanes 0-3 + 4-7] */
        half[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                                _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++) /* per 128-bit lane: [0 + 2, 1 + 3] of two accumulators */
        quarter[i] = _mm256_add_ps(_mm256_shuffle_ps(half[2 * i], half[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(half[2 * i], half[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(quarter[0], quarter[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm256_shuffle_ps(quarter[0], quarter[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* sums: v0 v2 v4 v6 v1 .. */
}

/* The upper 256 bits of v (AVX-512 F: the DQ form is not part of the AVX-512 level). */
AVX512 __m256 spz_upper_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* spz_hsum8x8 of the 8 halves of pairs[0 .. 4), 512-bit vectors that each carry two activation rows' lanes (row b
 * in pair b / 2's half b % 2), bit for bit: the same lanes added in the same tree, in 12 instructions for the 8 rows
 * instead of 4 extractions and 23. */
AVX512 __m256 spz_hsum8x8_pairs(const __m512 *pairs) {
    __m512 quarter[2]; /* [row 4h + 0 .. 3: lanes i + i + 4] per 128-bit lane */
    for (int h = 0; h < 2; h++)
        quarter[h] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * h], pairs[2 * h + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(pairs[2 * h], pairs[2 * h + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* per 128-bit lane l: [row l: 0 + 2, 1 + 3, row 4 + l: 0 + 2, 1 + 3] */
    const __m512 eighth = _mm512_add_ps(_mm512_shuffle_ps(quarter[0], quarter[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                        _mm512_shuffle_ps(quarter[0], quarter[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighth, eighth, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_ps(eighth, eighth, _MM_SHUFFLE(3, 1, 3, 1)));
    /* sums: lane 4l = row l, lane 4l + 1 = row 4 + l */
    return _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), sums));
}
#endif

/* ------------------------------------------------------------------ kernels other files call (on the pool: call
 * them without the GIL) */

/* Multiply-adds below which a kernel runs on the calling thread alone: handing work to the pool's other threads
 * costs a few microseconds. Python's threads_for reads it as the module constant PARALLEL_MIN_WORK. */
#define SPZ_PARALLEL_MIN_WORK (1 << 16)
static inline int spz_threads_for(int threads, int64_t multiply_adds) {
    return multiply_adds >= SPZ_PARALLEL_MIN_WORK ? threads : 1;
}

/* The sparse layout of gemv.c (built by kernels/cpu/gemv.py's pack_sparse). */
typedef struct {
    const uint8_t *codes;
    const uint8_t *values;
    const int64_t *row_start;
    const uint64_t *chunk_start;
    int64_t n, k;
} SpzSparse;

/* y[m, n] = x[m, k] . W^T from a dense fp16 W (gemv.c). */
void spz_gemv_dense(const uint16_t *w, const float *x, float *y, int64_t n, int64_t k, int64_t m, int blocked,
                    int threads);
/* The same from the sparse layout, bit-identical (gemv.c). */
void spz_gemv_sparse(const SpzSparse *s, const float *x, float *y, int64_t m, int threads);
/* O(1) checks of the sparse layout's array sizes against its shape; -1 with a Python error set (GIL held). */
int spz_sparse_check(const SpzSparse *s, Py_ssize_t codes_len, Py_ssize_t values_len, Py_ssize_t row_start_len,
                     Py_ssize_t chunk_start_len);

/* A decode step's steps between products (decode.c). */
void spz_rms_norm_rows(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps);
void spz_silu_mul_rows(const float *gate_up, float *out, int64_t rows, int64_t width);

/* Attention of a decode step's tokens against the KV cache, see decode.c for the shapes. */
typedef struct {
    const float *qkv, *cos, *sin;
    float *k_cache, *v_cache, *out;
    const int64_t *pos;
    const uint8_t *mask;
    int64_t batch, tokens, heads, kv_heads, d, max_len, used, rope_rows, mask_rows;
    int failed; /* a worker could not allocate its scratch (atomic) */
} SpzAttend;
/* Writes the new keys and values into the cache, then out; -1 when out of memory. */
int spz_attend(SpzAttend *a, int threads);
/* 1 when the buffers' lengths (qkv, cos, sin, k_cache, v_cache, pos, mask, out) match a's shape and positions. */
int spz_attend_sizes_ok(const SpzAttend *a, const Py_ssize_t *lens);

/* ------------------------------------------------------------------ Python entry points (module.c lists them) */

PyObject *spz_py_v2_histogram(PyObject *self, PyObject *args);
PyObject *spz_py_v2_encode(PyObject *self, PyObject *args);
PyObject *spz_py_v3_encode(PyObject *self, PyObject *args);
PyObject *spz_py_decode(PyObject *self, PyObject *args);
PyObject *spz_py_gemv_f16(PyObject *self, PyObject *args);
PyObject *spz_py_sparse_gemv(PyObject *self, PyObject *args);
PyObject *spz_py_sparse_unpack(PyObject *self, PyObject *args);
PyObject *spz_py_obs_block(PyObject *self, PyObject *args);
PyObject *spz_py_kth_smallest(PyObject *self, PyObject *args);
PyObject *spz_py_read_sum(PyObject *self, PyObject *args);
PyObject *spz_py_rms_norm(PyObject *self, PyObject *args);
PyObject *spz_py_silu_mul(PyObject *self, PyObject *args);
PyObject *spz_py_attend(PyObject *self, PyObject *args);
PyObject *spz_py_decoder_layers(PyObject *self, PyObject *args);
int spz_add_product_kinds(PyObject *module); /* layer.c's PRODUCT_* constants; -1 on failure */

#endif
