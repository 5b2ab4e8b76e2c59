/* sparsezip.kernels.cpu._native: the one extension module of the CPU kernels (codec, GEMV, pruning). */
#include "spz.h"

static PyObject *py_features(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *flags = spz_features_dict();
    if (!flags) return NULL;
    PyObject *result = Py_BuildValue("{s:s,s:s,s:N}", "level", spz_level_name(spz_level()), "detected",
                                     spz_level_name(spz_detected_level()), "flags", flags);
    return result;
}

static PyObject *py_set_level(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int level = 0; level < SPZ_LEVELS; level++)
        if (!strcmp(name, spz_level_name(level))) return PyUnicode_FromString(spz_level_name(spz_set_level(level)));
    PyErr_Format(PyExc_ValueError, "unknown kernel level %s", name);
    return NULL;
}

static PyMethodDef METHODS[] = {
    {"features", py_features, METH_NOARGS,
     "features() -> {'level': kernel level in use, 'detected': best level of this CPU, 'flags': {name: bool}}"},
    {"set_level", py_set_level, METH_VARARGS,
     "set_level(name) -> previous cap: cap the kernel level at 'scalar', 'avx2' or 'avx512' (tests force fallbacks)"},
    {"v2_histogram", spz_py_v2_histogram, METH_VARARGS, "v2_histogram(bits, n, k, threads) -> 128 int64 counts"},
    {"v2_encode", spz_py_v2_encode, METH_VARARGS,
     "v2_encode(bits, n, k, lengths, prefix, threads) -> (bytearray prefix+payload, int64 offsets bytes)"},
    {"v3_encode", spz_py_v3_encode, METH_VARARGS,
     "v3_encode(bits, n, k, codebook, prefix, threads) -> (bytearray prefix+payload, int64 offsets bytes)"},
    {"decode", spz_py_decode, METH_VARARGS,
     "decode(codec_id, payload, offsets, n, k, out, out_kind, threads[, x]): out_kind 0 fp16 [n, k], 1 fp32 "
     "[n, k], 2 fused linear (out = fp32 y [n] = W x for fp32 x [k])"},
    {"gemv_f16", spz_py_gemv_f16, METH_VARARGS,
     "gemv_f16(w, x, y, n, k, m, blocked, threads): y[m,n] = x[m,k] . w[n,k]^T, w in column blocks if blocked"},
    {"sparse_gemv", spz_py_sparse_gemv, METH_VARARGS,
     "sparse_gemv(codes, values, row_start, x, y, n, k, m, threads): y[m,n] = x[m,k] . W^T (gemv.c's layout)"},
    {"sparse_unpack", spz_py_sparse_unpack, METH_VARARGS,
     "sparse_unpack(codes, values, row_start, out, n, k, out_f32, threads): W as fp16 or fp32 [n, k]"},
    {"rms_norm", spz_py_rms_norm, METH_VARARGS, "rms_norm(x, weight, out, rows, dim, eps): fp32 RMSNorm (decode.c)"},
    {"silu_mul", spz_py_silu_mul, METH_VARARGS, "silu_mul(gate_up, out, rows, width): silu(gate) * up (decode.c)"},
    {"attend", spz_py_attend, METH_VARARGS,
     "attend(qkv, cos, sin, k_cache, v_cache, pos, mask, out, batch, tokens, heads, kv_heads, head_dim, max_len, "
     "used, rope_rows, mask_rows, threads): rotary attention of a decode step against the KV cache (decode.c)"},
    {"decoder_layers", spz_py_decoder_layers, METH_VARARGS,
     "decoder_layers(x, layers, cos, sin, pos, mask, batch, tokens, hidden, heads, kv_heads, head_dim, width, "
     "max_len, used, rope_rows, mask_rows, eps, threads): a decode step through every layer, x in place (layer.c)"},
    {"obs_block", spz_py_obs_block, METH_VARARGS,
     "obs_block(w, h, dead, err, b, rows, prune_k, n, m, threads): SparseGPT's OBS loop over one block"},
    {"kth_smallest", spz_py_kth_smallest, METH_VARARGS, "kth_smallest(values, k): the k-th smallest float32 (1-based)"},
    {"read_sum", spz_py_read_sum, METH_VARARGS,
     "read_sum(buffer, threads) -> checksum: one pass reading the buffer (timed, the memory read bandwidth)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_native", "sparsezip's native CPU kernels", -1, METHODS,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    spz_features_init();
    spz_tables_init();
    spz_pool_init();
    PyObject *module = PyModule_Create(&MODULE);
    if (module && (PyModule_AddIntConstant(module, "TILE", SPZ_TILE) ||
                   PyModule_AddIntConstant(module, "BLOCK_COLS", SPZ_BLOCK_COLS) ||
                   PyModule_AddIntConstant(module, "PARALLEL_MIN_WORK", SPZ_PARALLEL_MIN_WORK) ||
                   spz_add_product_kinds(module)))
        Py_CLEAR(module);
    return module;
}
