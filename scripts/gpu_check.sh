#!/usr/bin/env bash
# One check of txformer on a CUDA machine, within 10 minutes on one GPU: the test suite and the CUDA-only attention
# tests, bf16 training of every attention kind with the profiling callback, the benchmarks up to 64k events, and a
# one-GPU FSDP2 launch. Results go to docs/gpu/ (summary.md, steps.csv, logs/, one folder per run). Each step has its
# own timeout and a failed step does not stop the others; the exit status is non-zero if any step failed.
# docs/gpu.md says more.
#
#   scripts/gpu_check.sh                   # on a machine with CUDA
#   scripts/gpu_check.sh --dry-run         # anywhere: prints the commands and checks scripts, configs and flags
#   PYTHON=/path/to/python scripts/gpu_check.sh --steps 100 --max-length 8192 --only 'train|fsdp2'
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PYTHON=${PYTHON:-python3}
OUTPUT_DIR=docs/gpu
WORK_DIR=outputs/gpu_check
STEPS=200
MAX_LENGTH=16384
ONLY=""
DRY_RUN=0
ARGUMENTS=("$@")

usage() {
    cat <<EOF
Usage: scripts/gpu_check.sh [--dry-run] [--output-dir DIR] [--work-dir DIR] [--steps N] [--max-length L] [--only REGEX]
  --dry-run       print the commands, check that scripts and configs exist and that the flags parse; run nothing
  --output-dir    results, logs and summary.md (default: $OUTPUT_DIR)
  --work-dir      generated data and model folders, not kept in the results (default: $WORK_DIR)
  --steps         optimizer steps of each training run (default: $STEPS)
  --max-length    events kept per history in training; the data's median history is half of it (default: $MAX_LENGTH)
  --only          run only the steps whose name matches this bash regex (machine always runs)
Environment: PYTHON, the interpreter with torch (default: python3).
EOF
}

while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --output-dir) OUTPUT_DIR=${2:?--output-dir needs a value}; shift ;;
        --work-dir) WORK_DIR=${2:?--work-dir needs a value}; shift ;;
        --steps) STEPS=${2:?--steps needs a value}; shift ;;
        --max-length) MAX_LENGTH=${2:?--max-length needs a value}; shift ;;
        --only) ONLY=${2:?--only needs a value}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if ! [[ $STEPS =~ ^[1-9][0-9]*$ && $MAX_LENGTH =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: --steps and --max-length take positive integers (got $STEPS, $MAX_LENGTH)" >&2
    exit 2
fi

# The checkout's own txformer, installed or not (also for the processes that accelerate and the tests start).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LOGS=$OUTPUT_DIR/logs
DATA=$WORK_DIR/data-$MAX_LENGTH
PLAN=$(mktemp)
trap 'rm -f "$PLAN"' EXIT
STEP_ROWS=()
FAILED=0
START=$SECONDS

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND under `timeout`, its output in logs/NAME.log, and records the
# result; under --dry-run prints it and adds it to the plan instead.
run_step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n $ONLY && $name != machine && ! $name =~ $ONLY ]]; then
        return 0
    fi
    if ((DRY_RUN)); then
        printf '%-20s timeout %4ss  %s\n' "$name" "$limit" "$*"
        printf '%q ' "$@" >>"$PLAN"
        echo >>"$PLAN"
        return 0
    fi
    local log=$LOGS/$name.log started=$SECONDS result code
    echo "== $name (timeout ${limit}s): $*"
    { echo "\$ $*"; echo; } >"$log"
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    code=$?
    case $code in
        0) result=pass ;;
        124 | 137) result="FAIL (timeout)" ;;
        *) result=FAIL ;;
    esac
    [[ $code == 0 ]] || FAILED=$((FAILED + 1))
    echo "   $result, exit status $code, $((SECONDS - started)) s; log: $log"
    STEP_ROWS+=("| $name | $result | $code | $((SECONDS - started)) | $limit | [log](logs/$name.log) |")
    echo "$name,$result,$code,$((SECONDS - started)),$limit,logs/$name.log" >>"$OUTPUT_DIR/steps.csv"
    return "$code"
}

# keep_results RUN_DIR NAME: copies a training run's profile, metrics, arguments and config to OUTPUT_DIR/NAME.
keep_results() {
    ((DRY_RUN)) && return 0
    [[ -d $1 ]] || return 0
    mkdir -p "$OUTPUT_DIR/$2"
    local file
    for file in "$1"/profile_summary.json "$1"/profile_steps*.jsonl "$1"/all_results.json "$1"/training_run.json \
        "$1"/config.json; do
        [[ -f $file ]] && cp "$file" "$OUTPUT_DIR/$2/"
    done
    return 0
}

