"""Run stock megatron-core and DeepSpeed on a machine without CUDA (gloo, fp32): everything CPU-specific lives here.
Both functions do nothing when CUDA is available, so GPU runs use the unmodified libraries and see all their warnings.

`quiet()` runs when minimodel is imported, before any stage imports megatron-core or DeepSpeed: it silences the
warnings that only say this machine has no GPU software (_CPU_NOISE: each message, category and emitting module
seen on the demo's terminal; every other warning still shows) and names DeepSpeed's CPU accelerator (DS_ACCELERATOR,
inherited by every launcher this process starts) instead of letting DeepSpeed guess it and warn.

`apply()` is called by minimodel.distributed before megatron builds anything. What it changes, and why (each found
running megatron-core on a CPU-only machine with torch's CPU wheel):
- the tensor-parallel RNG tracker keeps CUDA generator states: a subclass keeps CPU generator states instead,
  and the get/set-RNG-state helpers used by activation recompute point at the CPU generator;
- torch.cuda.current_device / synchronize / current_stream are called unconditionally: mapped to CPU
  equivalents / no-ops;
- literal "cuda" devices (schedules, tied-embedding setup, optimizer, grad clipping), `.cuda()` calls and
  `tensor.type() == "torch.cuda.FloatTensor"` checks: a process-wide TorchFunctionMode maps them to the CPU
  (its overhead is within measurement noise). It is not active inside autograd backward functions, hence
  current_device() returns the CPU device itself.

`quiet_shm_op_load()` wraps DeepSpeed's init_distributed, whose CPU accelerator prints a line from every process;
`release_shared_memory()` runs after it: that accelerator maps a shared-memory segment per rank of a one-node world
and never removes its name (see the function).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_applied = False

# (message regex, category, emitting module regex) of warnings that mean nothing without a GPU.
_CPU_NOISE = (
    # megatron-core falls back to torch implementations without Apex / Transformer Engine: the only ones on a CPU
    (r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning, r"megatron\.core\."),
    # a CUDA setting for overlapping tensor-parallel communication with GEMMs
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron\.core\.tensor_parallel\.layers"),
)


_SHM_OP_LOADED = re.compile(r"DeepSpeed \S+ built successfully")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "CUDA device i" to torch; there is none here.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaDeviceToCpu(TorchFunctionMode):
    """Maps device="cuda"/int device arguments, `.cuda()` and `.to("cuda")` to the CPU, and reports CPU tensors'
    `.type()` as the CUDA type (the optimizer and grad clipping check for "torch.cuda.FloatTensor")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.Tensor, torch.dtype)) \
                and args[1] is not None and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for a CUDA stream/event (a class, so type annotations using torch.cuda.Stream still work):
    CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG-state tracker over the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    # initialize_rng_tracker instantiates the module-level class name: every (re)initialisation gets ours.
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mp_random.initialize_rng_tracker(force_reset=True)


def quiet() -> bool:
    """Without CUDA: silence _CPU_NOISE and run DeepSpeed on its CPU accelerator; returns whether it applied."""
    if torch.cuda.is_available():
        return False
    for message, category, module in _CPU_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return True


def apply() -> bool:
    """Install the CPU shims once per process if CUDA is absent; returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # A device object (not the index 0): also used as `device=` inside backward functions, where the
    # TorchFunctionMode below is not active.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by the caller
    _install_rng_tracker()
    _CudaDeviceToCpu().__enter__()  # process-wide, for the life of the process
    _applied = True
    return True


@contextlib.contextmanager
def quiet_shm_op_load():
    """Around deepspeed.init_distributed: its CPU accelerator prints "DeepSpeed <shm op> built successfully" from
    every process of every DeepSpeed stage (a bare print, also when the op was built long ago). That line is dropped;
    anything else printed meanwhile passes. Nothing changes under CUDA."""
    if torch.cuda.is_available():
        yield
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not _SHM_OP_LOADED.fullmatch(line.strip())))


def release_shared_memory() -> None:
    """Remove the name of this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    DeepSpeed's CPU accelerator creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB) per
    rank at init_distributed and never unlinks it: every run under its launcher leaked 69 MB a rank until reboot
    (20 GB of /dev/shm on a test machine after a day), and a later run on the same port opened a dead run's
    segment. After a barrier every rank has mapped its peers' segments; a mapping outlives its name, so each rank
    removes its own and the memory goes back when the run's processes exit, however they exit."""
    import torch.distributed as dist

    if torch.cuda.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)  # absent when the ranks span nodes (no segment then)
