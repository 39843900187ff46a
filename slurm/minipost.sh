#!/bin/bash
# Step 1b, MiniPost: build and train a mini-model on top of a pretrained model (ours or a Hugging Face XLM-R/BERT)
# with DeepSpeed on N nodes (one rank per GPU).
#   sbatch slurm/minipost.sh [--config configs/minipost/xlmr_base.yaml] [key.sub=value ...]
# 300 s before the time limit Slurm sends USR1: the trainer checkpoints, the job requeues itself and resumes.
#SBATCH --job-name=minipost
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$MINIMODEL_HOME/slurm/common.sh"

mm_stage_args configs/minipost/xlmr_base.yaml "$@"
mm_launch deepspeed pretrain/minipost.py "${MM_ARGS[@]}"
