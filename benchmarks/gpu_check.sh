#!/usr/bin/env bash
# The prepared check for one CUDA GPU: every figure into one file, OUT_DIR/gpu_check.md, in <= 8 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]             on the GPU machine (OUT_DIR: $OUT, else benchmarks/results/gpu_check)
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]   on a CPU: the same steps at tiny sizes, each checked
#
# Steps, each under its own time limit (a step that fails or runs out is reported, the others still run):
#   1. environment (GPU, torch, triton, the benchmark peers)
#   2. the CUDA tests: pytest -m cuda
#   3. pytest benchmarks/ for the fused loss at the 7B shape (N=8192 D=4096 V=32000 n=4 bf16) against eager,
#      torch.compile, liger-kernel and cut-cross-entropy (each per head), and the TD kernel at B*L = 1M
#      (achieved HBM bandwidth in the GB/s column)
#   4. each recipe for 20 steps under torchrun --nproc_per_node=1 in bf16 on the tiny artifacts (loss finite
#      and falling, tokens/s, peak memory); verifiable and Rho-1 with packed rows
#   5. a ~1B-parameter MTP step's MFU, eager and with per-block torch.compile (benchmarks/bench_mfu.py)
# Python: $PYTHON, else `python`. The project need not be installed (PYTHONPATH is set). Benchmark peers
# not in the image can travel as wheels in .whl/ (see the device notes); they are installed into a
# temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Each step runs as `gpu_check.sh --step NAME` (this script again) under `timeout`, which stops the
# step's whole process group at its limit; the parent passes its settings through the environment.
STEP=
if [[ "${1:-}" == "--step" ]]; then STEP=$2; shift 2; fi
if [[ -z "$STEP" ]]; then
    DRY_RUN=0
    if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
    OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_check}}
    mkdir -p "$OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/wmtp-gpu-check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    export DRY_RUN OUT_DIR WORK PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
        MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
fi
PY=${PYTHON:-python}
SUMMARY=$OUT_DIR/gpu_check.md
LOG=$OUT_DIR/gpu_check.log

if [[ -z "$STEP" ]] && [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

if (( DRY_RUN )); then
    DEVICE=cpu PRECISION=fp32 STEPS=3 MFU_FLAG=--dry-run FALLING=
    TEST_ARGS=(--collect-only -q)
    BENCH_ENV=(WMTP_BENCH_DEVICE=cpu WMTP_BENCH_N=64 WMTP_BENCH_D=32 WMTP_BENCH_V=512 WMTP_BENCH_DTYPE=float32
               WMTP_BENCH_7B=0 WMTP_BENCH_TD_B=8 WMTP_BENCH_TD_L=128 WMTP_BENCH_REPEATS=1 WMTP_BENCH_WARMUP=0
               WMTP_BENCH_MIN_TIME_S=0 WMTP_BENCH_INTERPRET_BUDGET_S=0)
    # One case of each kind: every case is a fresh process (seconds each, whatever the size), and the
    # compiled ones' CPU compiles would take most of a dry run.
    BENCH_SELECT=(-k "not compile and not cut-cross-entropy and not per-head and not fused-none and not python-loop and not lam0.0")
    LIMITS=(60 60 300 300 300)
else
    DEVICE=cuda PRECISION=bf16 STEPS=20 MFU_FLAG= FALLING=--require-falling
    TEST_ARGS=(-q -x)
    BENCH_ENV=(WMTP_BENCH_DEVICE=cuda WMTP_BENCH_N=8192 WMTP_BENCH_D=4096 WMTP_BENCH_V=32000 WMTP_BENCH_HEADS=4
               WMTP_BENCH_DTYPE=bfloat16 WMTP_BENCH_7B=0 WMTP_BENCH_TD_B=512 WMTP_BENCH_TD_L=2048)
    BENCH_SELECT=()
    LIMITS=(30 90 180 120 120)
fi

# step NAME LIMIT_S FUNCTION: run it under a time limit, its output into the log, its status into the summary.
step() {
    local name=$1 limit=$2 fn=$3
    local t0=$SECONDS status
    echo "=== $name" >> "$LOG"
    timeout --kill-after=10 "$limit" bash "$ROOT/benchmarks/gpu_check.sh" --step "$fn" >> "$LOG" 2>&1
    status=$?
    local took=$((SECONDS - t0))
    if (( status == 0 )); then
        echo "- $name: ok (${took} s)" >> "$SUMMARY"
    else
        FAILED=1
        local why="exit $status"
        (( status == 124 || status == 137 )) && why="over its ${limit} s limit"
        echo "- $name: FAILED, $why (${took} s); see gpu_check.log" >> "$SUMMARY"
    fi
    echo "$name: status $status, ${took} s"
}

environment() {
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for dist in ("triton", "liger-kernel", "cut-cross-entropy", "torchao", "transformers"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "absent")
EOF
}

cuda_tests() {
    "$PY" -m pytest -m cuda "${TEST_ARGS[@]}" -p no:cacheprovider tests/
}

kernel_benchmarks() {
    env "${BENCH_ENV[@]}" WMTP_BENCH_RESULTS="$OUT_DIR" "$PY" -m pytest -q -s -p no:cacheprovider "${BENCH_SELECT[@]}" \
        benchmarks/test_bench_loss.py benchmarks/test_bench_td.py > "$WORK/bench.out" 2>&1
    local status=$?
    cat "$WORK/bench.out"
    return $status
}

recipes() {
    "$PY" scripts/make_tiny.py --out "$WORK/tiny" --source synthetic --max-problems 120 || return 1
    local tiny=$WORK/tiny name extra
    # The learning rates of the CPU tests' 20-step runs, whose losses fall. Verifiable and Rho-1 pack
    # their rows (FlexAttention's document mask, per-row TD weights, the reference on packed rows).
    local packed=(--data.packing true --model.max_seq_len 512)
    for name in baseline critic verifiable rho1; do
        case $name in
            critic) extra=(--optimizer.lr 3e-2 --validation.path "$tiny/data/valid.jsonl") ;;
            verifiable) extra=(--optimizer.lr 3e-3 --critic.value_head "$WORK/run_critic/final/value_head.safetensors"
                               "${packed[@]}") ;;
            rho1) extra=(--optimizer.lr 3e-3 --reference.path "$tiny/reference" "${packed[@]}") ;;
            *) extra=(--optimizer.lr 3e-3) ;;
        esac
        "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "recipes/full_finetune_$name.py" \
            --config "configs/${name}_tiny.toml" --model.path "$tiny/mtp_model" --tokenizer.path "$tiny/tokenizer.model" \
            --data.train_path "$tiny/data/train.jsonl" --training.output_dir "$WORK/run_$name" \
            --training.max_steps "$STEPS" --training.log_every 1 --training.device "$DEVICE" \
            --training.precision "$PRECISION" --training.micro_batch_size 4 --lr_scheduler.warmup_steps 3 \
            --checkpoint.save_every 0 --metrics.mlflow false --metrics.progress_bar false "${extra[@]}" || return 1
    done
    "$PY" benchmarks/gpu_check_report.py recipes "$WORK" --steps "$STEPS" $FALLING > "$WORK/recipes.md"
}

