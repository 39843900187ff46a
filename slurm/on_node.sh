#!/bin/bash
# One srun task per node runs this (see mm_launch in slurm/common.sh): it starts the stage's processes on this node.
#   on_node.sh python|torchrun|deepspeed SCRIPT [ARGS...]
# Uses MINIMODEL_PYTHON, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE from common.sh and the Slurm task variables.
set -euo pipefail
kind=$1
shift
node_rank=${SLURM_NODEID:-0}
nnodes=${SLURM_NNODES:-1}

case $kind in
  python)
    cmd=("$MINIMODEL_PYTHON" "$@") ;;
  torchrun)
    cmd=("$MINIMODEL_PYTHON" -m torch.distributed.run --nnodes="$nnodes" --node-rank="$node_rank"
         --nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$@") ;;
  deepspeed)
    # The launcher's own Slurm mode needs mpi4py; instead every node starts its own ranks (--no_ssh) from a
    # hostfile listing the allocation. From a hostfile it sets CUDA_VISIBLE_DEVICES=0..n-1 on each node: on a node
    # shared without device cgroups Slurm's GPUs are others, and the ranks would run on another job's GPUs
    # (DS_ACCELERATOR=cpu: no GPU is used, whatever the numbers).
    first=$(seq -s, 0 $((NPROC_PER_NODE - 1)))
    if [ "${DS_ACCELERATOR:-}" != cpu ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] &&
      [[ "$CUDA_VISIBLE_DEVICES," != "$first,"* ]]; then
      echo "on_node.sh: Slurm gave this node GPUs $CUDA_VISIBLE_DEVICES, but DeepSpeed's launcher would use" \
        "$first: ask for whole nodes (sbatch --exclusive) or have Slurm number a job's GPUs from 0 (cgroup.conf:" \
        "ConstrainDevices=yes)" >&2
      exit 2
    fi
    hostfile=$(mktemp "${TMPDIR:-/tmp}/minimodel-hostfile.XXXXXX")
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC_PER_NODE/" > "$hostfile"
    cmd=("$MINIMODEL_PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$node_rank"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@") ;;
  *)
    echo "on_node.sh: unknown launcher '$kind' (python, torchrun or deepspeed)" >&2
    exit 2 ;;
esac

echo "[minimodel node $node_rank/$nnodes $(hostname)] + ${cmd[*]@Q}"
# Slurm delivers USR1 / TERM to every process of the step. The trainers checkpoint and exit on them; a launcher
# must outlive its workers meanwhile, so it inherits USR1 ignored (torchrun and DeepSpeed's per-node launcher
# handle TERM by waiting for their workers; DeepSpeed's runner would die at once, so it inherits TERM ignored too).
case $kind in
  python) exec "${cmd[@]}" ;;
  torchrun) trap '' USR1; exec "${cmd[@]}" ;;
  deepspeed)
    trap '' USR1 TERM
    rc=0
    "${cmd[@]}" || rc=$?
    rm -f "$hostfile"
    exit "$rc" ;;
esac
