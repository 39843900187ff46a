"""The one place that loads Hugging Face models and tokenizers: from local directories only (every stage reads
directories that a stage or the user wrote; nothing is downloaded), models in fp32.

A directory that is missing or that transformers cannot load raises HFLoadError: one line naming the directory,
what it lacks and where such a directory comes from (a user error: the entry point exits 2 without a traceback).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from minimodel.errors import MissingInputError
from minimodel.training.hf_mlm import check_architecture

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# A model may have more token embeddings than its tokenizer has tokens, up to this many: Megatron pads its vocabulary
# to a multiple of 128 x tensor-parallel size, others by their own rule (DeBERTa-v3: 128100 rows for 128001 tokens).
MAX_VOCAB_PADDING = 1024


def embeddings_fit(tokens: int, rows: int) -> bool:
    """Whether a tokenizer of `tokens` tokens fits a model with `rows` token embeddings: one per id, plus padding."""
    return 0 <= rows - tokens <= MAX_VOCAB_PADDING

_WHERE_MODELS_COME_FROM = ("a directory written by pretrain/export.py, pretrain/minipost.py, evaluate/finetune.py or "
                           "adapt/plug.py, or a downloaded Hugging Face model (save_pretrained)")


log = logging.getLogger(__name__)


class HFLoadError(MissingInputError):
    """A model or tokenizer directory that does not exist or that transformers cannot load."""


def is_tokenizer_dir(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer saved in `path` (a data stage's <lang>/tokenizer, or a model directory)."""
    path = Path(path)
    if not is_tokenizer_dir(path):
        what = "does not exist" if not path.exists() else f"has no {' or '.join(TOKENIZER_FILES)}"
        raise HFLoadError(f"{path} is not a tokenizer directory ({what}): give <data output_dir>/<lang>/tokenizer "
                          f"built by pretrain/prepare_data.py, or a model directory saved with its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise HFLoadError(f"cannot load the tokenizer in {path}: {e}") from None


@contextlib.contextmanager
def _own_load_report():
    """transformers' table of missing and unexpected weights, silenced: load_model checks them itself. So is its
    tensor-parallel plan check, which that level switches on (modeling_utils runs it when its logger's level is
    WARNING or above) and which then lists every layer as "not sharded": no model here is loaded tensor-parallel."""
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils",
                                                     "transformers.distributed.tensor_parallel")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_loaded(model, model_dir: Path, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a model whose body the directory lacks weights of (transformers would leave them random); say which
    weights are new (a task head, BERT's pooler) and how many went unused (e.g. a masked-LM head under a task head)."""
    prefix = f"{model.base_model_prefix}."
    bare = not any(name.startswith(prefix) for name, _ in model.named_parameters())  # a body under its own names
    body = sorted(k for k in missing if (bare or k.startswith(prefix)) and not k.removeprefix(prefix).startswith(
        "pooler."))
    if body:
        raise HFLoadError(f"{model_dir} lacks weights of the {type(model).__name__} body ({', '.join(body[:4])}"
                          f"{', ...' if len(body) > 4 else ''}: {len(body)} in all): the checkpoint is incomplete or "
                          f"of another architecture ({_WHERE_MODELS_COME_FROM})")
    if missing or unexpected:
        log.info("%s from %s: %s new (initialised here)%s", type(model).__name__, model_dir,
                 ", ".join(sorted(missing)) or "nothing", f"; {len(unexpected)} saved weights unused (e.g. "
                 f"{sorted(unexpected)[0]})" if unexpected else "")


def _not_a_model_dir(model_dir: str | os.PathLike) -> str | None:
    """Why `model_dir` is no Hugging Face model directory, or None."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        return None
    what = "does not exist" if not model_dir.exists() else "has no config.json"
    return f"{model_dir} is not a Hugging Face model directory ({what}): give {_WHERE_MODELS_COME_FROM}"


def require_model_dir(model_dir: str | os.PathLike, key: str) -> None:
    """`key`'s value names a Hugging Face model directory, checked before a stage claims its output directory (a
    typo's run would hold it, and refuse the corrected command as another config)."""
    if problem := _not_a_model_dir(model_dir):
        raise MissingInputError(f"{key}: {problem}")


def load_model(model_dir: str | os.PathLike, auto_class=None, **kwargs):
    """The model in `model_dir`, in fp32: as `auto_class` (e.g. transformers.AutoModelForMaskedLM, which picks the
    class for the model type) or, if None, as the architecture its config.json names. `kwargs` go to
    from_pretrained (e.g. num_labels, output_loading_info). Refuses a directory that lacks weights of the model's
    body; weights it lacks outside the body (a new task head) are initialised, and one line says which."""
    model_dir = Path(model_dir)
    if problem := _not_a_model_dir(model_dir):
        raise HFLoadError(problem)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise HFLoadError(f"cannot read {model_dir}/config.json: {e}") from None
    if auto_class is None:
        architecture = (config.architectures or [None])[0]
        auto_class = getattr(transformers, architecture, None) if architecture else None
        if auto_class is None:
            raise HFLoadError(f"{model_dir}/config.json names no architecture transformers has "
                              f"({config.architectures})")
    want_info = kwargs.pop("output_loading_info", False)
    try:
        with _own_load_report():
            model, info = auto_class.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                     output_loading_info=True, **kwargs)
    except ValueError as e:  # e.g. an Auto class with no class for this model type
        raise HFLoadError(f"cannot load {model_dir} as {auto_class.__name__} (model type {config.model_type!r}): "
                          f"{e}") from None
    except OSError as e:  # missing or unreadable weights
        raise HFLoadError(f"cannot load the model in {model_dir}: {e}") from None
    _check_loaded(model, model_dir, info["missing_keys"], info["unexpected_keys"])
    return (model, info) if want_info else model


def load_masked_lm(model_dir: str | os.PathLike):
    """`model_dir` as its *ForMaskedLM, refusing a checkpoint saved without its MLM head (a *Model save, a
    sentence-embedding model): transformers would give it a random head that adaptation cannot learn through; and
    an architecture the masked-LM code would read wrong (hf_mlm.check_architecture)."""
    model, info = load_model(model_dir, AutoModelForMaskedLM, output_loading_info=True)
    head_missing = sorted(info["missing_keys"])  # the body's, load_model refused
    if head_missing:
        raise HFLoadError(f"{model_dir} has no masked-LM head (missing {', '.join(head_missing[:3])}...; saved as "
                          f"{model.config.architectures}): train one first with MiniPost's head-only option "
                          f"(pretrain/minipost.py source={model_dir} mini.head_only=true mini.head_init=random "
                          f"distill.weight=0; in "
                          f"the pipeline primary_head: train) and use its mini/ directory as the primary")
    check_architecture(model, str(model_dir))
    return model


def checkpoint_names(model_dir: str | os.PathLike) -> set[str]:
    """The tensor names a Hugging Face model directory's weights hold (safetensors or PyTorch, sharded or not),
    without loading the tensors."""
    d = Path(model_dir)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            return set(json.loads((d / index).read_text())["weight_map"])
    if (d / "model.safetensors").is_file():
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return set(f.keys())
    if (d / "pytorch_model.bin").is_file():
        return set(torch.load(d / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True))
    raise HFLoadError(f"{d} holds no model weights (model.safetensors or pytorch_model.bin)")


def initialised_at_load(model, model_dir: str | os.PathLike) -> set[str]:
    """Names of `model`'s parameters that its directory's weights do not hold: initialised when it was loaded (a task
    head, BERT's pooler on a masked-LM checkpoint), so they have no pretrained value to differ from; every name of
    a tied one."""
    saved = checkpoint_names(model_dir)
    # LayerNorm's old names (bert-base-uncased's file), which transformers renames when it loads them
    saved |= {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name)) for name in saved}
    prefix = f"{model.base_model_prefix}."

    def in_file(name: str) -> bool:
        return name in saved or name.removeprefix(prefix) in saved or prefix + name in saved

    # a tied matrix is saved under one of its names (XLM-R's safetensors: the input embeddings', while the model
    # lists it as lm_head.decoder.weight): it was loaded if any of them is in the file
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return {name for names in aliases.values() if not any(map(in_file, names)) for name in names}
