#!/usr/bin/env bash
# One-shot check of the Triton kernels on a CUDA machine (H100/H200), run once by a person with a GPU:
#   1. a venv with requirements.txt (the PyPI torch wheel is the CUDA build) and sparsezip installed;
#   2. tests/test_triton.py compiled for the real GPU (TRITON_INTERPRET unset);
#   3. bench/gpu.py on the Qwen3-32B shapes, both codecs.
# Results go under $OUT (default out/gpu_check): pytest.log, bench.md (the table), bench.log, env.txt.
# Usage: bash bench/gpu_check.sh [extra bench/gpu.py arguments, e.g. --tp 1 --batch 1]
# Environment: PYTHON (default python3), VENV (default .venv-gpu; an existing one is reused).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
VENV="${VENV:-.venv-gpu}"
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -r requirements.txt
"$VENV/bin/pip" install --quiet --no-deps -e .  # also builds the optional native CPU codec

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print('triton', triton.__version__)"
} | tee "$OUT/env.txt"

echo "== tests/test_triton.py on the GPU"
tests=0
env -u TRITON_INTERPRET "$VENV/bin/python" -m pytest -q tests/test_triton.py 2>&1 | tee "$OUT/pytest.log" || tests=$?

echo "== bench/gpu.py (runs even if a test failed: its 'max rel err' column and decode check show the damage)"
env -u TRITON_INTERPRET "$VENV/bin/python" bench/gpu.py "$@" 2> >(tee "$OUT/bench.log" >&2) | tee "$OUT/bench.md"
echo "results in $OUT; pass --out BENCHMARKS.md to also fill its gpu section"
if [ "$tests" -ne 0 ]; then
  echo "tests/test_triton.py FAILED on this GPU (exit $tests): see $OUT/pytest.log" >&2
  exit "$tests"
fi
