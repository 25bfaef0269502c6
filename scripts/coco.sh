#!/usr/bin/env bash
# MSCOCO: prepare (Karpathy split, train+restval = 113,287 classes) -> Stage I -> Stage II -> test on 5K and 1K
# (5 folds), all captions (the original code) and the first 5 (the usual protocol). One image CNN:
#   ARCH=resnet50 (default) | vgg19     (configs/coco[_vgg19]_stage{1,2}.yaml; docs/recipes.md)
# ---- edit these ----------------------------------------------------------------------------------------------
ARCH=${ARCH:-resnet50}
IMAGES=${IMAGES:-/data/coco}                      # holds train2014/ and val2014/
SPLIT_JSON=${SPLIT_JSON:-/data/coco/dataset_coco.json}
WORD2VEC=${WORD2VEC:-/data/GoogleNews-vectors-negative300.bin.gz}
PREPARED=${PREPARED:-data/coco}
DICTIONARY_RULE=${DICTIONARY_RULE:-train}  # train (leak-free) | original (make_dictionary.m: no '?' split; 29,972)
RUNS=${RUNS:-runs/coco_$ARCH}
NGPU=${NGPU:-1}
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
echo "[split] MSCOCO uses Karpathy's split (113,287 / 5,000 / 5,000). The paper's own split was a random one made"
echo "        with MATLAB rng(1) (same sizes, other images) and cannot be rebuilt: the numbers are comparable in"
echo "        protocol and size, not image for image."
case "$ARCH" in
  resnet50) CONFIG1=configs/coco_stage1.yaml; CONFIG2=configs/coco_stage2.yaml
            COMPARE_5K=(--compare-paper coco/resnet50/stage2/5k); COMPARE_1K=(--compare-paper coco/resnet50/stage2/1k) ;;
  vgg19) CONFIG1=configs/coco_vgg19_stage1.yaml; CONFIG2=configs/coco_vgg19_stage2.yaml
         COMPARE_5K=(); COMPARE_1K=() ;;  # no MSCOCO VGG-19 number was seen (spec 9.3)
  *) echo "error: ARCH=$ARCH; valid: resnet50, vgg19" >&2; exit 2 ;;
esac
TRAIN_ARGS=(); EVAL_ARGS=(); DICTIONARY_ARGS=(--dictionary-rule "$DICTIONARY_RULE")
prepare_data() {
  python -m prepare.coco --images "$IMAGES" --split-json "$SPLIT_JSON" --word2vec "$WORD2VEC" --out "$PREPARED" \
    "${DICTIONARY_ARGS[@]}"
}
step_prepare
step_train 1; step_evaluate 1
step_train 2; step_evaluate 2 "${COMPARE_5K[@]}"
ck="$RUNS/stage2/checkpoint_last.pt"
python evaluate.py --checkpoint "$ck" --data "$PREPARED" --split test --coco-1k --out "$RUNS/stage2/results_test_1k.json" \
  "${COMPARE_1K[@]}"
python evaluate.py --checkpoint "$ck" --data "$PREPARED" --split test --first-k 5 --out "$RUNS/stage2/results_test_5k_first5.json"
python evaluate.py --checkpoint "$ck" --data "$PREPARED" --split test --coco-1k --first-k 5 \
  --out "$RUNS/stage2/results_test_1k_first5.json"
python evaluate.py --table "$RUNS"/stage*/results_test*.json
