#!/usr/bin/env bash
# Screening a recipe candidate for the Multi30k study (docs/results.md, "The recipe sweep"):
# a study config plus flags that override it, trained for SCREEN_UPDATES updates with seed 1,
# then BLEU on test_2016_flickr from its last checkpoint.
#
#   DATA=data-bin/multi30k OUT=screen bash scripts/screen_recipe.sh NAME CONFIG [fairseq flags...]
#   e.g.  bash scripts/screen_recipe.sh dense_dropout0.1 fairseq_dense --dropout 0.1
#
# The flags come after the config's, so they win (argparse keeps the last value).  A screening
# run is the first SCREEN_UPDATES updates of the full run it stands for: the configs' inverse-sqrt
# schedule does not depend on --max-update (SMoE-Dropout's k schedule does: give it
# --moe-top-k-schedule-steps too).  So the study's own seed-1 runs, read at the same update, are
# the references (study_report.py sweep).  Finished steps are skipped on a rerun; an interrupted
# run resumes.  Output: OUT/NAME/seed1/{overrides.txt, train.log, eval/, record.json}.
#
# Environment: DATA, OUT (default screen), SCREEN_UPDATES (500), THREADS (nproc), BEAM (5).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if ! command -v fairseq-train > /dev/null && [ -f "${VENV:-.venv}/bin/activate" ]; then . "${VENV:-.venv}/bin/activate"; fi
DATA=${DATA:-data-bin/multi30k}
OUT=${OUT:-screen}
SCREEN_UPDATES=${SCREEN_UPDATES:-500}
THREADS=${THREADS:-$(nproc)}
BEAM=${BEAM:-5}
ANCHOR=fairseq_dense
[ $# -ge 2 ] || { echo "usage: screen_recipe.sh NAME CONFIG [fairseq flags that override CONFIG's]" >&2; exit 2; }
name=$1 config=$2; shift 2
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "screen_recipe: NAME must be letters, digits, '.', '_' or '-' (got '$name')" >&2; exit 2; }
[ -f "configs/multi30k/$config.args" ] || { echo "screen_recipe: CONFIG: no configs/multi30k/$config.args" >&2; exit 2; }
[[ "$SCREEN_UPDATES" =~ ^[1-9][0-9]*$ ]] || { echo "screen_recipe: SCREEN_UPDATES must be a positive number of updates (got '$SCREEN_UPDATES')" >&2; exit 2; }
[ -f "$DATA/train.en-de.en.idx" ] || { echo "screen_recipe: no Multi30k data-bin at $DATA (bash data_prep/prepare_multi30k.sh --destdir $DATA)" >&2; exit 2; }
command -v fairseq-train > /dev/null || { echo "screen_recipe: fairseq-train not found (bash scripts/setup_env.sh)" >&2; exit 2; }

save=$OUT/$name/seed1
mkdir -p "$save"
# what this candidate is; a rerun under the same NAME with other flags would mix two runs
overrides="$config $*"
if [ -f "$save/overrides.txt" ] && [ "$(cat "$save/overrides.txt")" != "$overrides" ]; then
  echo "screen_recipe: $save was screened as '$(cat "$save/overrides.txt")', not '$overrides' (choose another NAME)" >&2; exit 2
fi
printf '%s\n' "$overrides" > "$save/overrides.txt"

. scripts/study_lib.sh  # study_train, study_evaluate: the same commands as scripts/run_study.sh
study_train "$save" "$config" 1 "$@" --max-update "$SCREEN_UPDATES" --seed 1
study_evaluate "$save"
python scripts/study_report.py record "$save" --config "$name" --seed 1