write_summary() {
    local summary=$OUTPUT_DIR/summary.md
    {
        echo "# GPU check"
        echo
        echo "\`scripts/gpu_check.sh ${ARGUMENTS[*]}\`, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'),"
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s in all; $FAILED failed step(s)."
        echo
        echo "## Machine"
        echo
        echo '```'
        cat "$LOGS/nvidia-smi.txt" 2>/dev/null
        echo
        sed '1,2d' "$LOGS/machine.log" 2>/dev/null
        echo '```'
        echo
        echo "## Steps"
        echo
        echo "| step | result | exit status | seconds | timeout (s) | log |"
        echo "|---|---|---|---|---|---|"
        printf '%s\n' "${STEP_ROWS[@]}"
        echo
        echo "## Training runs (bf16, profiling callback; from each run's profile_summary.json and all_results.json)"
        echo
        echo "Synthetic histories of median $((MAX_LENGTH / 2)) events cut to the last $MAX_LENGTH; $STEPS steps per kind."
        echo
        "$PYTHON" -m txformer.gpu_check table "$OUTPUT_DIR" 2>&1
        echo
        echo "## Benchmarks"
        echo
        echo "- [benchmark/benchmark.md](benchmark/benchmark.md): every method at three levels, bf16, up to 65536 events."
        echo "- [benchmark_attention/attention_benchmark.md](benchmark_attention/attention_benchmark.md): the attention ops."
    } >"$summary"
    echo "wrote $summary"
}

KINDS=$("$PYTHON" -m txformer.gpu_check kinds) || {
    echo "gpu_check.sh: '$PYTHON -m txformer.gpu_check kinds' failed: is torch (and transformers) installed for $PYTHON?" >&2
    exit 1
}
if ((DRY_RUN)); then
    echo "Dry run: the commands of scripts/gpu_check.sh (attention kinds: $KINDS), from $REPO"
else
    mkdir -p "$LOGS" "$WORK_DIR"
    echo "step,result,exit_status,seconds,timeout_s,log" >"$OUTPUT_DIR/steps.csv"
    timeout 20 nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$LOGS/nvidia-smi.txt"
fi

if ! run_step machine 20 "$PYTHON" -m txformer.gpu_check machine; then
    write_summary
    echo "gpu_check.sh: no CUDA or a required package is missing ($LOGS/machine.log); nothing else was run." >&2
    exit 1
fi

# The tests pick their own devices: the training tests use CUDA when it is there, the rest the CPU. Parallel by file
# with pytest-xdist when it is installed. The CUDA-only tests are the next step.
PARALLEL=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    PARALLEL=(--numprocesses=8 --dist=loadfile)
fi
run_step tests 90 env OMP_NUM_THREADS=1 "$PYTHON" -m pytest -q "${PARALLEL[@]}" \
    "--junitxml=$OUTPUT_DIR/tests.junit.xml" --ignore=tests/test_cuda_attention.py tests

# flash_attention_2 and flex attention (training) against SDPA; -rs names the tests skipped (no flash-attn package).
run_step cuda_attention 40 env OMP_NUM_THREADS=1 "$PYTHON" -m pytest -q -rs \
    "--junitxml=$OUTPUT_DIR/cuda_attention.junit.xml" tests/test_cuda_attention.py

# Histories of about 4k to 16k events at the default --max-length (5th to 95th percentile: 0.56 to 1.8 × median).
run_step data 30 "$PYTHON" -c "from txformer.data import SyntheticConfig, generate_synthetic_data; \
generate_synthetic_data('$DATA', num_customers=128, seed=0, \
config=SyntheticConfig(median_length=$((MAX_LENGTH / 2)), length_log_std=0.35))"

TRAIN_FLAGS=(
    --transactions "$DATA/transactions.csv" --labels "$DATA/gender_train.csv"
    --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --dataloader_num_workers 4
    --eval_strategy no --save_strategy no --logging_steps 50 --report_to none --disable_tqdm true
)
# The training runs share one budget, so that the steps' timeouts add up to 570 s whatever the number of kinds.
TRAIN_BUDGET_S=200
read -r -a KIND_LIST <<<"$KINDS"
for kind in "${KIND_LIST[@]}"; do
    run_step "train_$kind" $((TRAIN_BUDGET_S / ${#KIND_LIST[@]})) "$PYTHON" scripts/train.py --attention_type "$kind" --max_length "$MAX_LENGTH" \
        --bf16 true --max_steps "$STEPS" "${TRAIN_FLAGS[@]}" --output_dir "$WORK_DIR/train_$kind"
    keep_results "$WORK_DIR/train_$kind" "train_$kind"
done

# bf16 comes from the config's mixed_precision; one process: FSDP2's wrapping and full-state-dict save on one GPU.
run_step fsdp2 40 "$PYTHON" -m accelerate.commands.launch --config_file configs/fsdp2.yaml --num_processes 1 \
    scripts/train.py --attention_type full --max_length 4096 --max_steps 50 "${TRAIN_FLAGS[@]}" \
    --output_dir "$WORK_DIR/fsdp2"
keep_results "$WORK_DIR/fsdp2" fsdp2

run_step benchmark_attention 30 "$PYTHON" scripts/benchmark_attention.py --device cuda \
    --lengths 1024 4096 16384 65536 --max_sdpa_length 65536 --max_naive_length 16384 --min_run_time 1 \
    --output_dir "$OUTPUT_DIR/benchmark_attention"

# Every method of the benchmark's registry (each attention kind, exact SDPA and eager, installed peers); each stops
# before a length predicted to exceed the time or memory budget.
run_step benchmark 120 "$PYTHON" scripts/benchmark.py --device cuda --dtype bfloat16 \
    --lengths 1024 4096 16384 65536 --batch_size 4 --max_seconds 5 --check_max_seconds 20 \
    --output_dir "$OUTPUT_DIR/benchmark"

if ((DRY_RUN)); then
    echo
    echo "Checking the commands (scripts, configs, flags) with $PYTHON:"
    "$PYTHON" -m txformer.gpu_check check "$PLAN"
    exit $?
fi
write_summary
exit $((FAILED > 0))
