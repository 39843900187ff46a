#!/bin/bash
# A single-process step (no GPUs needed): data preparation, export, plugging embeddings in.
#   sbatch slurm/python.sh pretrain/prepare_data.py --config configs/data/default.yaml
#   sbatch slurm/python.sh pretrain/export.py --config ... [key.sub=value ...]
#   sbatch slurm/python.sh adapt/plug.py embeddings=... model=... output_dir=...
#SBATCH --job-name=python
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=4:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$MINIMODEL_HOME/slurm/common.sh"

[ -f "${1:-}" ] || mm_die "usage: sbatch slurm/python.sh SCRIPT.py [ARGS...] (got '${1:-}')"
mm_launch python "$@"
