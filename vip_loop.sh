#!/usr/bin/env bash
# V.I.P.: prune -> curate -> train -> evaluate, STAGES times. The teacher is always the full model
# M0; each stage prunes the newest student and curates its losers from it (online).
#
#   bash vip_loop.sh tiny 2                      # CPU, random tiny models: the machinery in minutes
#   bash vip_loop.sh animatediff 3               # GPU: the paper's AnimateDiff run
#   bash vip_loop.sh animatediff 3 --offline     # ablation: pairs curated once at stage 1, reused
#   LAUNCH="accelerate launch --num_processes 8" bash vip_loop.sh animatediff 3
#
# Env: LAUNCH (how each script starts; default "python"), RUN_DIR (default runs/<MODEL>, or
# runs/<MODEL>-offline), CONFIG (default configs/<MODEL>.yaml). Every stage skips what it already
# finished, so a killed run is finished by running the same command again.
set -euo pipefail

usage() { echo "usage: bash vip_loop.sh MODEL STAGES [--offline]   (MODEL: a configs/<MODEL>.yaml)" >&2; exit 2; }
[ $# -ge 2 ] || usage
model=$1 stages=$2 offline=0
shift 2
for arg in "$@"; do
  case $arg in
    --offline) offline=1 ;;
    *) usage ;;
  esac
done
[[ $stages =~ ^[1-9][0-9]*$ ]] || { echo "error: STAGES must be a positive integer; got '$stages'" >&2; exit 2; }
cd "$(dirname "$0")"
config=${CONFIG:-configs/$model.yaml}
[ -f "$config" ] || { echo "error: $config: no such config; models: $(ls configs/*.yaml | xargs -n1 basename | sed 's/.yaml$//' | tr '\n' ' ')" >&2; exit 2; }
suffix=$([ $offline = 1 ] && echo -offline || true)
run=${RUN_DIR:-runs/$model$suffix}
read -r -a launch <<< "${LAUNCH:-python}"

student=()        # stage 1 prunes the full model M0
students=()       # every student so far, for the evaluation table
for ((k = 1; k <= stages; k++)); do
  stage="$run/stage_$k"
  echo "== stage $k/$stages: $stage"
  "${launch[@]}" prune.py --config "$config" --output_dir "$stage/prune" "${student[@]}"

  if [ $offline = 1 ] && [ $k -gt 1 ]; then
    pairs="$run/stage_1/curate/pairs.jsonl"
  else
    "${launch[@]}" curate.py --config "$config" --output_dir "$stage/curate" \
      --student "$stage/prune/student" --ranking "$stage/prune/ranking.json"
    pairs="$stage/curate/pairs.jsonl"
  fi

  "${launch[@]}" train_redpo.py --config "$config" --output_dir "$stage/train" \
    --student "$stage/prune/student" --pairs "$pairs" --resume_from_checkpoint latest

  student=(--student "$stage/train/student")
  students+=("$stage/prune/student" "$stage/train/student")
  list=$(IFS=,; echo "${students[*]}")
  "${launch[@]}" evaluate.py --config "$config" --output_dir "$run/eval" --students "$list"
done
echo "== done: $run/eval/eval.md"
