#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic dataset, on CPU, in minutes:
# raw data -> prepare (+ the stand-in for an ImageNet backbone) -> Stage I -> Stage II -> evaluate, then the test
# results table of both stages.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default runs/demo; delete it to start over)
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
OUT="${1:-runs/demo}"
RAW="$OUT/raw"; PREPARED="$OUT/prepared"; RUNS="$OUT"; BACKBONE="$OUT/backbone_resnet18.pth"
CONFIG1=configs/demo.yaml; CONFIG2=configs/demo.yaml; NGPU=1
TRAIN_ARGS=(--pretrained "$BACKBONE"); EVAL_ARGS=(--visualize 5)
START=$(date +%s)
prepare_data() {
  [ -f "$RAW/dataset_flickr30k.json" ] || python -m prepare.synthetic --out "$RAW" --images 200 --val 50 --test 50 \
    --seed 0 --full-captions --overwrite
  python -m prepare.flickr30k --images "$RAW/images" --captions "$RAW/results_20130124.token" \
    --split-json "$RAW/dataset_flickr30k.json" --word2vec "$RAW/word2vec.bin" --out "$PREPARED" --image-size 72
}
step_prepare
if [ -f "$BACKBONE" ]; then echo "[backbone] $BACKBONE is complete: skipped"; else
  echo "[backbone] pretraining the image CNN on synthetic scene attributes (the ImageNet stand-in) -> $BACKBONE"
  python -m prepare.synthetic_backbone --out "$BACKBONE" --exclude "$RAW/scenes.json" --arch resnet18 --size 64 \
    --seed 0 || exit 1
fi
step_train 1
step_evaluate 1
step_train 2
step_evaluate 2
echo
echo "## Synthetic test split (50 images, 250 captions), $(( $(date +%s) - START )) s wall time"
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
echo "chance level: R@1 = 2 and R@10 = 20 in both directions. TensorBoard: tensorboard --logdir $OUT"
