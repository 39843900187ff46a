# The two README commands: `make demo` (whole pipeline, tiny config, CPU) and `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
# no GPU here: DeepSpeed's CPU accelerator; on a GPU machine DeepSpeed picks CUDA itself (it refuses an empty value)
ifeq ($(shell command -v nvidia-smi),)
export DS_ACCELERATOR ?= cpu
endif

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
