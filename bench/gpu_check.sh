#!/usr/bin/env bash
# One-shot check of the Triton kernels on a CUDA machine (H100/H200), run once by a person with a GPU:
#   1. the Python: a venv with requirements.txt (the PyPI torch wheel is the CUDA build) and sparsezip installed; or,
#      with OFFLINE=1, $PYTHON as it is (a GPU image that holds torch and triton and reaches no package index), with
#      src/ on the path and the native CPU codec built in place when a compiler allows (else numpy paths encode);
#   2. tests/test_triton.py compiled for the real GPU (TRITON_INTERPRET unset);
#   3. bench/gpu.py: a 4096 x 4096 matrix and the Qwen3-32B shapes, both codecs, fused kernel against cuBLAS;
#   4. bench/gpu_decode.py: decode tokens/s of dense and the compressed layouts on a random 1.2B-shaped model, its
#      folders built in the background while the tests run; each layout's op profile goes to decode.log. It needs the
#      demo tokenizer: TOKENIZER=folder, or the demo model fetched by sparsezip_demo (online only); skipped when
#      neither is there.
# Results go under $OUT (default out/gpu_check): env.txt, native.log (OFFLINE), pytest.log, bench.md, bench.log,
# decode.md, decode.log.
# Usage: bash bench/gpu_check.sh [extra bench/gpu.py arguments, e.g. --tp 1 --batch 1 8]
# Environment: PYTHON (default python3), VENV (default .venv-gpu; an existing one is reused), OFFLINE, TOKENIZER,
# DECODE_LAYERS (default 24).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
VENV="${VENV:-.venv-gpu}"
mkdir -p "$OUT"

if [ "${OFFLINE:-0}" = 1 ]; then
  PY="${PYTHON:-python3}"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" setup.py -q build_ext --inplace > "$OUT/native.log" 2>&1 \
    || echo "native CPU codec not built (see $OUT/native.log)"
else
  if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r requirements.txt
  "$VENV/bin/pip" install --quiet --no-deps -e .  # also builds the optional native CPU codec
  PY="$VENV/bin/python"
fi
unset TRITON_INTERPRET  # the real kernels, compiled for this GPU

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print('triton', triton.__version__)"
  "$PY" -c "from sparsezip.kernels import cpu; print('native CPU codec:', cpu.available())"
} | tee "$OUT/env.txt"

TOKENIZER="${TOKENIZER:-$("$PY" -m sparsezip_demo -q model 2>/dev/null || true)}"
decode_args=(--tokenizer "$TOKENIZER" --layers "${DECODE_LAYERS:-24}")
prep=""
if [ -n "$TOKENIZER" ]; then
  "$PY" bench/gpu_decode.py "${decode_args[@]}" --prepare_only > "$OUT/decode.log" 2>&1 &
  prep=$!
fi

echo "== tests/test_triton.py on the GPU"
tests=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$OUT/pytest.log" || tests=$?

if [ -n "$prep" ] && ! wait "$prep"; then
  echo "building the decode benchmark's folders failed: see $OUT/decode.log" >&2
  prep=failed
fi

echo "== bench/gpu.py (runs even if a test failed: its 'max rel err' column and decode check show the damage)"
"$PY" bench/gpu.py "$@" 2> >(tee "$OUT/bench.log" >&2) | tee "$OUT/bench.md" || echo "bench/gpu.py failed" >&2

if [ -z "$TOKENIZER" ]; then
  echo "== bench/gpu_decode.py skipped: no demo tokenizer (set TOKENIZER=folder)"
elif [ "$prep" != failed ]; then
  echo "== bench/gpu_decode.py"
  "$PY" bench/gpu_decode.py "${decode_args[@]}" --profile 2>> "$OUT/decode.log" | tee "$OUT/decode.md" \
    || echo "bench/gpu_decode.py failed: see $OUT/decode.log" >&2
fi
echo "results in $OUT; bench/gpu.py --out BENCHMARKS.md and bench/gpu_decode.py --out BENCHMARKS.md fill its sections"
if [ "$tests" -ne 0 ]; then
  echo "tests/test_triton.py FAILED on this GPU (exit $tests): see $OUT/pytest.log" >&2
  exit "$tests"
fi
