#!/usr/bin/env bash
# Flickr8k (Flickr30k's formats): prepare -> Stage I -> Stage II -> test. Defaults point at the 1,000-image real
# subset in ../shared/external_data (a CPU check with random-init ResNet-18 and short schedules); for the full
# dataset set the paths and clear TRAIN_ARGS.
# ---- edit these ----------------------------------------------------------------------------------------------
EXT=${EXT:-../shared/external_data}
IMAGES=${IMAGES:-$EXT/flickr8k_1k/Images}
CAPTIONS=${CAPTIONS:-$EXT/flickr8k_1k/subset_1k/Flickr8k.token.subset1k.txt}
SPLIT_JSON=${SPLIT_JSON:-$EXT/flickr8k_1k/subset_1k/dataset_flickr8k.subset1k.json}
WORD2VEC=${WORD2VEC:-$EXT/word2vec_1000/wordvecs1000.w2v.txt}
PREPARED=${PREPARED:-data/flickr8k_1k}
RUNS=${RUNS:-runs/flickr8k_1k}
NGPU=${NGPU:-1}
IMAGE_SIZE=${IMAGE_SIZE:-144}
if [ -z "${TRAIN_ARGS+x}" ]; then   # CPU defaults for the 1k subset: not the paper's recipe
  TRAIN_ARGS=(--arch resnet18 --pretrained none --backbone_bn update --train_crop 128 --feature_dim 512
              --text_width 0.25 --dropout 0.0)
  STAGE1_EPOCHS=${STAGE1_EPOCHS:-'[[20, 1.0]]'}; STAGE2_EPOCHS=${STAGE2_EPOCHS:-'[[3, 1.0]]'}
  STAGE1_LR=${STAGE1_LR:-1.0}; STAGE2_LR=${STAGE2_LR:-0.1}
fi
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
CONFIG1=configs/flickr8k.yaml; CONFIG2=configs/flickr8k.yaml
EVAL_ARGS=(--visualize 5)
prepare_data() {
  python -m prepare.flickr8k --images "$IMAGES" --captions "$CAPTIONS" --split-json "$SPLIT_JSON" \
    --word2vec "$WORD2VEC" --out "$PREPARED" --image-size "$IMAGE_SIZE"
}
step_prepare
BASE_ARGS=("${TRAIN_ARGS[@]}")
[ -n "${STAGE1_EPOCHS:-}" ] && TRAIN_ARGS=("${BASE_ARGS[@]}" --lr_schedule "$STAGE1_EPOCHS" --base_lr "$STAGE1_LR")
step_train 1; step_evaluate 1
[ -n "${STAGE2_EPOCHS:-}" ] && TRAIN_ARGS=("${BASE_ARGS[@]}" --lr_schedule "$STAGE2_EPOCHS" --base_lr "$STAGE2_LR")
step_train 2; step_evaluate 2
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
