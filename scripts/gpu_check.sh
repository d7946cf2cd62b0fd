#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU, which may be lent for a few minutes only.
# Installs nothing: it needs python3 with cupy (cuda12x or cuda13x), numpy and pytest, and torch with
# CUDA for the comparison; no network. Runs from the source tree (PYTHONPATH=.).
#
# It finishes within BUDGET = 480 s (8 minutes), enforced here: every section runs under a timeout
# of at most its own limit and never past the deadline (the limits add up to less than the budget;
# tests/test_gpu_check.py checks that). Sections run in order of importance, correctness first:
#   1. the GPU tests (pytest -m gpu: the suite with xp = cupy, the stand-in tests on real CuPy,
#      gpu_budget.py --real's timing code),
#   2. training runs on real-shaped data (MNIST- and CIFAR-10-shaped, made here, learnable): lenet5
#      with the training step as one CUDA graph (--cuda-graph on) and eagerly (off), resnet20 (auto),
#   3. step times of cnn_gpu's step as one CUDA graph and eagerly against torch (eager, cuDNN) for
#      lenet5, vgg_small, resnet20 at batch 128 and 512,
#   4. benchmarks/gpu_budget.py --real: each step's host (dispatch) time against its kernel time,
#      eagerly and as one CUDA graph,
#   5. the BatchNorm kernels against torch's.
# Each section's output goes to its log under $OUT as it comes and to the report $OUT/gpu-results.md
# as soon as the section ends, so a run cut short keeps every section it finished. $OUT (default
# ./gpu-check-out) gets at most 7 files: the report and six logs (a device tool returns at most 8).
#
# GPU_CHECK_DRY_RUN=1 prints one line per section (limit, log, report format, title, command) and
# runs nothing (tests/test_gpu_check.py reads it).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu-check-out}"
PY="${PYTHON:-python3}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
BUDGET="${GPU_CHECK_BUDGET:-480}"  # seconds for the whole script (smaller only to test the script)
GRACE=5     # seconds between a section's SIGINT (pytest and Python print what they have) and SIGKILL
REPORT="$OUT/gpu-results.md"
SCRATCH=$(mktemp -d)  # synthetic data and run folders: never under $OUT
trap 'rm -rf "$SCRATCH"' EXIT
status=0
summary=""
last_out="$SCRATCH/section.out"  # the output of the section that ran last

# section LIMIT LOG FORMAT TITLE COMMAND...: run COMMAND for at most LIMIT seconds (less when the
# deadline is nearer), its output appended to $OUT/LOG as it comes; when it ends, the report gets the
# output as FORMAT says: "all" (fenced), "tail" (its last 40 lines, fenced) or "md" (as it is: a
# markdown table; fenced if the command failed).
section() {
    local limit=$1 log=$2 format=$3 title=$4
    shift 4
    if [ "$DRY_RUN" = 1 ]; then
        printf 'SECTION\t%s\t%s\t%s\t%s\t%s\n' "$limit" "$log" "$format" "$title" "$(printf '%q ' "$@")"
        return 0
    fi
    local left=$((BUDGET - SECONDS)) t rc start=$SECONDS cmd="$*"
    t=$((limit < left ? limit : left))
    printf '\n## %s\n\n' "$title" >>"$REPORT"
    if [ "$t" -le $((GRACE + 1)) ]; then
        printf 'Not run: the %s s budget is spent.\n' "$BUDGET" | tee -a "$OUT/$log" >>"$REPORT"
        summary+="| $title | not run (budget spent) | - |"$'\n'
        : >"$last_out"
        status=1
        return 0
    fi
    printf '\n==== %s (limit %s s) ====\n$ %s\n' "$title" "$t" "${cmd:0:300}" >>"$OUT/$log"
    # straight into the log, no pipe: nothing left behind by the command (a process that ignored the
    # signal) can hold the section open past its limit
    local offset=$(($(wc -c <"$OUT/$log")))
    timeout -s INT -k "$GRACE" "$((t - GRACE))" "$@" >>"$OUT/$log" 2>&1
    rc=$?
    tail -c +"$((offset + 1))" "$OUT/$log" >"$last_out"
    case "$format" in
        md) if [ "$rc" -eq 0 ]; then cat "$last_out"; else echo '```'; cat "$last_out"; echo '```'; fi >>"$REPORT" ;;
        tail) { echo '```'; tail -n 40 "$last_out"; echo '```'; } >>"$REPORT" ;;
        *) { echo '```'; cat "$last_out"; echo '```'; } >>"$REPORT" ;;
    esac
    local what="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT (exit $rc)"; fi
    printf '\n(%s after %s s; limit %s s)\n' "$what" "$((SECONDS - start))" "$t" | tee -a "$OUT/$log" >>"$REPORT"
    summary+="| $title | $what | $((SECONDS - start)) s of $t |"$'\n'
    [ "$rc" -eq 0 ] || status=1
    return 0
}

