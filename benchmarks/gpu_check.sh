#!/usr/bin/env bash
# One device call: the whole test suite on the GPU (the `gpu` tests at real sizes included), then the
# kernel benchmark and the model benchmark. Results land in $OUT (or benchmarks/results by hand).
# Usage: bash benchmarks/gpu_check.sh [extra bench-kernels args...]
# Knobs: SKIP_TESTS=1, TEST_TIMEOUT (s, default 400), SKIP_MODEL=1, MODEL (default minilm).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the whole output goes to the file (a failure's traceback is the one thing a later session needs);
  # the console gets the summary; captured logs (TorchDynamo DEBUG lines) are left out, the seed is kept
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -rfE --tb=short --show-capture=stdout -p no:cacheprovider tests > "$OUT/gpu-tests.log" 2>&1
  tail -n 25 "$OUT/gpu-tests.log"
fi
python3 -m tritonize.cli bench-kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" | tail -n 40
grep -E "tritonize \|" "$OUT"/kernel*.md | cut -c1-200 | tail -n 60
if [ "${SKIP_MODEL:-0}" != 1 ]; then
  python3 -m tritonize.cli bench --model "${MODEL:-minilm}" --out "$OUT" 2>&1 | tee "$OUT/bench-model.log" | tail -n 60
fi
