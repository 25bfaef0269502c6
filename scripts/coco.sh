#!/usr/bin/env bash
# MSCOCO, ResNet-50: prepare (Karpathy split, train+restval = 113,287 classes) -> Stage I -> Stage II ->
# test on 5K and 1K (5 folds), all captions (the original code) and the first 5 (the usual protocol).
# ---- edit these ----------------------------------------------------------------------------------------------
IMAGES=${IMAGES:-/data/coco}                      # holds train2014/ and val2014/
SPLIT_JSON=${SPLIT_JSON:-/data/coco/dataset_coco.json}
WORD2VEC=${WORD2VEC:-/data/GoogleNews-vectors-negative300.bin.gz}
PREPARED=${PREPARED:-data/coco}
RUNS=${RUNS:-runs/coco_resnet50}
NGPU=${NGPU:-1}
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
CONFIG1=configs/coco_stage1.yaml; CONFIG2=configs/coco_stage2.yaml
TRAIN_ARGS=(); EVAL_ARGS=()
prepare_data() {
  python -m prepare.coco --images "$IMAGES" --split-json "$SPLIT_JSON" --word2vec "$WORD2VEC" --out "$PREPARED"
}
step_prepare
step_train 1; step_evaluate 1
step_train 2; step_evaluate 2 --compare-paper coco/resnet50/stage2/5k
ck="$RUNS/stage2/checkpoint_last.pt"
python evaluate.py --checkpoint "$ck" --data "$PREPARED" --split test --coco-1k --out "$RUNS/stage2/results_test_1k.json" \
  --compare-paper coco/resnet50/stage2/1k
python evaluate.py --checkpoint "$ck" --data "$PREPARED" --split test --first-k 5 --out "$RUNS/stage2/results_test_5k_first5.json"
python evaluate.py --table "$RUNS"/stage*/results_test*.json
