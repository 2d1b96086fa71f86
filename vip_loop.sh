#!/usr/bin/env bash
# V.I.P.: prune -> curate -> train -> evaluate, STAGES times, then the last student exported (export.py).
# The teacher is always the full model M0; each stage prunes the newest student and curates its
# losers from it (online).
#
#   bash vip_loop.sh tiny 2                      # CPU, random tiny models: the machinery in minutes
#   bash vip_loop.sh animatediff 3               # GPU: the paper's AnimateDiff run
#   bash vip_loop.sh animatediff 3 --offline     # ablation: pairs curated once at stage 1, reused
#   LAUNCH="accelerate launch --num_processes 8" bash vip_loop.sh animatediff 3
#
# Env: LAUNCH (how each script starts; default "python"), RUN_DIR (default runs/<MODEL>, or
# runs/<MODEL>-offline), CONFIG (default configs/<MODEL>.yaml), TEACHER_CACHE (where M0's videos are
# kept for every stage; default <RUN_DIR>/teacher); paths given are taken from the caller's folder.
# Across machines, every machine runs this loop with its MACHINE_RANK (0 for the main one) and a
# LAUNCH naming it (examples/slurm/vip_loop.sbatch): each step starts on all of them at once.
# Every step skips what it finished from the same config and inputs, and redoes what depends on
# anything changed since, so a killed or changed run is finished by running the same command again.
# It ends with the run's cost (ledger.py).
set -euo pipefail

usage() { echo "usage: bash vip_loop.sh MODEL STAGES [--offline]   (MODEL: a configs/<MODEL>.yaml)" >&2; exit 2; }
[ $# -ge 2 ] || usage
command="bash vip_loop.sh $*"
model=$1 stages=$2 offline=0
shift 2
for arg in "$@"; do
  case $arg in
    --offline) offline=1 ;;
    *) usage ;;
  esac
done
[[ $stages =~ ^[1-9][0-9]{0,2}$ ]] || { echo "error: STAGES must be a whole number from 1 to 999; got '$stages'" >&2; exit 2; }
# MODEL names a config and the run folder under runs/: a name, never a path.
[[ $model =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || { echo "error: MODEL must be a config name such as tiny (letters, digits, _ . -); got '$model'" >&2; exit 2; }
# What the caller names is the caller's: paths resolved before the loop moves to its own folder.
caller=$PWD
from_caller() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$caller/$1" ;; esac; }
[ -z "${CONFIG:-}" ] || CONFIG=$(from_caller "$CONFIG")
[ -z "${RUN_DIR:-}" ] || RUN_DIR=$(from_caller "$RUN_DIR")
[ -z "${TEACHER_CACHE:-}" ] || TEACHER_CACHE=$(from_caller "$TEACHER_CACHE")
cd "$(dirname "$0")"
config=${CONFIG:-configs/$model.yaml}
[ -f "$config" ] || { echo "error: $config: no such config; models: $(ls configs/*.yaml | xargs -n1 basename | sed 's/.yaml$//' | tr '\n' ' ')" >&2; exit 2; }
suffix=$([ $offline = 1 ] && echo -offline || true)
run=${RUN_DIR:-runs/$model$suffix}
teacher=${TEACHER_CACHE:-$run/teacher}   # M0's videos, made once a run (teacher_cache.py)
read -r -a launch <<< "${LAUNCH:-python}"
# One loop per run folder: a second one on the same folder stops here, naming the first (after
# waiting a few seconds, in which a just-killed first one finishes exiting). The other machines of a
# run follow the main one's loop.
rank=${MACHINE_RANK:-0}
mkdir -p "$run"
if command -v flock >/dev/null && [ "$rank" = 0 ]; then
  exec 9>>"$run/.lock"
  flock -w 5 9 || { echo "error: $run: in use by $(cat "$run/.lock"); wait for it to finish or stop it" >&2; exit 2; }
  : > "$run/.lock"
  echo "pid $$ on $(hostname) ($command)" >&9
fi

student=()        # stage 1 prunes the full model M0
students=()       # every student so far, for the evaluation table
for ((k = 1; k <= stages; k++)); do
  stage="$run/stage_$k"
  echo "== stage $k/$stages: $stage"
  "${launch[@]}" prune.py --config "$config" --output_dir "$stage/prune" "${student[@]}" --teacher_cache "$teacher" \
    --num_stages "$stages"

  if [ $offline = 1 ] && [ $k -gt 1 ]; then
    pairs="$run/stage_1/curate/pairs.jsonl"
  else
    "${launch[@]}" curate.py --config "$config" --output_dir "$stage/curate" \
      --student "$stage/prune/student" --ranking "$stage/prune/ranking.json" --teacher_cache "$teacher"
    pairs="$stage/curate/pairs.jsonl"
  fi

  "${launch[@]}" train_redpo.py --config "$config" --output_dir "$stage/train" \
    --student "$stage/prune/student" --pairs "$pairs" --resume_from_checkpoint latest

  student=(--student "$stage/train/student")
  students+=("$stage/prune/student" "$stage/train/student")
  "${launch[@]}" evaluate.py --config "$config" --output_dir "$run/eval" --students "${students[@]}" \
    --teacher_cache "$teacher"
done
# The last student, as the folder its family's users load (diffusers), with its model card.
"${launch[@]}" export.py --config "$config" --student "$run/stage_$stages/train/student" --output_dir "$run/export"
if [ "$rank" = 0 ]; then
  python ledger.py "$run"
  echo "== done: $run/eval/eval.md, $run/export, $run/cost.md"
fi
