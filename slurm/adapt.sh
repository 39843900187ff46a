#!/bin/bash
# Step 2: adapt to a target language with DeepSpeed; one array task per language.
#   sbatch --array=0-1 slurm/adapt.sh [train] [--config configs/adapt/default.yaml] [key.sub=value ...]
#     new token embeddings (body frozen), adapt/train.py; array task i adapts the i-th of $TARGET_LANGS
#     (space/comma-separated) or else of the config's target_langs
#   sbatch --array=0-2 slurm/adapt.sh sft [--config configs/sft/default.yaml] [key.sub=value ...]
#     LT-SFT: a sparse fine-tuning of the primary per language, adapt/sft.py (list the source language too: the
#     task SFT is trained with its SFT applied)
#   sbatch --array=0-1 slurm/adapt.sh distill [--config configs/distill/tiny.yaml] [key.sub=value ...]
#     BiStil phase 1: a small bilingual student per (source, target) pair, adapt/distill.py
#   sbatch slurm/adapt.sh ... target_lang=sw        (one language, no array)
#   sbatch slurm/adapt.sh ... over=full             (standard adaptation, the baseline)
# 300 s before the time limit Slurm sends USR1: the trainer checkpoints, the job requeues itself and resumes.
#SBATCH --job-name=adapt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$MINIMODEL_HOME/slurm/common.sh"

# An array task of its own (not one of pipeline.sh's, which name their language in MM_TASK_ARGS): its language is
# the task id's entry of $TARGET_LANGS, else of target_langs in the config with its overrides applied.
array_language() {
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -z "${MM_TASK_ARGS:-}" ] || return 0
  local lang
  lang=$("$MINIMODEL_PYTHON" - "$SLURM_ARRAY_TASK_ID" "${MM_ARGS[@]}" <<'PY'
import os, sys, yaml
from minimodel.config import parse_overrides
index, _, config, *overrides = sys.argv[1:]
langs = os.environ.get("TARGET_LANGS", "").replace(",", " ").split()
if not langs:
    with open(config) as f:
        langs = (yaml.safe_load(f) or {}).get("target_langs") or []
    langs = parse_overrides([o for o in overrides if o.startswith("target_langs=")]).get("target_langs", langs)
if int(index) >= len(langs):
    sys.exit(f"array task {index} has no language: the languages are {langs} (use --array=0-{len(langs) - 1})")
print(langs[int(index)])
PY
  )
  mm_log "array task $SLURM_ARRAY_TASK_ID: target_lang=$lang"
  MM_ARGS+=("target_langs=[\"$lang\"]" "target_lang=$lang")  # quoted: YAML reads no as false; a TARGET_LANGS
  # language need not be in the config's list
}

adapt_step=train
case ${1:-} in
  train|sft|distill) adapt_step=$1; shift ;;
esac
case $adapt_step in
  train)
    mm_stage_args configs/adapt/default.yaml "$@"
    array_language
    mm_launch deepspeed adapt/train.py "${MM_ARGS[@]}" ;;
  sft)
    mm_stage_args configs/sft/default.yaml "$@"
    array_language
    mm_launch deepspeed adapt/sft.py "${MM_ARGS[@]}" ;;
  distill)
    mm_stage_args configs/distill/tiny.yaml "$@"
    array_language
    mm_launch deepspeed adapt/distill.py "${MM_ARGS[@]}" ;;
esac
