"""Atomic, resumable megatron-core `dist_checkpointing` checkpoints.

Layout under a checkpoint root:

    <root>/iter_0000100/      a complete checkpoint (dist_checkpointing format)
    <root>/iter_0000200/
    <root>/latest             text file naming the newest complete checkpoint ("iter_0000200")

Every rank writes its shards into `iter_XXXXXXX.tmp/`; only after all ranks finished (barrier) does rank 0 rename it
to `iter_XXXXXXX/` and then replace `latest` atomically. A crash mid-save therefore leaves at most a `*.tmp`
directory, which resume ignores (and the next prune deletes): the last good checkpoint is never touched. Only
complete directories count, so resume also works if `latest` itself was lost.

The caller builds the sharded state dict (model, optimizer, ...); this module adds the per-rank RNG states so a
resumed run draws the same dropout masks as an uninterrupted one.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async

from minimodel import distributed, faults
from minimodel.files import replace_dir, write_text_atomic
from minimodel.training.config import CheckpointConfig
from minimodel.training.preemption import leave_stop_signals_to_the_parent

log = logging.getLogger(__name__)

LATEST = "latest"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
RNG_KEY = "rng_state"


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first; `*.tmp` leftovers are not listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITER_DIR.match(path.name)
        if match and path.is_dir() and (path / "metadata.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by `<root>/latest`, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _ITER_DIR.match(named.name) and (named / "metadata.json").is_file():
            return named
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, named)
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def step_of(path: str | os.PathLike) -> int:
    match = _ITER_DIR.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like iter_0000100)")
    return int(match.group(1))


# -- RNG state ---------------------------------------------------------------------------------------------------
def _rng_sharded_object(data: Any):
    """One RNG state per global rank: dropout streams differ by tensor/pipeline rank."""
    return ShardedObject(RNG_KEY, data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# -- save / load -------------------------------------------------------------------------------------------------
_writer_results: SyncManager | None = None


def _shield_the_writer_queue() -> None:
    """megatron's checkpoint writer reports through a queue served by a process it spawns at the first save. Slurm's
    preemption SIGTERM reaches every process of the job step, so that process died of it, and the save the grace
    period is for failed (BrokenPipeError) in any launch that had saved before. Serve the queue from a process that
    leaves the stop signals to the trainer."""
    global _writer_results
    if _writer_results is None:
        # megatron's own queue, made on first use (a megatron-core without it would take ours silently)
        assert hasattr(filesystem_async, "_results_queue"), "megatron-core moved its checkpoint writer's queue"
        _writer_results = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _writer_results.start(initializer=leave_stop_signals_to_the_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _writer_results.Queue()


def save_checkpoint(root: str | os.PathLike, step: int, sharded_state_dict: dict,
                    policy: CheckpointConfig | None = None) -> Path:
    """Collective: write `sharded_state_dict` + RNG states as checkpoint `step`, atomically; prune old ones.

    Returns the final directory. Deletes the complete checkpoints `policy` says have expired (none if None).
    """
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that crashed mid-save
        tmp.mkdir()
    dist.barrier()
    state = dict(sharded_state_dict)
    state[RNG_KEY] = _rng_sharded_object(distributed.rng_state())
    _shield_the_writer_queue()
    dist_checkpointing.save(state, str(tmp))
    faults.point("checkpoint", step)
    dist.barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if dist.get_rank() == 0:
        replace_dir(tmp, final)  # a step saved again (after resuming from an older checkpoint) replaces the old one
        write_text_atomic(root / LATEST, final.name + "\n")
        if policy is not None:
            prune(root, step, policy)
    dist.barrier()
    return final


def prune(root: Path, step: int, policy: CheckpointConfig) -> None:
    """After saving `step`: delete the checkpoints `policy` says have expired, any of later steps (a run this one
    did not continue, train.checkpoint.resume=false: a later resume would jump to it), and what killed saves and
    deletes left (a checkpoint's size each: a run preempted often would fill its quota with them)."""
    complete = complete_checkpoints(root)
    later = [path for s, path in complete if s > step]
    for path in later + policy.expired([path for s, path in complete if s <= step]):
        _delete(path)
    for leftover in [*root.glob("iter_*.tmp"), *root.glob(".deleting-iter_*"), *root.glob(".iter_*.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _delete(path: Path) -> None:
    """Out of the checkpoints' names first: a delete cut short must not leave a directory that looks complete."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier delete of this step, cut short
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_common(path: str | os.PathLike) -> dict:
    """The replicated (non-sharded) part of a checkpoint: step counters, scheduler state, layout..."""
    return dist_checkpointing.load_common_state_dict(str(path))


def load_checkpoint(path: str | os.PathLike, sharded_state_dict: dict, restore_rng: bool = True) -> dict:
    """Collective: load `sharded_state_dict`'s entries from checkpoint `path`; restore RNG states if asked.

    RNG states are per rank, so `restore_rng` requires the same parallel layout as when saving.
    """
    state = dict(sharded_state_dict)
    if restore_rng:
        state[RNG_KEY] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, str(path))
    if restore_rng:
        distributed.set_rng_state(loaded.pop(RNG_KEY))
    return loaded
