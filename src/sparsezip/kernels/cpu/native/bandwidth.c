/* read_sum(buffer, threads): one pass reading every byte of a buffer on the pool's threads (each a contiguous
 * slice), returning a checksum so no compiler drops the reads. Timed by the caller, it is the machine's memory read
 * bandwidth that the benchmarks divide by the bytes a decode step reads: the physical limit of batch-1 decoding. */
#include "spz.h"

typedef struct {
    const uint64_t *words;
    int64_t count;
    uint64_t sums[SPZ_MAX_THREADS];
} ReadJob;

#ifdef SPZ_X86
/* 32-byte loads, the width the AVX2 kernels read with. */
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint64_t *w, int64_t begin, int64_t end) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
        a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(w + i)));
        b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(w + i + 4)));
        c = _mm256_add_epi64(c, _mm256_loadu_si256((const __m256i *)(w + i + 8)));
        d = _mm256_add_epi64(d, _mm256_loadu_si256((const __m256i *)(w + i + 12)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
    uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < end; i++) sum += w[i];
    return sum;
}
#endif

static void read_part(void *ctx, int part, int parts) {
    ReadJob *j = (ReadJob *)ctx;
    const int64_t begin = spz_part_begin(j->count, part, parts), end = spz_part_begin(j->count, part + 1, parts);
#ifdef SPZ_X86
    if (spz_level() >= SPZ_AVX2) {
        j->sums[part] = read_avx2(j->words, begin, end);
        return;
    }
#endif
    uint64_t a = 0, b = 0, c = 0, d = 0; /* four chains: the loop waits on memory, not on additions */
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
        a += j->words[i];
        b += j->words[i + 1];
        c += j->words[i + 2];
        d += j->words[i + 3];
    }
    for (; i < end; i++) a += j->words[i];
    j->sums[part] = a + b + c + d;
}

PyObject *spz_py_read_sum(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    int threads;
    if (!PyArg_ParseTuple(args, "y*i", &buf, &threads)) return NULL;
    ReadJob job = {.words = buf.buf, .count = buf.len / 8};
    if (threads > SPZ_MAX_THREADS) threads = SPZ_MAX_THREADS;
    spz_run_parts_nogil(read_part, &job, threads);
    uint64_t sum = 0;
    for (int i = 0; i < SPZ_MAX_THREADS; i++) sum += job.sums[i];
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLongLong(sum);
}
