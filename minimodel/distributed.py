"""The one place that sets up and tears down torch.distributed and megatron-core's parallel state.

Launch with torchrun or the deepspeed launcher (or srun setting the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT. Without them every stage runs as a world of one process, so it also works as a plain script.
NCCL on GPUs, gloo on CPU; on a machine without CUDA, minimodel.compat.cpu is applied first (and only then).
Megatron stages call `initialize`, DeepSpeed stages `initialize_deepspeed`; `rank()` / `world_size()` answer before
either (from the launcher's variables) and `destroy()` tears down whatever a stage started.

Process layout: world = tensor x pipeline x data parallel (megatron's order: TP innermost). Virtual pipeline
stages interleave `virtual_pipeline_model_parallel_size` model chunks per pipeline rank.

Groups for weights tied across pipeline stages (one group per pipeline group, i.e. per TP x DP coordinate):
megatron's embedding group (first and last stage + `embedding_stages`), and `output_head_group()` (last stage +
`head_stages`: the stages holding a copy of the output head).
"""
from __future__ import annotations

import os
import random
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Literal

import numpy as np
import torch
import torch.distributed as dist

from minimodel.compat import jit_builds
from minimodel.config import ConfigError, require


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Model chunks per pipeline rank (interleaved 1F1B); None = one chunk per rank.
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False  # split LayerNorm/dropout activations over the TP ranks (needs TP > 1)
    use_distributed_optimizer: bool = False  # shard optimizer state (and grad reduction) over data parallel
    overlap_grad_reduce: bool = False  # overlap the data-parallel gradient reduction with the backward pass
    micro_batch_size: int = 8  # sequences per microbatch per data-parallel replica
    global_batch_size: int = 64  # sequences per optimizer step over all replicas
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 with CUDA, fp32 without
    # Initialise weights on the CPU from the full tensors, so they do not depend on the TP layout (always on
    # without CUDA; on GPUs it is slower but makes runs at different TP sizes start from the same weights).
    use_cpu_initialization: bool = False
    timeout_minutes: int = 30  # collective timeout

    def validate(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
                    "global_batch_size", "timeout_minutes"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            require(vpp >= 1, "virtual_pipeline_model_parallel_size", f"must be >= 1 or null, got {vpp}")
            require(vpp == 1 or self.pipeline_model_parallel_size > 1, "virtual_pipeline_model_parallel_size",
                    "virtual (interleaved) stages need pipeline_model_parallel_size > 1; set it to null")
        require(not self.sequence_parallel or self.tensor_model_parallel_size > 1, "sequence_parallel",
                "sequence parallelism splits activations over tensor-parallel ranks: it needs "
                "tensor_model_parallel_size > 1 (or set parallel.sequence_parallel=false)")
        require(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def num_model_chunks(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    def data_parallel_size(self, world_size: int) -> int:
        require(world_size % self.model_parallel_size == 0, "parallel.tensor_model_parallel_size",
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size}: launch a multiple of {self.model_parallel_size} processes")
        return world_size // self.model_parallel_size

    def num_microbatches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        per_step = self.micro_batch_size * dp
        require(self.global_batch_size % per_step == 0, "parallel.global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = "
                f"{self.micro_batch_size} x {dp}")
        n = self.global_batch_size // per_step
        if self.num_model_chunks > 1:
            require(n % self.pipeline_model_parallel_size == 0, "parallel.global_batch_size",
                    f"the interleaved schedule needs the number of microbatches ({n}) to be a multiple of "
                    f"pipeline_model_parallel_size={self.pipeline_model_parallel_size}")
        return n

    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and torch.cuda.is_available())


def device() -> torch.device:
    """This process's device: its GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


_OUTPUT_HEAD_GROUP = None


def init_process_group(timeout: timedelta = timedelta(minutes=30)) -> None:
    """Start torch.distributed if it is not up: the launcher's world, else a one-process group (no launcher)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _started_by_a_launcher() -> bool:
    multi_task_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return multi_task_slurm or any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def single_process_env() -> None:
    """A plain `python script.py` (no launcher): set the variables torchrun / the deepspeed launcher would set for a
    world of one process, so DeepSpeed and megatron form a one-process group instead of looking for MPI."""
    if _started_by_a_launcher():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous port of a local launch, so that two jobs on one machine
    never both take the launchers' default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_deepspeed() -> None:
    """Start torch.distributed through DeepSpeed (nccl on GPUs, gloo/ccl on CPU; it also discovers MPI and Slurm
    worlds) if it is not up. A plain `python script.py` runs as a world of one process."""
    if dist.is_initialized():
        return
    single_process_env()
    import deepspeed  # here, not at the top: megatron-only processes do not pay its import

    from minimodel.compat import cpu

    jit_builds.check_build_locks()  # init_distributed may build an op: never behind a killed build's lock
    with cpu.quiet_shm_op_load():
        deepspeed.init_distributed()
    cpu.release_shared_memory()


# Deprecations of the torch.distributed calls megatron-core makes (its distributed optimizer's collectives, its
# torch_dist checkpoint reader): printed by every such run, on GPUs as on CPUs, and nothing a user can act on.
_MEGATRON_TORCH_DEPRECATIONS = (
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"`load_state_dict` is deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
)


def initialize(parallel: ParallelConfig, seed: int, embedding_stages: Iterable[int] = (),
               head_stages: Iterable[int] = ()) -> None:
    """Start torch.distributed (if needed) and megatron's parallel groups, and seed every generator.

    `embedding_stages`: pipeline stages, besides the first and last, that hold a copy of the word embeddings
    (the MiniJoint secondary head); their copies are kept in sync over megatron's embedding group.
    `head_stages`: pipeline stages, besides the last, that hold a copy of the output head's parameters (a
    MiniJoint secondary head that shares the main head); kept in sync over output_head_group().
    """
    from minimodel.compat import cpu

    cpu.apply()
    for message in _MEGATRON_TORCH_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from megatron.core import parallel_state

    init_process_group(timedelta(minutes=parallel.timeout_minutes))
    world = dist.get_world_size()
    parallel.num_microbatches(world)  # raises a ConfigError naming the key if the layout does not fit

    pp = parallel.pipeline_model_parallel_size
    extra = sorted(set(embedding_stages) - {0, pp - 1})
    head_extra = sorted(set(head_stages) - {pp - 1})
    for stage in extra + head_extra:
        if not 0 <= stage < pp:
            raise ConfigError(f"pipeline_model_parallel_size: stage {stage} is outside 0..{pp - 1}")

    def embedding_ranks(pp_ranks: list[int], *_) -> list[int]:
        return [pp_ranks[s] for s in sorted({0, len(pp_ranks) - 1, *extra})]

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        get_embedding_ranks=embedding_ranks,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    global _OUTPUT_HEAD_GROUP
    _OUTPUT_HEAD_GROUP = _pipeline_subgroup([*head_extra, pp - 1], timedelta(minutes=parallel.timeout_minutes)) \
        if head_extra else None
    seed_all(seed)


def _pipeline_subgroup(stages: list[int], timeout: timedelta):
    """A new group per pipeline group, of its ranks at `stages`; returns this rank's (None if not a member).
    Collective over the world: every rank creates every group, in the same order. `timeout`: the configured one
    (a new group otherwise gets the backend's default, NCCL's 10 minutes, whatever the world's is)."""
    from megatron.core import parallel_state

    mine = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    pipelines = [None] * dist.get_world_size()
    dist.all_gather_object(pipelines, mine)
    own = None
    for ranks in sorted({tuple(p) for p in pipelines}):
        group = dist.new_group([ranks[s] for s in sorted(set(stages))], timeout=timeout)
        if dist.get_rank() in ranks:
            own = group if dist.get_rank() in [ranks[s] for s in stages] else None
    return own


def output_head_group():
    """This rank's group of pipeline stages holding the output head or a copy of it (None if not a member or
    no stage other than the last holds a copy)."""
    return _OUTPUT_HEAD_GROUP


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch; pipeline stages get distinct streams, TP ranks megatron's tracked ones."""
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def rng_state() -> dict:
    """Every generator's state in this process (for exact resume)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rank() -> int:
    """This process's global rank: the process group's, else (before one is up) the launcher's RANK or Slurm's."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_rank0(fn):
    """Run `fn` on rank 0 and return its result on every rank; its exception is raised on every rank (a rank-0
    failure must not leave the others waiting in a collective: a hang under NCCL, mismatched collectives after)."""
    box = [None]
    if rank() == 0:
        try:
            box[0] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank (a stop signal's Interrupted too)
            box[0] = e
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def destroy() -> None:
    """Tear down megatron's groups (if a stage made them) and the process group (if one is up)."""
    global _OUTPUT_HEAD_GROUP
    _OUTPUT_HEAD_GROUP = None
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # not imported: there are no groups
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
