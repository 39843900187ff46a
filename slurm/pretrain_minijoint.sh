#!/bin/bash
# Step 1, MiniJoint: pretrain the masked LM (Megatron TP/PP) on N nodes; one torchrun per node, one rank per GPU.
#   sbatch slurm/pretrain_minijoint.sh [--config configs/pretrain/minijoint_base.yaml] [key.sub=value ...]
#   sbatch --nodes=4 slurm/pretrain_minijoint.sh --config configs/pretrain/minijoint_large.yaml train.steps=200000
# 300 s before the time limit Slurm sends USR1: the trainer checkpoints, the job requeues itself and resumes.
#SBATCH --job-name=pretrain-minijoint
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$MINIMODEL_HOME/slurm/common.sh"

# NCCL: the defaults suit most clusters; uncomment what your fabric needs.
# export NCCL_DEBUG=INFO                          # print the transports and topology NCCL picked
# export NCCL_SOCKET_IFNAME=ib0                   # interface for bootstrap / socket traffic (e.g. ib0, eth0, ens)
# export NCCL_IB_HCA=mlx5                         # InfiniBand: which HCAs to use
# export NCCL_IB_DISABLE=1                        # Ethernet-only (RoCE-less) clusters
# export NCCL_NET_GDR_LEVEL=PHB                   # GPUDirect RDMA when NIC and GPU share a PCIe host bridge
# export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 # AWS EFA (with the aws-ofi-nccl plugin)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1         # a failed collective ends the job instead of hanging it
export CUDA_DEVICE_MAX_CONNECTIONS=1             # megatron-core overlaps TP communication with compute

mm_stage_args configs/pretrain/minijoint_base.yaml "$@"
mm_launch torchrun pretrain/train.py "${MM_ARGS[@]}"
