"""The CPU compatibility layer's quiet(): the warnings that mean nothing without a GPU are gone from a real stage start
(megatron-core imported, a MiniJoint model built, its tensor-parallel linear run, DeepSpeed's accelerator chosen),
every other warning still shows.

Each start runs in a fresh interpreter (warnings are printed once per process). The control start undoes quiet()
right after `import minimodel`, so the test also proves that each silenced warning really fires on this machine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimodel.compat.cpu import _CPU_NOISE

ROOT = Path(__file__).resolve().parents[1]

STAGE_START = r"""
import os
import sys
import warnings

import minimodel  # applies the CPU layer

if sys.argv[1] == "control":
    warnings.resetwarnings()
    os.environ.pop("DS_ACCELERATOR", None)

import torch
from deepspeed.accelerator import get_accelerator
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

from minimodel import distributed
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint import parallelize as P
from minimodel.models.minijoint.config import ModelConfig

model = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=2, seq_length=8, mini_layers=1)
parallel = ParallelConfig(micro_batch_size=1, global_batch_size=1)
P.setup(model, parallel, seed=0)
P.build_model(model, parallel)
# The tensor-parallel linear with its gradient all-reduce (on with TP > 1), here in a one-process group.
linear_with_grad_accumulation_and_async_allreduce(torch.randn(2, 32), torch.randn(4, 32), None,
                                                  gradient_accumulation_fusion=False, allreduce_dgrad=True,
                                                  sequence_parallel=False)
print("accelerator:", get_accelerator().device_name())
warnings.warn("an unrelated warning", UserWarning)
warnings.warn("Apex is not installed, says a module outside megatron-core", UserWarning)
distributed.destroy()
"""
# DeepSpeed's logger line when it has to guess the accelerator.
GUESSED_ACCELERATOR = "Setting accelerator to CPU"


def _start(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", STAGE_START, mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer applies only without CUDA")
def test_cpu_noise_is_silenced_and_other_warnings_still_show():
    control, quiet = _start("control"), _start("quiet")
    for message, _category, _module in _CPU_NOISE:
        assert re.search(message, control), f"{message!r} no longer fires: its filter is dead\n{control[-3000:]}"
    assert GUESSED_ACCELERATOR in control

    for message, _category, _module in _CPU_NOISE:
        noise = [line for line in quiet.splitlines() if re.search(message, line) and "megatron/core" in line]
        assert not noise, noise
    assert GUESSED_ACCELERATOR not in quiet
    assert "accelerator: cpu" in quiet
    # Everything else still shows, including a matching message from a module the filters do not name.
    assert "UserWarning: an unrelated warning" in quiet
    assert "UserWarning: Apex is not installed, says a module outside megatron-core" in quiet


SHARED_MEMORY_RANK = r"""
import os
from pathlib import Path

import torch.distributed as dist

from minimodel import distributed

distributed.initialize_deepspeed()
mapped = {line.split()[-2] if line.endswith("(deleted)") else line.split()[-1]
          for line in Path("/proc/self/maps").read_text().splitlines() if "deepspeed_allreduce_buffer" in line}
print(f"rank {dist.get_rank()} maps {sorted(mapped)}", flush=True)
dist.barrier()
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU accelerator's shared memory; NCCL has none")
@pytest.mark.parametrize("ranks", [1, 2])
def test_deepspeed_shared_memory_is_not_left_behind(tmp_path, ranks):
    """DeepSpeed's CPU accelerator maps a 69 MB shared-memory segment per rank and never removed its name: every
    launch leaked 69 MB a rank of /dev/shm (minimodel.compat.cpu.release_shared_memory). The ranks still map every
    rank's segment; once the run is over, no name is left."""
    from minimodel.distributed import free_port
    from minimodel.stages import DEEPSPEED

    script = tmp_path / "rank.py"
    script.write_text(SHARED_MEMORY_RANK)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([DEEPSPEED, "--num_gpus", str(ranks), "--master_port",
                           str(port), str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    names = [f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in range(ranks)]
    for rank in range(ranks):
        assert f"rank {rank} maps {names}" in proc.stdout, proc.stdout[-3000:]
    assert not [name for name in names if Path(name).exists()]
    assert "built successfully" not in proc.stdout  # its op's load, printed by every process: dropped
