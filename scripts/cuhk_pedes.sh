#!/usr/bin/env bash
# CUHK-PEDES (paper Table 5): class = person identity, max_len 56, Stage II with random negatives of another
# identity; text->image retrieval by identity on the official test split (the paper's). One image CNN:
#   ARCH=resnet50 (default) | vgg16     (configs/cuhk_pedes[_vgg16]_stage{1,2}.yaml; docs/recipes.md)
# ---- edit these ----------------------------------------------------------------------------------------------
ARCH=${ARCH:-resnet50}
ROOT=${ROOT:-/data/CUHK-PEDES}                   # holds reid_raw.json and imgs/
WORD2VEC=${WORD2VEC:-/data/GoogleNews-vectors-negative300.bin.gz}
PREPARED=${PREPARED:-data/cuhk_pedes}
RUNS=${RUNS:-runs/cuhk_pedes_$ARCH}
NGPU=${NGPU:-1}
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
case "$ARCH" in
  resnet50) CONFIG1=configs/cuhk_pedes_stage1.yaml; CONFIG2=configs/cuhk_pedes_stage2.yaml ;;
  vgg16) CONFIG1=configs/cuhk_pedes_vgg16_stage1.yaml; CONFIG2=configs/cuhk_pedes_vgg16_stage2.yaml ;;
  *) echo "error: ARCH=$ARCH; valid: resnet50, vgg16" >&2; exit 2 ;;
esac
TRAIN_ARGS=(); EVAL_ARGS=()
prepare_data() { python -m prepare.cuhk_pedes --root "$ROOT" --word2vec "$WORD2VEC" --out "$PREPARED"; }
step_prepare
step_train 1; step_evaluate 1 --compare-paper "cuhk-pedes/$ARCH/stage1"
step_train 2; step_evaluate 2 --compare-paper "cuhk-pedes/$ARCH/stage2"
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
