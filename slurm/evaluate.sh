#!/bin/bash
# Steps 3-4 and the report: one evaluation step per job.
#   sbatch slurm/evaluate.sh finetune  [--config configs/evaluate/finetune/xnli.yaml] [key.sub=value ...]
#   sbatch slurm/evaluate.sh zero_shot [--config configs/evaluate/zero_shot/xnli.yaml] [key.sub=value ...]
#   sbatch slurm/evaluate.sh distill_task --config configs/distill/task_tiny.yaml student=<dir> teacher=<task model>
#   sbatch slurm/evaluate.sh report    --config configs/evaluate/report.yaml pipeline_dir=<pipeline output_dir>
# finetune runs with DeepSpeed on every GPU of the allocation (and checkpoints + requeues near the time limit);
# zero_shot and report are single processes.
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=4:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$MINIMODEL_HOME/slurm/common.sh"

eval_step=${1:-}
shift || true
case $eval_step in
  finetune)
    mm_stage_args configs/evaluate/finetune/xnli.yaml "$@"
    mm_launch deepspeed evaluate/finetune.py "${MM_ARGS[@]}" ;;
  distill_task)
    mm_stage_args configs/distill/task_tiny.yaml "$@"
    mm_launch deepspeed evaluate/distill_task.py "${MM_ARGS[@]}" ;;
  zero_shot)
    mm_stage_args configs/evaluate/zero_shot/xnli.yaml "$@"
    mm_launch python evaluate/zero_shot.py "${MM_ARGS[@]}" ;;
  report)
    mm_stage_args configs/evaluate/report.yaml "$@"
    mm_launch python evaluate/report.py "${MM_ARGS[@]}" ;;
  *)
    mm_die "first argument: finetune, distill_task, zero_shot or report (got '$eval_step')" ;;
esac
