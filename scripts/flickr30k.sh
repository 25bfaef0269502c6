#!/usr/bin/env bash
# Flickr30k (paper Table 1): prepare -> Stage I -> Stage II -> test + paper table, for one image CNN:
#   ARCH=resnet50 (default) | resnet152 | vgg19     (configs/flickr30k[_ARCH]_stage{1,2}.yaml; docs/recipes.md)
# Split: the original code's by default (Flickr8k dev/test images as val/test, 29,783 training classes, as the paper);
# SPLIT=karpathy uses Karpathy's dataset_flickr30k.json instead (the usual split of later work).
# Every step is skipped when complete and resumed when interrupted: just run the script again.
# ---- edit these ----------------------------------------------------------------------------------------------
ARCH=${ARCH:-resnet50}
SPLIT=${SPLIT:-original}                                            # original | karpathy
IMAGES=${IMAGES:-/data/flickr30k/flickr30k-images}
CAPTIONS=${CAPTIONS:-/data/flickr30k/results_20130124.token}
FLICKR8K_LISTS=${FLICKR8K_LISTS:-/data/flickr8k}                     # holds Flickr_8k.{dev,test}Images.txt
SPLIT_JSON=${SPLIT_JSON:-/data/flickr30k/dataset_flickr30k.json}   # SPLIT=karpathy only
WORD2VEC=${WORD2VEC:-/data/GoogleNews-vectors-negative300.bin.gz}
DICTIONARY_RULE=${DICTIONARY_RULE:-train}                          # train (leak-free) | original (20,074 words)
PREPARED=${PREPARED:-data/flickr30k_$SPLIT}
RUNS=${RUNS:-runs/flickr30k_${ARCH}_$SPLIT}
NGPU=${NGPU:-1}
# ---------------------------------------------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
source scripts/_pipeline.sh
case "$ARCH" in
  resnet50) CONFIG1=configs/flickr30k_stage1.yaml; CONFIG2=configs/flickr30k_stage2.yaml ;;
  resnet152|vgg19) CONFIG1=configs/flickr30k_${ARCH}_stage1.yaml; CONFIG2=configs/flickr30k_${ARCH}_stage2.yaml ;;
  *) echo "error: ARCH=$ARCH; valid: resnet50, resnet152, vgg19" >&2; exit 2 ;;
esac
case "$SPLIT" in
  original) echo "[split] the original code's split (Flickr8k dev/test images as val/test), as the paper" ;;
  karpathy) echo "[split] Karpathy's split (SPLIT=karpathy): not the paper's; its numbers are not image for image comparable" ;;
  *) echo "error: SPLIT=$SPLIT; valid: original, karpathy" >&2; exit 2 ;;
esac
TRAIN_ARGS=(); EVAL_ARGS=(--visualize 5); DICTIONARY_ARGS=(--dictionary-rule "$DICTIONARY_RULE")
prepare_data() {
  if [ "$SPLIT" = original ]; then
    python -m prepare.flickr30k --images "$IMAGES" --captions "$CAPTIONS" --flickr8k-lists "$FLICKR8K_LISTS" \
      --word2vec "$WORD2VEC" --out "$PREPARED" "${DICTIONARY_ARGS[@]}"
  else
    python -m prepare.flickr30k --images "$IMAGES" --captions "$CAPTIONS" --split-json "$SPLIT_JSON" \
      --word2vec "$WORD2VEC" --out "$PREPARED" "${DICTIONARY_ARGS[@]}"
  fi
}
step_prepare
step_train 1; step_evaluate 1 --compare-paper "flickr30k/$ARCH/stage1"
step_train 2; step_evaluate 2 --compare-paper "flickr30k/$ARCH/stage2"
python evaluate.py --table "$RUNS/stage1/results_test.json" "$RUNS/stage2/results_test.json"
