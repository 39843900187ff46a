#!/bin/bash
# The whole pipeline as a Slurm dependency chain: every stage one job (its slurm/*.sh template), started only when
# the stages it needs have succeeded (afterok); a failed stage cancels everything after it. Adaptation to several
# target languages is one job array (a task per language). Run it on the login node, from the repo:
#   bash slurm/pipeline.sh [configs/pipeline/tiny.yaml [key=value ...]]
#   PLAN=plan.json bash slurm/pipeline.sh             (a plan written earlier, see below)
# The plan (which stages, their commands and order) comes from the pipeline module, the same one `make demo` runs
# locally: `python -m minimodel.pipeline --config CONFIG --plan` prints JSON
#   {"env": {"MINIMODEL_PARENT_RUN_ID": "..."},
#    "stages": [{"name": "pretrain", "argv": ["torchrun", ..., "pretrain/train.py", "--config", ...],
#                "after": ["data"], "done": false}, ...]}
# Each stage runs the script of its argv with the arguments after it; the launcher part is replaced by the
# template's (ranks = GPUs Slurm gives). Stages marked done are not resubmitted. Stages that differ only in
# `target_lang=X` become one array job.
# Environment: SBATCH_ARGS (extra sbatch options for every job, e.g. "--partition=gpu --account=me"), Slurm's own
# SBATCH_* variables, and those of slurm/common.sh (MINIMODEL_HOME, MINIMODEL_PYTHON, ...).
set -euo pipefail
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
if [ -z "$plan" ]; then
  plan=$(mktemp "${TMPDIR:-/tmp}/minimodel-plan.XXXXXX")
  trap 'rm -f "$plan"' EXIT
  PYTHONPATH="$MINIMODEL_HOME${PYTHONPATH:+:$PYTHONPATH}" "$MINIMODEL_PYTHON" -m minimodel.pipeline --config "$config" --plan "$@" > "$plan"
fi

# The plan as lines: "env|NAME=VALUE" for the jobs' environment, then one line per job to submit:
# "NAME|AFTER(space-separated names)|LANGS(space-separated, for an array)|SCRIPT ARGS (shell-quoted)", with the
# ASCII unit separator (\x1f) for | (a tab would not keep empty fields apart).
lines=$("$MINIMODEL_PYTHON" - "$plan" <<'PY'
import json, shlex, sys

with open(sys.argv[1]) as f:
    plan = json.load(f)
for key, value in plan.get("env", {}).items():
    print(f"env\x1f{key}={value}")
jobs = {}  # name -> [script+args without target_lang, after, langs]; stages differing by target_lang merge
alias = {}  # stage name -> job name (array members -> the array)
for stage in plan["stages"]:
    argv = stage["argv"]
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if script is None:
        sys.exit(f"pipeline.sh: stage {stage['name']} runs no .py script: {argv}")
    args = argv[script:]
    lang = next((a.split("=", 1)[1] for a in args if a.startswith("target_lang=")), None)
    args = [a for a in args if not a.startswith("target_lang=")]
    after = [alias.get(a, a) for a in stage.get("after", [])]
    if stage.get("done"):
        alias[stage["name"]] = None
        continue
    after = [a for a in after if a is not None]
    match = next((n for n, j in jobs.items() if lang and j[2] and j[0] == args and j[1] == after), None)
    if match:
        jobs[match][2].append(lang)
        alias[stage["name"]] = match
    else:
        jobs[stage["name"]] = [args, after, [lang] if lang else []]
        alias[stage["name"]] = stage["name"]
for name, (args, after, langs) in jobs.items():
    print("\x1f".join([name, " ".join(after), " ".join(langs), shlex.join(args)]))
PY
)

job_env=()
declare -A job_id
read -r -a extra <<< "${SBATCH_ARGS:-}"
while IFS=$'\x1f' read -r name after langs command; do
  if [ "$name" = env ]; then
    job_env+=("$after")
    continue
  fi
  eval "set -- $command"  # the shell-quoted SCRIPT ARGS (shlex.join) back into words
  script=$1
  shift
  case $script in
    pretrain/train.py) submit=(slurm/pretrain_minijoint.sh "$@") ;;
    pretrain/minipost.py) submit=(slurm/minipost.sh "$@") ;;
    adapt/train.py) submit=(slurm/adapt.sh "$@") ;;
    evaluate/finetune.py) submit=(slurm/evaluate.sh finetune "$@") ;;
    evaluate/zero_shot.py) submit=(slurm/evaluate.sh zero_shot "$@") ;;
    evaluate/report.py) submit=(slurm/evaluate.sh report "$@") ;;
    *) submit=(slurm/python.sh "$script" "$@") ;;
  esac
  options=(--parsable --job-name="$name")
  deps=""
  for dep in $after; do deps+=":${job_id[$dep]}"; done
  [ -n "$deps" ] && options+=(--dependency="afterok$deps")
  if [ -n "$langs" ]; then
    read -r -a lang_list <<< "$langs"
    options+=(--array="0-$((${#lang_list[@]} - 1))")
  fi
  id=$(env "${job_env[@]}" TARGET_LANGS="$langs" sbatch "${options[@]}" "${extra[@]}" "${submit[@]}")
  job_id[$name]=${id%%;*}
  echo "submitted $name ${job_id[$name]}${deps:+ after$deps}${langs:+ array over: $langs}: ${submit[*]@Q}"
done <<< "$lines"
echo "follow with: squeue -u ${USER:-$(id -un)}   (logs: slurm/logs/<stage>-<job id>.out)"
