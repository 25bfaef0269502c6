#!/usr/bin/env bash
# Every GPU figure of the training-speed work in one run (a GPU host; `all` took 11 min on one H200 on
# 2026-12-04, before breakdown was added):
#   bash bench/gpu_check.sh [all|mechanics|speed|breakdown|rows|streams|inductor|demo]... [--out DIR]
# mechanics: the CUDA tests of the captured step (tests/test_cuda_step.py), eager vs captured parity over 200 steps
#            of the Flickr30k Stage II recipe (bench/graph_parity.py);
# speed:     ResNet-50 Flickr30k recipes at the paper's batch of 32, eager and captured, fp32 (TF32) and bf16, and
#            captured at 128 and 256 (bench/train_throughput.py, with each run's peak GPU memory), plus one
#            validation pass;
# breakdown: where the captured step's GPU time goes, part by part (image path, text path, mining's forwards, SGD),
#            Stage I and II of the same recipes, fp32 and bf16 (bench/step_breakdown.py; not yet run on a GPU:
#            ~2 min estimated from the speed part's Trainer builds and captures);
# rows:      the other recipe rows at batch 32, captured, each with its dataset's W: ResNet-152 and VGG-19 (Flickr30k,
#            29,783 classes), ResNet-50 and VGG-19 (MSCOCO, 113,287), ResNet-50 and VGG-16 (CUHK-PEDES, 11,003);
#            ROWS="coco_vgg19:113287 ..." (config prefix:classes) measures only those; 90 steps each (with 30, two
#            rows' windows lasted 0.3-0.9 s and their loops read 55-62 % of the model step, every other >= 94 %);
# streams:   (not in all) first a candidate layout of the text CNN, (N, L, C) matrix products against the model's
#            (N, C, L) convolutions (bench/text_layout.py, ~20 s); then branch_streams: true (opt-in since 2026-12-05,
#            the image and text paths on two CUDA streams): its CUDA tests (each path on its own stream; trains like
#            one stream), the ResNet-50 recipes at batch 32 captured with and without it, then with compile: inductor
#            too, and 60 steps of Stage II eager / captured with and without it against eager
#            (bench/graph_parity.py --branch-streams); ~7 min estimated;
# inductor:  compile: inductor (opt-in; not in all; its limits add up to 20 min), the figures that decide whether it
#            can be the default first: one batch's gradients per module against float64, eager TF32 off / on /
#            inductor (bench/graph_parity.py --one-step); the ResNet-50 recipes at batch 32, captured, with and
#            without it; 60 steps of eager / captured / inductor beside eager from weights changed by one rounding
#            (--perturb: how far the recipe itself amplifies rounding); the CUDA tests of that mode; last, the
#            gradients with the whole text CNN compiled (the scope of the first speed figures, wrong on CPU);
# demo:      scripts/demo.sh end to end, timed (alone on the machine: the shared synthetic set is built after it
#            when demo is the first part).
# Parts run in the order given. With one short device session (15 min, 10 per command):
#   timeout 570 bash bench/gpu_check.sh demo streams breakdown --out DIR   (the demo alone, the streams' figures,
#   then where the captured step's time goes, as far as the time allows; the next session's: `inductor`, `speed`)
# Tables are appended to DIR/BENCHMARKS.md (default: the repository's BENCHMARKS.md), logs to DIR/*.log. Runs with
# the python on PATH (or .venv's); a failing part does not stop the others; exit 1 if any failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PARTS=(); OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR="$2"; shift 2 ;;
    all|mechanics|speed|breakdown|rows|streams|inductor|demo) PARTS+=("$1"); shift ;;
    *) echo "usage: bash bench/gpu_check.sh [all|mechanics|speed|breakdown|rows|streams|inductor|demo]..." \
            "[--out DIR]" >&2
       exit 2 ;;
  esac
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(all)
[[ " ${PARTS[*]} " == *" all "* ]] && PARTS=(mechanics speed breakdown rows demo)
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUTDIR="${OUTDIR:-.}"; mkdir -p "$OUTDIR"
MD="$OUTDIR/BENCHMARKS.md"; [ "$OUTDIR" = . ] && MD=BENCHMARKS.md
[ -f "$MD" ] || cp BENCHMARKS.md "$MD"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NPROC=$(nproc); WORKERS=$(( NPROC > 2 ? NPROC - 2 : 1 ))
FAILED=()
run() {  # run NAME SECONDS CMD...: one piece, time-limited, logged, failure recorded
  local name="$1" limit="$2"; shift 2
  echo; echo "=== $name (limit ${limit}s): $* [$(date +%H:%M:%S)]"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || { echo "no CUDA device: this script measures GPUs"; exit 1; }
TT=("$PY" bench/train_throughput.py --output "$MD" --workers "$WORKERS")
# the shared synthetic set (4,096 training images at 256 px + 500 val/test), built once, in the background: from the
# start, or after the demo when it comes first (its timing should not share the CPUs with the build)
DATA_PID=""
build_data() {
  [ -n "$DATA_PID" ] && return
  "$PY" -c "import sys; sys.path.insert(0, 'bench'); import common; common.synthetic_prepared(4096, 256, holdout=500)" \
    > "$OUTDIR/data.log" 2>&1 &
  DATA_PID=$!
}
wait_data() { build_data; wait "$DATA_PID"; }
[ "${PARTS[0]}" = demo ] || build_data
for part in "${PARTS[@]}"; do
  case "$part" in
    mechanics)
      run cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_step.py
      wait_data
      run parity 150 "$PY" bench/graph_parity.py --output "$MD" ;;
    speed)
      wait_data
      run speed_b32 240 "${TT[@]}" --steps 60 --warmup 15 --batch-size 32 --validate
      run speed_bf16 120 "${TT[@]}" --steps 60 --warmup 15 --batch-size 32 --compile cuda_graph --precision bf16
      # one epoch of the 4,096-image set holds 32 batches of 128 and 16 of 256: warm-up + steps fit in it
      run speed_b128 120 "${TT[@]}" --steps 24 --warmup 8 --batch-size 128 --compile cuda_graph
      run speed_b256 120 "${TT[@]}" --steps 12 --warmup 4 --batch-size 256 --compile cuda_graph ;;
    breakdown)
      wait_data
      run breakdown 240 "$PY" bench/step_breakdown.py --output "$MD" --precision fp32 bf16 ;;
    rows)
      wait_data
      for row in ${ROWS:-flickr30k_resnet152:29783 flickr30k_vgg19:29783 coco:113287 coco_vgg19:113287 \
                        cuhk_pedes:11003 cuhk_pedes_vgg16:11003}; do
        run "row_${row%%:*}" 150 "${TT[@]}" --steps 90 --warmup 15 --compile cuda_graph \
          --config "configs/${row%%:*}_stage{stage}.yaml" --classifier-classes "${row##*:}"
      done ;;
    streams)
      run text_layout 90 "$PY" bench/text_layout.py --output "$MD"  # the text CNN: (N, C, L) vs candidate (N, L, C)
      run streams_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_step.py -k branch_streams
      wait_data
      run streams_b32 240 "${TT[@]}" --steps 40 --warmup 12 --batch-size 32 --compile cuda_graph --branch-streams off on
      # with inductor too: together they are the candidate for Stage II's 1,800 pairs/s (inductor alone: `inductor`)
      run streams_inductor_b32 240 "${TT[@]}" --steps 40 --warmup 12 --batch-size 32 --compile inductor \
        --branch-streams on
      run streams_parity 200 "$PY" bench/graph_parity.py --steps 60 --weights-at 20 --branch-streams --output "$MD" ;;
    inductor)
      wait_data
      run inductor_grads 200 "$PY" bench/graph_parity.py --one-step --inductor --output "$MD"
      run inductor_b32 300 "${TT[@]}" --steps 40 --warmup 12 --batch-size 32 --compile cuda_graph inductor
      run inductor_drift 300 "$PY" bench/graph_parity.py --steps 60 --weights-at 20 --inductor --perturb 6e-8 \
        --output "$MD"
      run inductor_tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_step.py -k inductor
      # last: the scope of the first measurements (the whole text CNN), whose word-embedding gradient was wrong on CPU
      run inductor_grads_whole 200 "$PY" bench/graph_parity.py --one-step --inductor --inductor-scope whole \
        --output "$MD" ;;
    demo)
      run demo 240 bash -c "time bash scripts/demo.sh runs/demo_gpu"
      build_data ;;
  esac
done
wait
echo
[ ${#FAILED[@]} -eq 0 ] && { echo "gpu_check: all parts done; tables in $MD"; exit 0; }
echo "gpu_check: FAILED: ${FAILED[*]} (logs in $OUTDIR)"; exit 1
