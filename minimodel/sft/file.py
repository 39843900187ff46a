"""A sparse fine-tuning (SFT) on disk and applied to a model.

This project's format, a directory:
    sft.safetensors   diff.indices/<param>  int64 flat (row-major) indices of the changed entries, ascending
                      diff.values/<param>   fp32 theta - theta0 at those entries
                      abs/<param>           dense values of the parameters trained whole (the head)
    sft.json          manifest: {"format": "minimodel-sft", "version": 1, "base_model": {"sha256", "path"},
                      "shapes": {<param>: [...]}, "info": {...how it was trained...}}
The base model is named by its manifest.model_hash: an SFT is a difference and only means something added to the
exact weights it was learned from, so apply/revert refuse any other model.

The reference implementation's layout (composable-sft, `pytorch_diff.bin`) is read and written too: torch.save of
{"diffs": {name: {"size", "index_steps", "values"}}, "abs": {name: tensor}}, where index_steps is the first flat
index followed by the gaps between consecutive ones, over column-major flat indices (dimension 0 fastest). It does
not name its base model: whoever reads one says which model it was learned from.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minimodel.errors import MissingInputError, UserError
from minimodel.files import replace_dir

FORMAT = "minimodel-sft"
VERSION = 1
TENSORS_FILE = "sft.safetensors"
MANIFEST_FILE = "sft.json"
REFERENCE_FILE = "pytorch_diff.bin"
SFT_DIR = "sft"  # where a training run (minimodel/sft/train.py) puts its SFT: <output_dir>/sft/


class SFTError(UserError):
    pass


@dataclass
class SparseDiff:
    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, flat row-major, ascending, unique
    values: torch.Tensor  # fp32, one per index

    def dense(self) -> torch.Tensor:
        out = torch.zeros(int(np.prod(self.shape)), dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.view(self.shape)


@dataclass
class SparseFineTuning:
    base_sha256: str  # manifest.model_hash of the model directory it was learned from
    diffs: dict[str, SparseDiff] = field(default_factory=dict)
    abs: dict[str, torch.Tensor] = field(default_factory=dict)
    base_path: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(d.indices.numel() for d in self.diffs.values())

    # -- this project's format -------------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the SFT directory atomically (a complete old one stays until the new one is complete)."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {}
        for name, d in self.diffs.items():
            tensors[f"diff.indices/{name}"] = d.indices.contiguous()
            tensors[f"diff.values/{name}"] = d.values.contiguous()
        tensors.update({f"abs/{name}": t.detach().cpu().contiguous() for name, t in self.abs.items()})
        save_file(tensors, str(tmp / TENSORS_FILE))
        manifest = {"format": FORMAT, "version": VERSION,
                    "base_model": {"sha256": self.base_sha256, "path": self.base_path},
                    "shapes": {name: list(d.shape) for name, d in self.diffs.items()},
                    "numel": self.numel, "info": self.info}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        return replace_dir(tmp, out_dir)

    @classmethod
    def load(cls, sft_dir: str | os.PathLike) -> "SparseFineTuning":
        sft_dir = Path(sft_dir)
        if not (sft_dir / MANIFEST_FILE).is_file():
            hint = (f"; it holds the reference layout {REFERENCE_FILE}: read it with read_reference(path, base_sha256)"
                    if (sft_dir / REFERENCE_FILE).is_file() else "")
            raise MissingInputError(f"{sft_dir} is not an SFT directory (no {MANIFEST_FILE}){hint}")
        manifest = json.loads((sft_dir / MANIFEST_FILE).read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise SFTError(f"{sft_dir / MANIFEST_FILE}: format {manifest.get('format')} version "
                           f"{manifest.get('version')} is not {FORMAT} version {VERSION}")
        tensors = load_file(str(sft_dir / TENSORS_FILE))
        diffs = {name: SparseDiff(tuple(shape), tensors[f"diff.indices/{name}"], tensors[f"diff.values/{name}"])
                 for name, shape in manifest["shapes"].items()}
        abs_ = {k.removeprefix("abs/"): v for k, v in tensors.items() if k.startswith("abs/")}
        base = manifest["base_model"]
        return cls(base["sha256"], diffs, abs_, base.get("path"), manifest.get("info", {}))

    def check_language(self, lang: str, where: str) -> None:
        """Refuse unless this is a language SFT (adapt/sft.py) of `lang`; `where`: its directory, for the message."""
        kind, of = self.info.get("kind"), self.info.get("target_lang")
        if kind != "language":
            what = f"a {kind} SFT" if kind else "an SFT of no recorded kind"
            raise SFTError(f"{where} is {what}, not a language SFT: give adapt/sft.py's <output_dir>/{lang}/sft")
        if of != lang:
            raise SFTError(f"{where} is the language SFT of {of}, not of {lang}: give <output_dir>/{lang}/sft")

    # -- on a model ------------------------------------------------------------------------------------------------
    def without(self, names) -> "SparseFineTuning":
        """The same SFT without the differences of the parameters `names` (e.g. a task SFT's input embeddings, where
        the model it is applied to reads another vocabulary)."""
        return dataclasses.replace(self, diffs={n: d for n, d in self.diffs.items() if n not in names})

    def check_base(self, base_sha256: str, what: str = "this model") -> None:
        if base_sha256 != self.base_sha256:
            raise SFTError(f"the SFT was learned from the model with sha256 {self.base_sha256} "
                           f"({self.base_path or 'path unknown'}), not from {what} (sha256 {base_sha256}): apply it "
                           "to the model it was trained from")

    def _params(self, model: nn.Module, names) -> dict[str, nn.Parameter]:
        # every name of a tied parameter: a masked LM with tied embeddings lists them under one name only (which one
        # depends on the transformers version), and a language SFT, learned untied, names the input embeddings
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise SFTError(f"the SFT changes {missing[:3]}, which {type(model).__name__} does not have: it is an SFT "
                           "of another architecture (a language SFT applies to a task model without its head: "
                           "with_abs=False)")
        named: dict[int, str] = {}
        for n in names:  # e.g. a reference SFT learned untied, naming both the embeddings and the decoder
            if (other := named.setdefault(id(params[n]), n)) != n:
                raise SFTError(f"the SFT changes both {other} and {n}, which are one tied tensor in "
                               f"{type(model).__name__}: untie them before applying it")
        for n in self.diffs:
            if tuple(params[n].shape) != self.diffs[n].shape:
                raise SFTError(f"{n}: the SFT's shape {self.diffs[n].shape} is not the model's "
                               f"{tuple(params[n].shape)}")
        return params

    def _add(self, model: nn.Module, sign: float) -> None:
        params = self._params(model, self.diffs)
        with torch.no_grad():
            for name, d in self.diffs.items():
                p = params[name]
                p.view(-1).index_add_(0, d.indices.to(p.device), d.values.to(p.device, p.dtype), alpha=sign)

    def apply(self, model: nn.Module, base_sha256: str, with_abs: bool = True, what: str = "this model") -> None:
        """theta += diff in place; with_abs: also set the dense parameters (a task SFT's head). `base_sha256`: the
        hash of the directory `model` was loaded from (manifest.model_hash), refused unless it is the SFT's base;
        `what`: that directory, for the refusal."""
        self.check_base(base_sha256, what)
        dense = self._params(model, self.abs) if with_abs else {}  # checked before anything changes
        for name, value in self.abs.items() if with_abs else ():
            if tuple(dense[name].shape) != tuple(value.shape):
                raise SFTError(f"{name}: the SFT's dense part is {tuple(value.shape)}, the model's "
                               f"{tuple(dense[name].shape)} (a task head of another label count?)")
        self._add(model, 1.0)
        with torch.no_grad():
            for name, value in self.abs.items() if with_abs else ():
                dense[name].copy_(value)

    def revert(self, model: nn.Module, base_sha256: str) -> None:
        """theta -= diff in place (dense parameters keep their values, as the reference does)."""
        self.check_base(base_sha256)
        self._add(model, -1.0)


def read_sft_manifest(sft_dir: str | os.PathLike) -> dict | None:
    """An SFT directory's manifest (its base model; `info`: how it was trained, its compute), without its tensors;
    None when there is no SFT there."""
    manifest = Path(sft_dir) / MANIFEST_FILE
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def read_sft_info(sft_dir: str | os.PathLike) -> dict | None:
    """The manifest's `info` (read_sft_manifest); None when there is no SFT there."""
    manifest = read_sft_manifest(sft_dir)
    return manifest.get("info", {}) if manifest is not None else None


def compose(*sfts: SparseFineTuning) -> SparseFineTuning:
    """One SFT equal to applying `sfts` in turn: differences summed entry by entry, a later SFT's dense parameters
    replacing an earlier one's. All must share the base model."""
    if not sfts:
        raise SFTError("compose needs at least one SFT")
    first = sfts[0]
    for other in sfts[1:]:
        if other.base_sha256 != first.base_sha256:
            raise SFTError(f"cannot compose SFTs of different base models (sha256 {first.base_sha256} and "
                           f"{other.base_sha256})")
    diffs: dict[str, SparseDiff] = {}
    for name in dict.fromkeys(n for s in sfts for n in s.diffs):
        parts = [s.diffs[name] for s in sfts if name in s.diffs]
        if len({p.shape for p in parts}) > 1:
            raise SFTError(f"cannot compose: {name} has shapes {[p.shape for p in parts]}")
        indices, inverse = torch.unique(torch.cat([p.indices for p in parts]), sorted=True, return_inverse=True)
        values = torch.zeros(indices.numel(), dtype=torch.float32)
        values.index_add_(0, inverse, torch.cat([p.values.float() for p in parts]))
        diffs[name] = SparseDiff(parts[0].shape, indices, values)
    abs_ = {k: v for s in sfts for k, v in s.abs.items()}
    return SparseFineTuning(first.base_sha256, diffs, abs_, first.base_path,
                            {"composed_of": [s.info for s in sfts]})


# -- the reference layout -------------------------------------------------------------------------------------------
def _column_major(indices: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    coords = np.unravel_index(indices.numpy(), shape)
    return np.ravel_multi_index(coords, shape, order="F")


def write_reference(sft: SparseFineTuning, out_dir: str | os.PathLike) -> Path:
    """<out_dir>/pytorch_diff.bin in the reference layout (the base model's hash is not part of it)."""
    diffs = {}
    for name, d in sft.diffs.items():
        flat = _column_major(d.indices, d.shape)
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        steps = np.diff(flat, prepend=0) if flat.size else flat
        diffs[name] = {"size": torch.Size(d.shape), "index_steps": [int(s) for s in steps],
                       "values": d.values[torch.from_numpy(order)].clone()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REFERENCE_FILE
    tmp = path.with_name(f".{REFERENCE_FILE}.{os.getpid()}.tmp")
    torch.save({"diffs": diffs, "abs": {k: v.detach().cpu() for k, v in sft.abs.items()}}, tmp)
    os.replace(tmp, path)
    return path


def read_reference(path: str | os.PathLike, base_sha256: str, base_path: str | None = None) -> SparseFineTuning:
    """A reference `pytorch_diff.bin` (or the directory holding it), learned from the model with `base_sha256`."""
    path = Path(path)
    if path.is_dir():
        path = path / REFERENCE_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist: give a composable-sft {REFERENCE_FILE} or its directory")
    # The reference stores its first index step as a numpy int64: allow exactly that beside plain tensors (under
    # numpy 1's module name too: every released SFT was saved before numpy 2)
    scalar = np._core.multiarray.scalar
    with torch.serialization.safe_globals([scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
                                           np.dtypes.Int64DType]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    diffs = {}
    for name, enc in data.get("diffs", {}).items():
        shape = tuple(int(s) for s in enc["size"])
        flat = np.cumsum(np.asarray(enc["index_steps"], dtype=np.int64))
        row_major = np.ravel_multi_index(np.unravel_index(flat, shape, order="F"), shape)
        order = np.argsort(row_major, kind="stable")
        diffs[name] = SparseDiff(shape, torch.from_numpy(row_major[order]),
                                 torch.as_tensor(enc["values"]).float()[torch.from_numpy(order)])
    return SparseFineTuning(base_sha256, diffs, dict(data.get("abs", {})), base_path,
                            {"read_from": str(path.resolve())})
