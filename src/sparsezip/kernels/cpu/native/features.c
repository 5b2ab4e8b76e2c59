/* One CPU-feature detection for every kernel: what CPUID lists *and* the OS has enabled (XCR0), because a
 * feature the OS does not save across context switches traps on first use even though CPUID lists it. */
#include "spz.h"

#ifdef SPZ_X86
#include <cpuid.h>
#endif

typedef struct {
    const char *name;
    int on;
} Flag;

enum {
    F_SSSE3, F_POPCNT, F_FMA, F_F16C, F_AVX, F_AVX2, F_BMI2, F_AVX512F, F_AVX512BW, F_AVX512VL, F_AVX512VBMI,
    F_AVX512VBMI2, F_AVX512VNNI, F_AVX512BF16, F_AVX512FP16, F_AMX_TILE, F_OS_AVX, F_OS_AVX512, F_OS_AMX, F_COUNT
};

static Flag FLAGS[F_COUNT] = {
    {"ssse3", 0}, {"popcnt", 0}, {"fma", 0}, {"f16c", 0}, {"avx", 0}, {"avx2", 0}, {"bmi2", 0}, {"avx512f", 0},
    {"avx512bw", 0}, {"avx512vl", 0}, {"avx512vbmi", 0}, {"avx512vbmi2", 0}, {"avx512vnni", 0}, {"avx512bf16", 0},
    {"avx512fp16", 0}, {"amx_tile", 0}, {"os_avx", 0}, {"os_avx512", 0}, {"os_amx", 0},
};

static int DETECTED = SPZ_SCALAR;
static int CAP = SPZ_LEVELS - 1;
static const char *NAMES[SPZ_LEVELS] = {"scalar", "avx2", "avx512"};

#ifdef SPZ_X86
static uint64_t xcr0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t)edx << 32 | eax;
}

static void detect(void) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    FLAGS[F_SSSE3].on = c >> 9 & 1;
    FLAGS[F_FMA].on = c >> 12 & 1;
    FLAGS[F_POPCNT].on = c >> 23 & 1;
    FLAGS[F_AVX].on = c >> 28 & 1;
    FLAGS[F_F16C].on = c >> 29 & 1;
    int osxsave = c >> 27 & 1;
    uint64_t xcr = osxsave ? xcr0() : 0;
    FLAGS[F_OS_AVX].on = (xcr & 0x6) == 0x6;        /* XMM and YMM state */
    FLAGS[F_OS_AVX512].on = (xcr & 0xE6) == 0xE6;   /* plus opmask and both ZMM halves */
    FLAGS[F_OS_AMX].on = (xcr & 0x60000) == 0x60000; /* tile config and data (Linux also wants a permission) */
    unsigned max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        FLAGS[F_AVX2].on = b >> 5 & 1;
        FLAGS[F_BMI2].on = b >> 8 & 1;
        FLAGS[F_AVX512F].on = b >> 16 & 1;
        FLAGS[F_AVX512BW].on = b >> 30 & 1;
        FLAGS[F_AVX512VL].on = b >> 31 & 1;
        FLAGS[F_AVX512VBMI].on = c >> 1 & 1;
        FLAGS[F_AVX512VBMI2].on = c >> 6 & 1;
        FLAGS[F_AVX512VNNI].on = c >> 11 & 1;
        FLAGS[F_AVX512FP16].on = d >> 23 & 1;
        FLAGS[F_AMX_TILE].on = d >> 24 & 1;
        unsigned subleaves = a;
        if (subleaves >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            FLAGS[F_AVX512BF16].on = a >> 5 & 1;
        }
    }
    int avx2 = FLAGS[F_OS_AVX].on && FLAGS[F_AVX].on && FLAGS[F_AVX2].on && FLAGS[F_FMA].on && FLAGS[F_F16C].on &&
               FLAGS[F_POPCNT].on && FLAGS[F_BMI2].on && FLAGS[F_SSSE3].on;
    int avx512 = avx2 && FLAGS[F_OS_AVX512].on && FLAGS[F_AVX512F].on && FLAGS[F_AVX512BW].on &&
                 FLAGS[F_AVX512VL].on && FLAGS[F_AVX512VBMI2].on;
    DETECTED = avx512 ? SPZ_AVX512 : avx2 ? SPZ_AVX2 : SPZ_SCALAR;
}
#else
static void detect(void) {}
#endif

void spz_features_init(void) { detect(); }

int spz_detected_level(void) { return DETECTED; }

int spz_level(void) { return DETECTED < CAP ? DETECTED : CAP; }

int spz_set_level(int level) {
    int previous = CAP;
    CAP = level < SPZ_SCALAR ? SPZ_SCALAR : level >= SPZ_LEVELS ? SPZ_LEVELS - 1 : level;
    return previous;
}

const char *spz_level_name(int level) { return level >= 0 && level < SPZ_LEVELS ? NAMES[level] : "unknown"; }

PyObject *spz_features_dict(void) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < F_COUNT; i++)
        if (PyDict_SetItemString(d, FLAGS[i].name, FLAGS[i].on ? Py_True : Py_False)) {
            Py_DECREF(d);
            return NULL;
        }
    return d;
}
