# shellcheck shell=bash
# Sourced by every slurm/*.sh template after it has set MINIMODEL_HOME. Holds what all stages share: finding the
# repo and the Python, the rendezvous, the stage's arguments, and launching one srun task per node with
# time-limit handling (USR1 -> checkpoint -> requeue -> resume).
#
# Environment (all optional):
#   MINIMODEL_HOME    the minimodel checkout (default: the directory sbatch was run from)
#   MINIMODEL_PYTHON  the Python to run (default: $MINIMODEL_HOME/.venv/bin/python if present, else python on PATH)
#   CONFIG            the stage's YAML config when the command line has no --config
#   OVERRIDES         extra key.sub=value overrides, space-separated (command-line overrides win)
#   NPROC_PER_NODE    ranks per node (default: the GPUs per node the job asked for, else those Slurm gave, else 1)
#   MASTER_PORT       rendezvous port (default: derived from the job id, so jobs sharing a node do not collide)
#   MM_TASK_ARGS      set by pipeline.sh for an array job: each task's own arguments (see mm_launch)
#   MM_STAMPS         set by pipeline.sh: where the finished stage is marked done, per task (see mm_stamp)

mm_log() { echo "[minimodel $(date +%FT%T) job ${SLURM_JOB_ID:-?}] $*"; }
mm_die() { echo "[minimodel] error: $*" >&2; exit 2; }

# empty arrays under `set -u` and ${x@Q} need bash 4.4 (RHEL/CentOS 7 ship 4.2)
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  mm_die "bash $BASH_VERSION is too old for the templates (4.4 or newer): load a newer bash (e.g. module load bash)"

[ -f "$MINIMODEL_HOME/minimodel/__init__.py" ] ||
  mm_die "MINIMODEL_HOME=$MINIMODEL_HOME is not a minimodel checkout: run sbatch from the repo (or --chdir=<repo>)"
cd "$MINIMODEL_HOME" || exit 2
export MINIMODEL_HOME
export PYTHONPATH="$MINIMODEL_HOME${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # logs arrive as they are written, also when a job is killed

if [ -z "${MINIMODEL_PYTHON:-}" ]; then
  if [ -x "$MINIMODEL_HOME/.venv/bin/python" ]; then
    MINIMODEL_PYTHON=$MINIMODEL_HOME/.venv/bin/python
  else
    MINIMODEL_PYTHON=$(command -v python || command -v python3 || true)
  fi
fi
[ -n "$MINIMODEL_PYTHON" ] || mm_die "no python found: export MINIMODEL_PYTHON=/path/to/env/bin/python"
export MINIMODEL_PYTHON

# Rendezvous: the first node of the allocation hosts it.
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# Ranks per node: the GPUs per node the job asked for ([type:]count), else those it was given. Not the latter first:
# under --exclusive the batch shell is given all of the node's GPUs, the step only those asked for.
gpus_asked=${SLURM_GPUS_PER_NODE:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-${gpus_asked##*:}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
node_cpus=${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( node_cpus > NPROC_PER_NODE ? node_cpus / NPROC_PER_NODE : 1 ))}
export MASTER_ADDR MASTER_PORT NPROC_PER_NODE OMP_NUM_THREADS

mm_log "nodes=${SLURM_JOB_NODELIST:-} (${SLURM_NNODES:-1} x $NPROC_PER_NODE ranks) restart=${SLURM_RESTART_COUNT:-0}" \
  "home=$MINIMODEL_HOME python=$MINIMODEL_PYTHON"

# mm_stage_args DEFAULT_CONFIG [ARGS...]: the stage's arguments in MM_ARGS: --config (from the command line as
# `--config FILE` or a bare FILE.yaml, else $CONFIG, else DEFAULT_CONFIG), then $OVERRIDES, then the command line's
# key=value overrides (the later one wins).
mm_stage_args() {
  local config=${CONFIG:-$1} rest=() env_overrides=()
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --config) [ $# -ge 2 ] || mm_die "--config needs a file"; config=$2; shift 2 ;;
      --config=*) config=${1#--config=}; shift ;;
      *=*) rest+=("$1"); shift ;;
      *.yaml|*.yml) config=$1; shift ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  [ -f "$config" ] || mm_die "config $config not found (pass --config FILE or CONFIG=FILE; see configs/)"
  read -r -a env_overrides <<< "${OVERRIDES:-}"
  # shellcheck disable=SC2034  # read by the template that sourced this file
  MM_ARGS=(--config "$config" "${env_overrides[@]}" "${rest[@]}")
}

