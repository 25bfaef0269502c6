#!/usr/bin/env bash
# Flickr30k, ResNet-50 (paper Table 1): prepare -> Stage I (240 epochs) -> Stage II (60) -> test + paper table.
# Every step is skipped when complete and resumed when interrupted: just run the script again.
# ---- edit these ----------------------------------------------------------------------------------------------
IMAGES=${IMAGES:-/data/flickr30k/flickr30k-images}
CAPTIONS=${CAPTIONS:-/data/flickr30k/results_20130124.token}
SPLIT_JSON=${SPLIT_JSON:-/data/flickr30k/dataset_flickr30k.json}   # Karpathy split (or see --flickr8k-lists)
WORD2VEC=${WORD2VEC:-/data/GoogleNews-vectors-negative300.bin.gz}
PREPARED=${PREPARED:-data/flickr30k}
RUNS=${RUNS:-runs/flickr30k_resnet50}
NGPU=${NGPU:-1}
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
CONFIG1=configs/flickr30k_stage1.yaml; CONFIG2=configs/flickr30k_stage2.yaml
TRAIN_ARGS=(); EVAL_ARGS=(--visualize 5)
prepare_data() {
  python -m prepare.flickr30k --images "$IMAGES" --captions "$CAPTIONS" --split-json "$SPLIT_JSON" \
    --word2vec "$WORD2VEC" --out "$PREPARED"
}
step_prepare
step_train 1; step_evaluate 1 --compare-paper flickr30k/resnet50/stage1
step_train 2; step_evaluate 2 --compare-paper flickr30k/resnet50/stage2
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
