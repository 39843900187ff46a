#!/bin/bash
# The whole pipeline as a Slurm dependency chain: every stage one job (its slurm/*.sh template), started only when
# the stages it needs have succeeded (afterok); a failed stage cancels everything after it. Adaptation to several
# target languages is one job array (a task per language). Run it on the login node, from the repo:
#   bash slurm/pipeline.sh [configs/pipeline/tiny.yaml [key=value ...]]
#   PLAN=plan.json bash slurm/pipeline.sh             (a plan written earlier, see below)
# The plan (which jobs, their arguments and order) comes from the pipeline module, the same one `make demo` runs
# locally: `python -m minimodel.pipeline --config CONFIG --plan` prints JSON
#   {"env": {"MINIMODEL_PARENT_RUN_ID": "..."},
#    "jobs": [{"name": "adapt-minipost", "kind": "adapt", "script": "adapt/train.py", "args": ["--config", ...],
#              "slurm": ["slurm/adapt.sh"], "gpus_per_node": 1, "nodes": 1, "after": ["minipost", "data"],
#              "done": false, "array": [{"lang": "ny", "args": ["target_langs=[ny]"], "done": false}, ...]}, ...]}
# Each job runs its stage with the template in "slurm" on the plan's nodes (the pipeline config's *_nodes), ranks =
# GPUs Slurm gives per node (the plan's gpus_per_node, the ranks its result was planned with, where it sets one); an
# array job runs a task per language, task i with the arguments of the i-th language appended. Jobs and tasks marked
# done are not submitted.
# `python -m minimodel.slurm_plan PLAN` turns the plan into the lines this script reads.
# Environment: SBATCH_ARGS (extra sbatch options for every job, e.g. "--partition=gpu --account=me"), Slurm's own
# SBATCH_* variables, and those of slurm/common.sh (MINIMODEL_HOME, MINIMODEL_PYTHON, ...).
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  { echo "pipeline.sh: bash $BASH_VERSION is too old (4.4 or newer: its arrays and \${x@Q})" >&2; exit 2; }
MINIMODEL_HOME=${MINIMODEL_HOME:-$PWD}
[ -f "$MINIMODEL_HOME/slurm/common.sh" ] ||
  { echo "pipeline.sh: run it from the minimodel checkout or export MINIMODEL_HOME" >&2; exit 2; }
cd "$MINIMODEL_HOME"
export MINIMODEL_HOME
if [ -z "${MINIMODEL_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then MINIMODEL_PYTHON=$PWD/.venv/bin/python; else MINIMODEL_PYTHON=$(command -v python || command -v python3); fi
fi
export MINIMODEL_PYTHON

config=${1:-configs/pipeline/tiny.yaml}
shift || true  # the rest: key=value overrides of the pipeline config
plan=${PLAN:-}
plan_tmp=""
if [ -z "$plan" ]; then
  plan=$(mktemp "${TMPDIR:-/tmp}/minimodel-plan.XXXXXX")
  plan_tmp=$plan
  trap 'rm -f "$plan_tmp"' EXIT
  PYTHONPATH="$MINIMODEL_HOME${PYTHONPATH:+:$PYTHONPATH}" "$MINIMODEL_PYTHON" -m minimodel.pipeline --config "$config" --plan "$@" > "$plan"
fi

# the jobs still queued or running (their comments: the keys of an earlier pipeline.sh's jobs and array tasks): a job
# or task of the same stage at the same inputs is not submitted a second time (two writers of one checkpoint)
queued=$(mktemp "${TMPDIR:-/tmp}/minimodel-queued.XXXXXX")
trap 'rm -f "$queued" ${plan_tmp:+"$plan_tmp"}' EXIT
squeue -h -r -u "${USER:-$(id -un)}" -o "%k %F %K" > "$queued" 2>/dev/null || true
lines=$(PYTHONPATH="$MINIMODEL_HOME${PYTHONPATH:+:$PYTHONPATH}" "$MINIMODEL_PYTHON" -m minimodel.slurm_plan "$plan" \
  "$queued")

# The jobs run what the plan hashed: settings meant for a template run by hand (slurm/common.sh) are not theirs, and
# sbatch passes on this shell's environment.
unset CONFIG OVERRIDES NPROC_PER_NODE MASTER_PORT TARGET_LANGS
job_env=()
declare -A job_id
read -r -a extra <<< "${SBATCH_ARGS:-}"
# each_job check|submit: check asks Slurm whether it would take every job (sbatch --test-only: nothing submitted),
# so that one it refuses (e.g. more GPUs per node than a node has) stops the pipeline before any of its jobs runs;
# submit submits them, each after the jobs it needs.
each_job() {
  local mode=$1 name after langs task_args stamps command keys waiting options deps refused lang_list
  while IFS=$'\x1f' read -r name after langs task_args stamps command keys waiting; do
    [ -n "$name" ] || continue  # nothing left to submit
    if [ "$name" = env ]; then
      if [ "$mode" = submit ]; then job_env+=("$after"); fi
      continue
    fi
    if [ -z "$command" ]; then  # every task of it still queued from an earlier pipeline.sh
      if [ "$mode" = submit ]; then job_id[$name]=$waiting; echo "queued already: $name $waiting"; fi
      continue
    fi
    eval "set -- $command"  # the shell-quoted template + arguments (shlex.join) back into words
    # --export=ALL: the plan's environment (MM_TASK_ARGS, MM_STAMPS, ...) reaches the job under a site default of
    # SBATCH_EXPORT=NONE too (an array task would fall back to the config's languages, and stamp nothing)
    options=(--job-name="$name" --export=ALL)
    if [ -n "$langs" ]; then
      read -r -a lang_list <<< "$langs"
      options+=(--array="0-$((${#lang_list[@]} - 1))" --output="slurm/logs/%x-%A_%a.out")  # a task's log by its index
    fi
    if [ "$mode" = check ]; then
      refused=$(sbatch --test-only "${options[@]}" "${extra[@]}" "$@" 2>&1) ||
        { echo "pipeline.sh: Slurm would refuse job $name (${*@Q}): $refused; nothing was submitted" >&2; exit 2; }
      continue
    fi
    options+=(--comment="minimodel:$keys" --parsable --kill-on-invalid-dep=yes)  # a failed stage cancels what needs it
    deps=""
    for dep in $after; do deps+=":${job_id[$dep]}"; done
    [ -n "$deps" ] && options+=(--dependency="afterok$deps")
    id=$(env "${job_env[@]}" MM_TASK_ARGS="$task_args" MM_STAMPS="$stamps" sbatch "${options[@]}" "${extra[@]}" "$@")
    job_id[$name]=${id%%;*}
    echo "submitted $name ${job_id[$name]}${deps:+ after$deps}${langs:+ array over: $langs}: ${*@Q}"
    if [ -n "$waiting" ]; then  # its other tasks, still queued from an earlier pipeline.sh: what needs it waits too
      job_id[$name]+=":$waiting"
      echo "queued already: $name $waiting"
    fi
  done <<< "$lines"
}
each_job check
each_job submit
echo "follow with: squeue -u ${USER:-$(id -un)}   (logs: slurm/logs/<stage>-<job id>[_<array task>].out)"