# mm_launch python|torchrun|deepspeed SCRIPT [ARGS...]: run the stage with one srun task per node
# (slurm/on_node.sh starts the ranks there) and wait for it. Returns the stage's exit code.
# Time limit: `#SBATCH --signal=B:USR1@<s>` signals this shell; the signal is passed on to the step (srun
# delivers it to every process of the step), the trainers save a checkpoint and exit, and the job requeues
# itself; the requeued job reruns the same command, which resumes from that checkpoint.
# An array job submitted by pipeline.sh carries each task's own arguments in MM_TASK_ARGS (shell-quoted, one
# entry per task, separated by \x1e); task $SLURM_ARRAY_TASK_ID's are appended to the stage's.
mm_launch() {
  if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${MM_TASK_ARGS:-}" ]; then
    local tasks=() task_args=()
    IFS=$'\x1e' read -r -a tasks <<< "$MM_TASK_ARGS"
    [ "$SLURM_ARRAY_TASK_ID" -lt "${#tasks[@]}" ] ||
      mm_die "array task $SLURM_ARRAY_TASK_ID has no arguments: MM_TASK_ARGS holds ${#tasks[@]} tasks"
    eval "task_args=(${tasks[$SLURM_ARRAY_TASK_ID]})"  # shell-quoted by minimodel.slurm_plan
    mm_log "array task $SLURM_ARRAY_TASK_ID: ${task_args[*]}"
    set -- "$@" "${task_args[@]}"
  fi
  mm_unstamp
  local step=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$MINIMODEL_HOME/slurm/on_node.sh" "$@")
  mm_log "launch: ${step[*]@Q}"
  MM_SIGNAL=""
  "${step[@]}" &
  MM_STEP_PID=$!
  trap 'MM_SIGNAL=USR1; mm_log "USR1 (time limit): asking the stage to checkpoint"; kill -USR1 "$MM_STEP_PID" 2>/dev/null || true' USR1
  # scancel / preemption signal every process of the job: stay alive until the stage has checkpointed.
  trap 'MM_SIGNAL=${MM_SIGNAL:-TERM}; mm_log "TERM: waiting for the stage to checkpoint"' TERM
  local rc=0
  wait "$MM_STEP_PID" || rc=$?
  while kill -0 "$MM_STEP_PID" 2>/dev/null; do  # wait returned early because a trap ran
    rc=0
    wait "$MM_STEP_PID" || rc=$?
  done
  trap '' USR1 TERM  # the stage is over: a late signal must not kill the requeue, the stamping or the exit
  # requeued to resume: a stage stopped after its checkpoint (exit 75), also by a USR1 sent to the job's steps only
  # (scancel --signal=USR1 JOB, sbatch --signal=USR1@N without B:), unless this shell got TERM (scancel, preemption:
  # Slurm decides whether the job comes back); torchrun exits 1 whatever its ranks did: requeued after this shell's
  # USR1. One that finished before the signal mattered is done; a single process that has no checkpoint (zero_shot,
  # report, ...) died of it and would only die of it again: it fails.
  if [ "$MM_SIGNAL" != TERM ] && { [ "$rc" -eq 75 ] || { [ "$MM_SIGNAL" = USR1 ] && [ "$1" != python ] &&
                                                        [ "$rc" -ne 0 ]; }; }; then
    mm_log "stage stopped (exit $rc); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID" ||
      { mm_log "requeue refused (submitted with --no-requeue?): resubmit the same command to resume"; exit 75; }
    exit 0
  fi
  mm_log "stage exited with code $rc"
  if [ "$rc" -eq 0 ]; then mm_stamp || rc=1; fi  # exit 0 without a finished result of its config is a failure
  return "$rc"
}

# mm_stamp_entry: this job's (array task's) MM_STAMPS entry, in the array MM_STAMP (empty: none).
mm_stamp_entry() {
  MM_STAMP=()
  [ -n "${MM_STAMPS:-}" ] || return 0
  local entries=()
  IFS=$'\x1e' read -r -a entries <<< "$MM_STAMPS"
  eval "MM_STAMP=(${entries[${SLURM_ARRAY_TASK_ID:-0}]:-})"  # shell-quoted by minimodel.slurm_plan
}

# mm_unstamp: before the stage runs, its old stamp goes: what it vouched for may be replaced from here on (another
# config's run takes the directory over), so a plan made again for the old config reruns the stage.
mm_unstamp() {
  mm_stamp_entry
  if [ "${#MM_STAMP[@]}" -ge 1 ]; then rm -f "${MM_STAMP[0]}/.stage.json"; fi
}

# mm_stamp: the stage of a job pipeline.sh submitted finished: mark it done as the local pipeline would (MM_STAMPS:
# its output directory, input hash and identity hash (a plan made before identity hashes: none), per array task as
# MM_TASK_ARGS), so that submitting the plan again skips it.
mm_stamp() {
  mm_stamp_entry
  [ "${#MM_STAMP[@]}" -ge 2 ] || return 0
  "$MINIMODEL_PYTHON" -m minimodel.stages "${MM_STAMP[0]}" "${MM_STAMP[1]}" "$SECONDS" "${MM_STAMP[@]:2:1}" || return 1
  mm_log "stamped ${MM_STAMP[0]}: a plan made again skips it"
}
