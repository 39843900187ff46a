# The two README commands: `make demo` (whole pipeline, tiny config, CPU) and `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi),,cpu)

.PHONY: setup demo test test-fast ui clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m minimodel.pipeline --config configs/pipeline/tiny.yaml

test: setup
	bash scripts/test.sh

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

ui: setup
	$(PY) -m minimodel.ui

clean:
	rm -rf runs data