mfu() {
    local flag
    for flag in "" --compile; do
        "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/bench_mfu.py $MFU_FLAG $flag \
            --out "$OUT_DIR/mfu${flag:+_compile}.json" || return 1
    done
    "$PY" benchmarks/gpu_check_report.py mfu "$OUT_DIR/mfu.json" "$OUT_DIR/mfu_compile.json" > "$WORK/mfu.md"
}

if [[ -n "$STEP" ]]; then
    "$STEP"
    exit $?
fi

FAILED=0
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)$( (( DRY_RUN )) && echo ' (dry run on the CPU)')"
    echo
    echo "## Steps"
} > "$SUMMARY"
: > "$LOG"
step "environment" "${LIMITS[0]}" environment
step "CUDA tests (pytest -m cuda)" "${LIMITS[1]}" cuda_tests
step "kernel benchmarks (loss at the 7B shape, TD at B*L = 1M)" "${LIMITS[2]}" kernel_benchmarks
step "recipes, $STEPS steps each under torchrun --nproc_per_node=1, $PRECISION" "${LIMITS[3]}" recipes
step "MFU of a ~1B MTP step, eager and compiled" "${LIMITS[4]}" mfu

{
    echo
    echo "## Environment"
    echo '```'
    sed -n '/^=== environment$/,/^=== /p' "$LOG" | grep -v '^=== '
    echo '```'
    echo
    echo "## CUDA tests"
    echo '```'
    sed -n '/^=== CUDA tests/,/^=== /p' "$LOG" | grep -v '^=== ' | tail -n 15
    echo '```'
    echo
    echo "## Kernel benchmarks"
    echo '```'
    [[ -f "$WORK/bench.out" ]] && sed -n '/= benchmarks =/,$p' "$WORK/bench.out"
    echo '```'
    echo
    echo "## Recipes"
    [[ -f "$WORK/recipes.md" ]] && cat "$WORK/recipes.md"
    echo
    echo "## MFU"
    [[ -f "$WORK/mfu.md" ]] && cat "$WORK/mfu.md"
} >> "$SUMMARY"

echo "summary: $SUMMARY"
exit $FAILED
