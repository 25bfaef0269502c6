#!/usr/bin/env bash
# Every benchmark, appended to BENCHMARKS.md (sections 1-5, 7, 12, 13), on this machine's device (CUDA when present):
#   bash bench/run_all.sh              # the real run (a quiet machine, or the GPU host)
#   bash bench/run_all.sh --no-write   # extra arguments go to every script
#   SMOKE=1 bash bench/run_all.sh --no-write   # tiny settings: checks that everything runs (a few minutes on CPU)
# Uses .venv (scripts/_setup.sh). Synthetic datasets are cached under runs/bench_data/ (the CUDA default, 29,783
# training images at 256 px, is built once: a few minutes). The log goes to runs/bench_logs/. A failing benchmark
# does not stop the others; the exit status is 1 if any failed.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/_setup.sh"
set +e
mkdir -p runs/bench_logs
LOG="runs/bench_logs/run_all_$(date +%Y%m%d_%H%M%S).log"
exec > >(tee -a "$LOG") 2>&1
CUDA=$(python -c "import torch; print(int(torch.cuda.is_available()))")
NPROC=$(nproc)
FAILED=()

run() {  # run NAME ARGS...: one benchmark, timed, failure recorded
  local name="$1"; shift
  echo; echo "=== $name: python $* (started $(date +%H:%M:%S))"
  local t0=$SECONDS
  python "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || FAILED+=("$name")
}

if [ "${SMOKE:-0}" = 1 ]; then
  echo "SMOKE=1: tiny settings"
  run prepare bench/prepare_speed.py --medium 32 --large 32 --workers 1 2 "$@"
  run loader bench/loader_throughput.py --train-images 128 --batches 4 --inprocess 2 --model-steps 1 "$@"
  run train bench/train_throughput.py --train-images 128 --steps 2 --warmup 1 "$@"
  run breakdown bench/step_breakdown.py --train-images 128 --steps 1 "$@"
  run text-layout bench/text_layout.py --width 0.0625 --candidates 16 --repeats 1 "$@"
  run memory bench/memory.py --batch-size 2 --candidates 8 --steps 1 "$@"
  run eval bench/eval_speed.py --images 300 --repeats 1 "$@"
  run cli bench/cli_speed.py --repeats 1 --skip-embeddings "$@"
elif [ "$CUDA" = 1 ]; then
  WORKERS=$(( NPROC < 8 ? NPROC : 8 ))
  echo "CUDA: paper configs, $NPROC CPU cores, loader workers 2 (config) and $WORKERS"
  run prepare bench/prepare_speed.py "$@"
  run loader-stage1 bench/loader_throughput.py --stage 1 "$@"
  run train-b32 bench/train_throughput.py --batch-size 32 --workers 2 "$WORKERS" "$@"
  run train-b128 bench/train_throughput.py --batch-size 128 --workers "$WORKERS" "$NPROC" "$@"
  run breakdown bench/step_breakdown.py --precision fp32 bf16 "$@"
  run text-layout bench/text_layout.py "$@"
  run memory bench/memory.py "$@"
  run eval bench/eval_speed.py "$@"
  run cli bench/cli_speed.py "$@"
else
  echo "CPU: demo config ($NPROC cores)"
  run prepare bench/prepare_speed.py "$@"
  run loader bench/loader_throughput.py "$@"
  run train bench/train_throughput.py --workers 1 2 "$@"
  run breakdown bench/step_breakdown.py "$@"
  run text-layout bench/text_layout.py "$@"
  run memory bench/memory.py "$@"
  run eval bench/eval_speed.py "$@"
  run cli bench/cli_speed.py "$@"
fi

echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]} (log: $LOG)"
  exit 1
fi
echo "all benchmarks done (log: $LOG)"
