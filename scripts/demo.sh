#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic dataset, on CPU, in minutes:
# raw data -> prepare (+ the stand-in for an ImageNet backbone) -> Stage I -> Stage II -> evaluate, then the test
# results table of both stages.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default runs/demo; delete it to start over)
#        SEED=1 bash scripts/demo.sh runs/demo_seed1   (another draw of the synthetic data and backbone pool)
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
OUT="${1:-runs/demo}"
SEED="${SEED:-0}"
[ -f "$OUT/demo_seed" ] || [ ! -f "$OUT/raw/dataset_flickr30k.json" ] || echo 0 > "$OUT/demo_seed"  # older demos: seed 0
if [ -f "$OUT/demo_seed" ] && [ "$(cat "$OUT/demo_seed")" != "$SEED" ]; then
  echo "error: $OUT/demo_seed: $OUT holds the demo of data seed $(cat "$OUT/demo_seed"), not $SEED; give another OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT"; echo "$SEED" > "$OUT/demo_seed"
RAW="$OUT/raw"; PREPARED="$OUT/prepared"; RUNS="$OUT"; BACKBONE="$OUT/backbone_resnet18.pth"
CONFIG1=configs/demo.yaml; CONFIG2=configs/demo.yaml; NGPU=1
TRAIN_ARGS=(--pretrained "$BACKBONE"); EVAL_ARGS=(--visualize 5)
START=$(date +%s)
prepare_data() {
  [ -f "$RAW/dataset_flickr30k.json" ] || python -m prepare.synthetic --out "$RAW" --images 200 --val 50 --test 50 \
    --seed "$SEED" --full-captions --overwrite
  python -m prepare.flickr30k --images "$RAW/images" --captions "$RAW/results_20130124.token" \
    --split-json "$RAW/dataset_flickr30k.json" --word2vec "$RAW/word2vec.bin" --out "$PREPARED" --image-size 72
}
step_prepare
if [ -f "$BACKBONE" ]; then echo "[backbone] $BACKBONE is complete: skipped"; else
  echo "[backbone] pretraining the image CNN on synthetic scene attributes (the ImageNet stand-in) -> $BACKBONE"
  python -m prepare.synthetic_backbone --out "$BACKBONE" --exclude "$RAW/scenes.json" --arch resnet18 --size 64 \
    --seed "$SEED" || exit 1
fi
step_train 1
step_evaluate 1
step_train 2
step_evaluate 2
echo
echo "## Synthetic test split (50 images, 250 captions), data seed $SEED, $(( $(date +%s) - START )) s wall time"
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
echo "TensorBoard: tensorboard --logdir $OUT"
echo "chance level: R@1 2, R@5 10, R@10 20 in each direction, Med r 25.5, rsum 64."
echo "a working install lands at test rsum 95-152 after Stage I and 119-164 after Stage II (data seeds 0-2 on a fresh"
echo "clone, 2026-12-03; Stage II t2i R@10 43-49; other machines gave up to 190: see docs/demo.md)."
echo "A Stage II run near rsum 64 is at chance: something is wrong."
