# Sourced by the staged scripts: prepare -> Stage I -> Stage II -> evaluate, each step skipped when its output is
# complete and resumed when it was interrupted. Needs: PREPARED, RUNS, CONFIG1, CONFIG2, NGPU (and the caller
# defines a prepare_data function). Extra training overrides: TRAIN_ARGS (array), EVAL_ARGS (array).
launch() {  # python script args... (torchrun when NGPU > 1)
  if [ "${NGPU:-1}" -gt 1 ]; then torchrun --standalone --nproc_per_node="$NGPU" "$@"; else python "$@"; fi
}
step_prepare() {
  if [ -f "$PREPARED/manifest.json" ]; then echo "[prepare] $PREPARED is complete: skipped"; return; fi
  echo "[prepare] -> $PREPARED"; local t0=$SECONDS; prepare_data
  echo "[prepare] done in $((SECONDS - t0)) s"
}
step_train() {  # stage
  local stage=$1 cfg out init=()
  if [ "$stage" = 1 ]; then cfg=$CONFIG1; else cfg=$CONFIG2; init=(--init "$RUNS/stage1/checkpoint_last.pt"); fi
  out="$RUNS/stage$stage"
  if [ -f "$out/train_done.json" ]; then echo "[stage $stage] $out is complete: skipped"; return; fi
  echo "[stage $stage] -> $out (resumes from $out/checkpoint_last.pt if present)"
  local t0=$SECONDS
  launch "train_stage$stage.py" --config "$cfg" --data "$PREPARED" --out "$out" "${init[@]}" --resume auto \
    "${TRAIN_ARGS[@]}"
  [ -f "$out/train_done.json" ] || { echo "[stage $stage] stopped before the end; run this script again to resume"; exit 3; }
  echo "[stage $stage] done in $((SECONDS - t0)) s"
}
step_evaluate() {  # stage [extra evaluate args...]
  local stage=$1; shift
  local out="$RUNS/stage$stage/results_test.json"
  if [ -f "$out" ] && [ "$out" -nt "$RUNS/stage$stage/checkpoint_last.pt" ]; then
    echo "[evaluate] $out is up to date: skipped"; return; fi
  local t0=$SECONDS
  python evaluate.py --checkpoint "$RUNS/stage$stage/checkpoint_last.pt" --data "$PREPARED" --split test \
    --out "$out" "${EVAL_ARGS[@]}" "$@"
  echo "[evaluate] stage $stage done in $((SECONDS - t0)) s"
}