# train_run LIMIT MIN_ACCURACY TITLE ARGS...: `cnn-gpu train --backend cupy` with ARGS on the synthetic
# data; the run fails below MIN_ACCURACY (%) test accuracy (the data are easy: ~100% is expected).
train_run() {
    local limit=$1 min_acc=$2 title=$3 acc
    shift 3
    runs=$((${runs:-0} + 1))
    section "$limit" train.log all "$title" "$PY" -m cnn_gpu train --backend cupy --data-dir "$SCRATCH/data" \
        --run-dir "$SCRATCH/run-$runs" --progress plain "$@"
    if [ "$DRY_RUN" = 1 ] || [ ! -s "$last_out" ]; then return 0; fi  # (not run: already a failure)
    acc=$(sed -n 's/^test accuracy: \([0-9.]*\)%.*/\1/p' "$last_out" | tail -n 1)
    if [ -z "$acc" ] || ! awk -v a="$acc" -v m="$min_acc" 'BEGIN { exit !(a >= m) }'; then
        printf 'FAILED: test accuracy %s%%, expected at least %s%%\n' "${acc:-missing}" "$min_acc" \
            | tee -a "$OUT/train.log" >>"$REPORT"
        status=1
    fi
}

# Writes MNIST-shaped IDX files and a CIFAR-10-shaped cifar-10-batches-py/ folder (the same sizes as
# the real sets, which this machine cannot download) under the folder given: class k is a bright bar
# at its own place (MNIST) or a centred square of its own colour (CIFAR-10, unchanged by crop-flip).
MAKE_DATA=$(cat <<'EOF'
import pickle, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
def idx(path, a):
    head = (0x0803 if a.ndim == 3 else 0x0801).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in a.shape)
    path.write_bytes(head + a.astype(np.uint8).tobytes())
(root / "mnist").mkdir(parents=True, exist_ok=True)
for split, n in (("train", 60000), ("t10k", 10000)):
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 96, (n, 28, 28), dtype=np.uint8)
    for k in range(10):
        r, c = 2 + 12 * (k // 5), 1 + 5 * (k % 5)
        x[y == k, r:r + 12, c:c + 5] += 150
    idx(root / "mnist" / f"{split}-images-idx3-ubyte", x)
    idx(root / "mnist" / f"{split}-labels-idx1-ubyte", y)
colors = np.array([[r, g, b] for r in (0, 120, 240) for g in (0, 120, 240) for b in (0, 240)][1:11], np.uint8)
folder = root / "cifar-10-batches-py"
folder.mkdir(parents=True, exist_ok=True)
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    y = rng.integers(0, 10, 10000)
    x = rng.integers(0, 64, (10000, 3, 32, 32), dtype=np.uint8)
    x[:, :, 10:22, 10:22] += colors[y][:, :, None, None] // 2
    with open(folder / name, "wb") as f:
        pickle.dump({b"data": x.reshape(10000, -1), b"labels": y.tolist()}, f)
print(f"MNIST- and CIFAR-10-shaped data in {root}")
EOF
)

if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$OUT"
    GPU_NAME=$(timeout 10 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null)
    {
        printf '# cnn_gpu GPU check\n\nDate (UTC): %s\n' "$(date -u '+%Y-%m-%d %H:%M')"
        printf 'GPU: %s\nCommit: %s (plus any uncommitted changes)\nBudget: %s s, sections in order of importance\n' \
            "${GPU_NAME:-unknown}" "${COMMIT:-unknown}" "$BUDGET"
    } >"$REPORT"
fi

# 0. the machine, and every kernel compiled for this GPU (a broken CUDA install shows here first)
section 10 env.log all "nvidia-smi" nvidia-smi
section 25 env.log all "cnn-gpu info (compiles every kernel for this GPU)" "$PY" -m cnn_gpu info

