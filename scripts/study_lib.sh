# How one run of the Multi30k study is trained and evaluated, sourced by scripts/run_study.sh
# and scripts/screen_recipe.sh so that a screening run and a study run of the same config are the
# same command (a screening run stands for the first updates of the study run: docs/results.md,
# "The recipe sweep").  Not meant to be run on its own.
#
# The caller sets REPO (the checkout), DATA (the data-bin), THREADS, BEAM and ANCHOR (the config
# that is plain fairseq).  Both functions skip a finished step, so a rerun resumes.

# study_train SAVE CONFIG PARALLEL [fairseq flags...]: fairseq-train on configs/multi30k/CONFIG.args,
# the given flags after the config's (argparse keeps the last value, so they override it).
# PARALLEL is only logged: how many runs shared the machine, which the words/s depend on.
study_train() {
  local save=$1 config=$2 parallel=$3
  shift 3
  if [ -f "$save/.trained" ]; then return 0; fi
  local user_dir=(--user-dir "$REPO/moe_fairseq") unpickle=() cfg
  if [ "$config" = "$ANCHOR" ]; then
    # The anchor is plain fairseq: no plugin at all.  Without the plugin's allowlist fairseq
    # cannot resume from its own checkpoint_last.pt under torch >= 2.6 (weights_only refuses
    # argparse.Namespace), so an interrupted anchor run would fail; the checkpoint is this
    # run's own file, so torch's documented switch back to full unpickling is safe here.
    user_dir=() unpickle=(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)
  fi
  set -f; cfg=($(grep -v '^#' "$REPO/configs/multi30k/$config.args")); set +f
  mkdir -p "$save"
  echo "== $(date '+%F %T') threads=$THREADS parallel=$parallel" >> "$save/train.log"
  # the flags this run was trained with, one per line: the configs change between studies, and
  # study_report.py record copies these into the run's record (study.json)
  printf '%s\n' "${cfg[@]}" "$@" > "$save/flags.txt"
  env "${unpickle[@]}" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" fairseq-train "$DATA" "${user_dir[@]}" \
    "${cfg[@]}" "$@" --save-dir "$save" --cpu --num-workers 0 >> "$save/train.log" 2>&1
  touch "$save/.trained"
}

# study_evaluate SAVE: BLEU of SAVE/checkpoint_last.pt on test_2016_flickr (moe-evaluate, which
# also guards against fairseq-generate dropping sentences) into SAVE/eval.
study_evaluate() {
  local save=$1
  if [ -f "$save/eval/results.json" ]; then return 0; fi
  OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" moe-evaluate --path "$save/checkpoint_last.pt" \
    --lang-pairs en-de,en-fr,en-cs --raw-dir "$DATA/raw" --split test --beam "$BEAM" --batch-size 100 --cpu \
    --out "$save/eval" "$DATA" > "$save/eval.log" 2>&1
}
