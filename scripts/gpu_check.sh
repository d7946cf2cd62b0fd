#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU. Installs nothing: it needs python3 with
# cupy (cuda12x or cuda13x), numpy and pytest, and torch with CUDA for the comparison. Runs from the
# source tree (PYTHONPATH=.), finishes in under 8 minutes, and writes a markdown report to
# $OUT/gpu-results.md (OUT defaults to ./gpu-check-out) plus the raw logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
REPORT="$OUT/gpu-results.md"
status=0

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
fenced() { { echo '```'; cat; echo '```'; } >>"$REPORT"; }

printf '# cnn_gpu GPU check\n\nDate (UTC): %s\n' "$(date -u '+%Y-%m-%d %H:%M')" >"$REPORT"
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)
printf 'GPU: %s\n' "${GPU_NAME:-unknown}" >>"$REPORT"

section "nvidia-smi"
nvidia-smi 2>&1 | fenced

section "cnn-gpu info (compiles every kernel for this GPU)"
timeout 120 "$PY" -m cnn_gpu info 2>&1 | tee "$OUT/info.log" | fenced || status=1

section "GPU tests: pytest -m gpu (the suite with xp = cupy, and the stand-in tests on real CuPy)"
# tests/test_standin.py's library tests take gpu_cupy: the stand-in in CI, real CuPy here (marked gpu)
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -n 40 | fenced
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

section "The GPU budget per training step, counted through the CuPy stand-in (needs g++)"
timeout 120 "$PY" benchmarks/gpu_budget.py --batch 128 --epoch-steps 2 2>&1 | tee "$OUT/gpu_budget.log" | fenced || true

section "NVRTC compile check with this machine's CUDA"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_kernels_nvrtc.py 2>&1 | tee "$OUT/pytest-nvrtc.log" | tail -n 15 | fenced
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

section "Training step time against torch (CUDA, cuDNN) on the same GPU"
timeout 240 "$PY" benchmarks/step_time.py --backend cupy --models lenet5 vgg_small resnet20 --batch 128 512 --repeat 20 --warmup 5 2>&1 \
    | tee "$OUT/step_time.log" >>"$REPORT" || status=1

section "BatchNorm kernels: segments per channel (auto) against one block per channel, and torch"
timeout 60 "$PY" benchmarks/bn_gpu.py --batch 128 --repeat 50 2>&1 | tee "$OUT/bn_gpu.log" >>"$REPORT" || status=1

section "Where the time goes (cupyx.profiler, one vgg_small step at batch 128)"
timeout 60 "$PY" benchmarks/step_time.py --backend cupy --models vgg_small --batch 128 --profile 2>&1 \
    | tee "$OUT/profile.log" | fenced || true

printf '\nexit status: %s\n' "$status" >>"$REPORT"
cat "$REPORT"
exit "$status"