# 1. correctness on the GPU: the training and stand-in tests first, then the rest of the gpu suite
#    (tests/test_standin.py's library tests take gpu_cupy: the stand-in in CI, real CuPy here)
FIRST_TESTS=(tests/test_gpu_training.py tests/test_standin.py tests/test_benchmarks.py)
section 60 pytest-gpu.log tail "GPU tests, first: training, the stand-in tests and --real timing on real CuPy (pytest -m gpu)" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs "${FIRST_TESTS[@]}"
section 80 pytest-gpu.log tail "GPU tests, the rest of the suite with xp = cupy (pytest -m gpu)" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE --durations=5 tests \
    "${FIRST_TESTS[@]/#/--ignore=}"

# 2. training runs on real-shaped data: one train_run line each (new flags, e.g. a precision, go on a
#    new line here). lenet5 twice, its training step as one CUDA graph and eagerly: the same accuracy
#    expected, and each epoch line's img/s compares the two; resnet20 with fit's default (auto: the
#    graph, its first replay checked against an eager step)
section 10 train.log all "Synthetic MNIST- and CIFAR-10-shaped data" "$PY" -c "$MAKE_DATA" "$SCRATCH/data"
train_run 25 95 "Training: lenet5 on MNIST-shaped data, 1 epoch, the step as one CUDA graph (cnn-gpu train --backend cupy --cuda-graph on)" \
    --dataset mnist --epochs 1 --cuda-graph on
train_run 25 95 "Training: lenet5 on MNIST-shaped data, 1 epoch, eagerly (--cuda-graph off)" \
    --dataset mnist --epochs 1 --cuda-graph off
train_run 45 90 "Training: resnet20 on CIFAR-10-shaped data, crop-flip augmentation, 1 epoch (--cuda-graph auto)" \
    --dataset cifar10 --epochs 1 --cuda-graph auto
# fp16 against fp32 on the bundled digits, their whole recipe, 3 seeds (the stand-in's numbers: docs/PRECISION.md)
section 30 train.log md "Accuracy: fp16 against fp32, lenet_digits on the digits, 20 epochs, 3 seeds (precision_accuracy.py)" \
    "$PY" benchmarks/precision_accuracy.py --dataset digits --seeds 0 1 2

# 3. speed against torch (eager, cuDNN) on the same GPU, cnn_gpu's step as one CUDA graph and eagerly;
#    one table row printed per configuration
section 85 step_time.log md "Training step time, as one CUDA graph and eagerly, against torch (CUDA, cuDNN) on the same GPU" \
    "$PY" benchmarks/step_time.py --backend cupy --models lenet5 vgg_small resnet20 --batch 128 512 \
    --repeat 21 --warmup 5 --cuda-graph both
# precision: cnn_gpu's step in fp32, tf32 and fp16 against torch's fp32, TF32 and autocast + GradScaler
section 20 step_time.log md "Training step time in fp32, tf32 and fp16 against torch (fp32, TF32, autocast + GradScaler)" \
    "$PY" benchmarks/precision_time.py --models lenet5 vgg_small --batch 128 512 --repeat 11 --warmup 3

# 4. where the time goes: host dispatch against kernels, per step (CUDA events), eagerly and as one CUDA graph
section 45 gpu_budget_real.log all "Host dispatch time against kernel time per step, eager and CUDA graph (gpu_budget.py --real)" \
    "$PY" benchmarks/gpu_budget.py --real --models lenet5 vgg_small resnet20 --batch 128 512 --steps 20 --warmup 3 \
    --cuda-graph on

# 5. the BatchNorm kernels: segments per channel (auto) against one block per channel, and torch
section 20 bn_gpu.log md "BatchNorm kernels against one block per channel and torch" \
    "$PY" benchmarks/bn_gpu.py --batch 128 --repeat 50

[ "$DRY_RUN" = 1 ] && exit 0
{
    printf '\n## Summary\n\n| section | result | time |\n|---|---|---|\n%s' "$summary"
    printf '\nexit status: %s (%s s of the %s s budget)\n' "$status" "$SECONDS" "$BUDGET"
} >>"$REPORT"
cat "$REPORT"
exit "$status"
