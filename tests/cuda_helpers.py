"""Shared by the GPU tests (tests/test_cuda_*.py; `pytest -m cuda`, run on the lent GPU machine by
scripts/gpu_check.sh): their marks (skipped without CUDA: nothing there is simulated) and where they record what they
measured ($MINIMODEL_CUDA_REPORT, JSON lines, for benchmarks/RESULTS.md). One GPU: TP = PP = 1 there; model
parallelism stays proven by the CPU tests. Each file is one unit of work under pytest-xdist, so the three share the
GPU side by side (`-n 3`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The smoke pipeline's corpus as JSONL (scripts/gpu_check.sh prepare): the GPU machine has no corpus packages
GPU_DATA_CONFIG = Path(os.environ.get("MINIMODEL_GPU_DATA_CONFIG", ROOT / "gpu/corpus/smoke.yaml"))
CUDA = [pytest.mark.cuda, pytest.mark.slow,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


def record(name: str, **values) -> None:
    """Append a measurement to $MINIMODEL_CUDA_REPORT (the GPU check's summary of what it measured)."""
    if path := os.environ.get("MINIMODEL_CUDA_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, "device": torch.cuda.get_device_name(0), **values}) + "\n")
