"""Step 2 of the method: learn a target-language token-embedding matrix with the transformer body frozen.

`over: mini` runs it over a mini-model (MiniJoint or MiniPost: its minimodel.json must say it is aligned with
`primary_model`); `over: full` runs it over the primary model itself, the standard baseline. Each target language
is an independent run in `<output_dir>/<lang>/` (see minimodel/adaptation/artifact.py for what it leaves), with a
snapshot of the embeddings at step 0 and every `snapshot_every` steps for the compute-vs-quality curve; a failed language is
recorded in `<output_dir>/summary.json` and does not stop the others. `target_lang=<code>` selects one language of
the list (one Slurm array task per language; the tasks share summary.json under a file lock).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from minimodel import distributed
from minimodel.adaptation.artifact import TOKENIZER_DIR, read_info, snapshot_dir, write_artifact
from minimodel.adaptation.extend import extend_tokenizer
from minimodel.adaptation.vocab import INITIALISERS, install_vocabulary, token_map
from minimodel.config import PerLanguageRun, require, save_config
from minimodel.errors import MissingInputError
from minimodel.files import write_text_atomic
from minimodel.hf import load_masked_lm, require_model_dir
from minimodel.data.indexed import write_indexed
from minimodel.data.mlm import MaskedLMDataset
from minimodel.data.tokenizer import (copy_tokenizer, load_tokenizer, make_encoder, tokenizer_fingerprint,
                                      train_tokenizer)
from minimodel.manifest import check_aligned, model_hash
from minimodel.methods import parse_adapted_method, parse_method
from minimodel.ofa.factorized import check_rank, factorize, install_factorized
from minimodel.ofa.init import OFAConfig, OFAInputs
from minimodel.ofa.vectors import VectorFileError, load_word_vectors
from minimodel.provenance import ConfigChanged, NotAnOutputDirectory, claim_output, finish_output
from minimodel.sft.train import GradientHooks
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.deepspeed_loop import gather_full_params, optimizer_state_numel, train
from minimodel.training.hf_mlm import MLMFlops, masked_lm_loss, mlm_head, require_positions
from minimodel.training.metrics import plot_losses

log = logging.getLogger(__name__)


@dataclass
class TargetTokenizerConfig:
    # reuse an existing tokenizer, train a new one on the corpus, or extend the primary's vocabulary with pieces
    # learned from the corpus (OFA's setting: the primary's tokens keep their ids and rows; minimodel/adaptation/extend.py)
    mode: Literal["reuse", "train", "extend"] = "reuse"
    # reuse: a tokenizer dir, None: <data_dir>/<lang>/tokenizer (built by the data stage); extend: the tokenizer
    # extended, None: primary_model's
    path: str | None = None
    vocab_size: int = 50000  # train: total size, special tokens included (the paper's setup: 50k per language)
    new_pieces: int = 10000  # extend: at most this many target pieces added
    freeze_source_rows: bool = True  # extend: the primary's tokens keep their embeddings bit for bit
    character_coverage: float = 0.9995
    seed: int = 0


@dataclass
class EmbeddingInitConfig:
    method: str = "random"  # random (the paper's baseline) | copy_shared | ofa (see adaptation/vocab.py)
    std: float = 0.02
    seed: int = 0
    ofa: OFAConfig = field(default_factory=OFAConfig)  # init.method=ofa: word vectors, k, temperature

    def validate(self) -> None:
        require(self.method in INITIALISERS, "init.method", f"{self.method!r} is not one of {sorted(INITIALISERS)}")
        require(self.std > 0, "init.std", "must be > 0")


@dataclass
class EmbeddingConfig:
    # d: learn target coordinates C [V, d] over the primary's frozen SVD primitives P [d, h] (OFA's factorised
    # embeddings, minimodel/ofa/factorized.py); the init runs in coordinate space. None: the full V x h matrix
    factorized_dim: int | None = None

    def validate(self) -> None:
        check_rank(self.factorized_dim)


@dataclass
class TrainableConfig:
    """What trains besides the token embeddings and the output embeddings tied to them, which always do.
    The defaults are the paper's pipeline: everything else frozen."""
    position_embeddings: bool = False  # position (and token-type) embeddings
    embedding_layer_norm: bool = False  # the LayerNorm inside the embeddings module (BERT, XLM-R; not pre-LN models)
    head_transform: bool = False  # the LM head's dense layer and its LayerNorm
    head_bias: bool = False  # the LM head's output bias (resized to the new vocabulary either way)


@dataclass
class AdaptConfig(PerLanguageRun):
    output_dir: str = "runs/adapt"
    over: Literal["mini", "full"] = "mini"  # mini: mini-model adaptation; full: standard adaptation (baseline)
    primary_model: str | None = None  # HF dir of the primary model (the model adapted, when over=full)
    # the method these embeddings are filed under (minimodel/methods.py, e.g. minipost+copy_shared); None: the
    # adapted model's kind (standard, minijoint, minipost)
    method: str | None = None
    mini_model: str | None = None  # HF dir of the mini-model aligned with primary_model (over=mini)
    source_lang: str = "en"
    target_langs: list[str] = field(default_factory=lambda: ["sw"])
    target_lang: str | None = None  # one language of target_langs (a Slurm array task); None: all, in turn
    data_dir: str = "data/default"  # the data stage's output: <data_dir>/<lang>/{tokenizer,train,valid,verses.jsonl}
    seq_length: int = 128
    mask_prob: float = 0.15
    data_seed: int = 0
    tokenizer: TargetTokenizerConfig = field(default_factory=TargetTokenizerConfig)
    init: EmbeddingInitConfig = field(default_factory=EmbeddingInitConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    train: DeepSpeedLoopConfig = field(default_factory=lambda: DeepSpeedLoopConfig(
        steps=25000, optim=OptimizerConfig(lr=5e-4), schedule=ScheduleConfig(warmup_steps=1000)))
    # Steps between embedding snapshots <output_dir>/<lang>/snapshots/step_<N>/: the points of the report's
    # quality-vs-compute curve, each one vocabulary x hidden matrix on disk. None: at every evaluation
    # (train.eval.every); 0: none but step 0 (the initial embeddings, always kept) and the final embeddings.
    snapshot_every: int | None = None
    # a language's run directory holding another config's run (finished or not): discard it (else: an error)
    overwrite: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def neutral_keys(self) -> tuple[str, ...]:
        """Also what this run does not read: OFA's settings and vectors unless it initialises with OFA, the mini-model
        when it adapts the full model (a rebuilt one is no reason to redo it)."""
        unread = (() if self.init.method == "ofa" else ("init.ofa",)) + (("mini_model",) if self.over == "full" else ())
        return *super().neutral_keys(), *unread

    def validate(self) -> None:
        require(self.primary_model is not None, "primary_model",
                "is required: the Hugging Face directory of the primary model (e.g. <export>/primary)")
        require(self.over == "full" or self.mini_model is not None, "mini_model",
                "is required with over=mini (e.g. <export>/mini), or set over=full for standard adaptation")
        self.validate_languages()
        require_positions(self.seq_length, "seq_length", {
            "primary_model": self.primary_model, **({"mini_model": self.mini_model} if self.over == "mini" else {})})
        if self.tokenizer.mode == "extend":
            require(self.init.method != "random", "init.method",
                    "random would discard the primary's rows that tokenizer.mode=extend keeps: use copy_shared or ofa")
            require(self.tokenizer.new_pieces >= 1, "tokenizer.new_pieces", "must be >= 1")
            require(not self.tokenizer.freeze_source_rows or self.train.optim.weight_decay == 0,
                    "train.optim.weight_decay", "must be 0 with tokenizer.freeze_source_rows (AdamW's decay would "
                    "move the frozen rows), or set tokenizer.freeze_source_rows=false")
            require(not self.tokenizer.freeze_source_rows or self.train.zero_stage() <= 2, "train.zero_config",
                    "ZeRO-3 partitions the rows tokenizer.freeze_source_rows masks: use ZeRO 0-2 "
                    "(configs/deepspeed/zero2.json), or set tokenizer.freeze_source_rows=false")
            require(not self.tokenizer.freeze_source_rows or self.embedding.factorized_dim is None,
                    "embedding.factorized_dim", "with tokenizer.freeze_source_rows the primary's rows stay as they "
                    "are, but factorised embeddings hold every row as a rank-d approximation: drop one of them")
            require(not self.tokenizer.freeze_source_rows or not self.trainable.head_bias, "trainable.head_bias",
                    "would train the output bias of the primary's tokens, which tokenizer.freeze_source_rows keeps: "
                    "set trainable.head_bias=false, or tokenizer.freeze_source_rows=false")
        if self.method is not None:
            method = parse_adapted_method(self.method)
            require(method.learns_embeddings, "method", f"{self.method} learns no embeddings: its language "
                    "fine-tunings are trained by adapt/sft.py")
            require(method.source.over == self.over, "over",
                    f"method {self.method} adapts over={method.source.over}, not over={self.over}")
            require(method.init in (None, self.init.method), "init.method",
                    f"method {self.method} initialises with {method.init}, not {self.init.method}")
        require(self.snapshot_every is None or self.snapshot_every >= 0, "snapshot_every",
                "must be >= 0 (0: no snapshots; unset: at every train.eval.every)")

    @property
    def snapshot_interval(self) -> int:
        return self.train.eval.every if self.snapshot_every is None else self.snapshot_every


# -- the model ------------------------------------------------------------------------------------------------------

def select_trainable(model: nn.Module, choice: TrainableConfig) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the token embeddings, the output embeddings and what `choice` adds.
    Returns the trainable parameters under their artifact names (see adaptation/artifact.py)."""
    for p in model.parameters():
        p.requires_grad_(False)
    word = model.get_input_embeddings().weight
    word_module = {id(p) for p in model.get_input_embeddings().parameters()}  # factorised: P with C, never trained
    out = model.get_output_embeddings()
    chosen = {"input_embeddings": word}
    if out.weight is not word:
        chosen["output_embeddings"] = out.weight
    if choice.head_bias and out.bias is not None:
        chosen["output_bias"] = out.bias
    embeddings = model.base_model.embeddings
    norm_params = {id(p) for m in embeddings.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for name, p in embeddings.named_parameters():
        if id(p) in word_module:
            continue
        if choice.embedding_layer_norm if id(p) in norm_params else choice.position_embeddings:
            chosen[f"embeddings.{name}"] = p
    if choice.head_transform:
        for name, p in mlm_head(model).named_parameters():
            if p is not out.weight and p is not out.bias and id(p) not in word_module:
                chosen[f"head.{name}"] = p
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


# -- target tokenizer and data ---------------------------------------------------------------------------------------

def _read_verses(lang_dir: Path) -> list[dict]:
    path = lang_dir / "verses.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the {lang_dir.name} data with pretrain/prepare_data.py")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tokenize_corpus(lang_dir: Path, tokenizer_dir: Path, out_dir: Path) -> None:
    """Re-encode the data stage's verses with another tokenizer, into <out_dir>/{train,valid}.bin|.idx."""
    verses = _read_verses(lang_dir)
    encoder = make_encoder(tokenizer_dir, [v["text"] for v in verses[:64]])
    vocab_size = len(load_tokenizer(tokenizer_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        texts = [v["text"] for v in verses if v["split"] == split]
        with write_indexed(out_dir / f".{split}.partial", vocab_size) as writer:
            for ids in encoder.encode(texts):
                writer.add(ids)
        for ext in (".bin", ".idx"):
            os.replace(out_dir / f".{split}.partial{ext}", out_dir / f"{split}{ext}")


def prepare_target_data(cfg: AdaptConfig, lang: str, run_dir: Path) -> tuple[Path, Path]:
    """Rank 0 only: put the target tokenizer in <run_dir>/tokenizer; return the (train, valid) dataset prefixes.

    The data stage's datasets are used when the tokenizer is the one they were encoded with; otherwise (a trained
    or a different given tokenizer) the corpus is re-encoded into <run_dir>/data/."""
    lang_dir = Path(cfg.data_dir) / lang  # there: checked by claim_language
    tokenizer_dir = run_dir / TOKENIZER_DIR
    data_tokenizer = lang_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        tmp = run_dir / ".tokenizer.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.tokenizer.mode == "train":
            texts = [v["text"] for v in _read_verses(lang_dir) if v["split"] == "train"]
            train_tokenizer(texts, tmp, cfg.tokenizer.vocab_size, character_coverage=cfg.tokenizer.character_coverage,
                            seed=cfg.tokenizer.seed)
        elif cfg.tokenizer.mode == "extend":
            texts = [v["text"] for v in _read_verses(lang_dir) if v["split"] == "train"]
            source = [v["text"] for v in _read_verses(Path(cfg.data_dir) / cfg.source_lang) if v["split"] == "train"]
            summary = extend_tokenizer(cfg.tokenizer.path or cfg.primary_model, texts, source,
                                       cfg.tokenizer.new_pieces, tmp, seed=cfg.tokenizer.seed,
                                       character_coverage=cfg.tokenizer.character_coverage)
            log.info("%s: extended vocabulary: %s", lang, summary)
        else:
            source = Path(cfg.tokenizer.path) if cfg.tokenizer.path else data_tokenizer
            load_tokenizer(source)  # a clear error if it is not a tokenizer directory
            copy_tokenizer(source, tmp)  # a model directory (primary_model as the tokenizer) also holds weights
        os.replace(tmp, tokenizer_dir)
    same_as_data = (data_tokenizer / "tokenizer_config.json").is_file() and \
        tokenizer_fingerprint(load_tokenizer(tokenizer_dir)) == tokenizer_fingerprint(load_tokenizer(data_tokenizer))
    if same_as_data:
        return lang_dir / "train", lang_dir / "valid"
    data_dir = run_dir / "data"
    if not (data_dir / "valid.idx").is_file():
        _tokenize_corpus(lang_dir, tokenizer_dir, data_dir)
    return data_dir / "train", data_dir / "valid"


# -- one language ----------------------------------------------------------------------------------------------------

def ofa_inputs(cfg: AdaptConfig, model_dir: str, lang: str) -> OFAInputs:
    """The word vectors and settings init.method=ofa needs for target language `lang`."""
    ofa = cfg.init.ofa
    source_langs = ofa.source_langs or [cfg.source_lang]
    vectors = load_word_vectors(ofa.vectors, [*source_langs, lang])
    files = ", ".join(f.path for f in ofa.vectors)
    for needed in (lang, *source_langs):
        if not vectors.words(needed):
            raise VectorFileError(f"{files}: no word vector of language {needed!r}: OFA needs vectors of the target "
                                  f"and the source languages; learn them with pretrain/word_vectors.py (languages "
                                  f"{[*source_langs, lang]}) or add a file for {needed}")
    return OFAInputs(load_tokenizer(Path(model_dir)), vectors, source_langs, lang, ofa.neighbors, ofa.temperature)


def build_adaptation_model(cfg: AdaptConfig, model_dir: str, target_tokenizer, lang: str):
    """The model adaptation trains: `model_dir`'s *ForMaskedLM with the initial target vocabulary installed and
    only the configured parameters trainable. Returns (model, {artifact name: trainable parameter}, the tensors every
    artifact carries besides them: the token map the rows were initialised through and, factorised, the primitives;
    the initialiser's summary: rows per rule)."""
    model = load_masked_lm(model_dir)  # seq_length fits its positions: AdaptConfig.validate
    rank = cfg.embedding.factorized_dim

    def initial_rows():  # on rank 0 only: a large word-vector file and the SVD once, not once per rank
        if cfg.init.method == "random":
            mapping = torch.full((len(target_tokenizer),), -1, dtype=torch.long)
        else:
            mapping = token_map(load_tokenizer(Path(model_dir)), target_tokenizer)
        source = model.get_input_embeddings().weight.detach()
        if (cfg.init.method == "ofa" or rank) and cfg.over == "mini":
            # OFA and the factorisation start from the primary's matrix: a mini-model works in the primary's space
            source = load_masked_lm(cfg.primary_model).get_input_embeddings().weight.detach()
        primitives = coordinates = None
        if rank:
            coordinates, primitives, _ = factorize(source, rank)
            primitives = primitives.float()
            if cfg.init.method == "ofa":  # the reference's OFA works on the coordinates
                source = coordinates
        extra = {"ofa": ofa_inputs(cfg, model_dir, lang)} if cfg.init.method == "ofa" else {}
        weight, used_map = INITIALISERS[cfg.init.method](
            source, mapping, target_tokenizer, std=cfg.init.std, pad_id=target_tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(cfg.init.seed), **extra)
        weight = weight.float()
        if rank and cfg.init.method != "ofa":
            # drawn in the embedding space, where init.std is meant (a coordinate row is ~1/sqrt(V) in scale), then
            # put in coordinates (C P: their rank-d part); copied rows take the source's own coordinates
            drawn = (weight.double() @ torch.linalg.pinv(primitives.double())).float()
            weight = torch.where((used_map >= 0)[:, None], coordinates[used_map.clamp(min=0)].float(), drawn)
        return weight, used_map, primitives, extra["ofa"].summary if extra else {}

    weight, used_map, primitives, summary = distributed.on_rank0(initial_rows)
    pad_id = target_tokenizer.pad_token_id
    install_vocabulary(model, weight if primitives is None else weight @ primitives, used_map, pad_id)
    fixed = {"token_map": used_map}
    if primitives is not None:
        install_factorized(model, weight, primitives, pad_id)
        fixed["primitives"] = primitives
    trainable = select_trainable(model, cfg.trainable)
    if primitives is not None:  # what trains is the coordinates, not a V x h matrix
        trainable["coordinates"] = trainable.pop("input_embeddings")
    return model, trainable, fixed, summary


@dataclass
class FrozenRows:
    """The primary's rows under tokenizer.mode=extend: their gradients masked in training (`hooks`), and their exact
    fp32 values (`rows`) put back into what is saved: under bf16 DeepSpeed casts the module before it makes its fp32
    masters, so rows that never move are still rounded there."""
    hooks: GradientHooks
    rows: dict[str, torch.Tensor]

    def restore(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**tensors, **{n: torch.cat([kept, tensors[n][len(kept):]]) for n, kept in self.rows.items()}}


def freeze_source_rows(cfg: AdaptConfig, trainable: dict[str, torch.nn.Parameter]) -> FrozenRows | None:
    """tokenizer.mode=extend: the rows of the primary's own tokens (the ids below its vocabulary size) keep their
    values: their gradient is zeroed before DeepSpeed reduces, clips or steps it (LT-SFT's gradient masks; AdamW
    without weight decay never moves an entry whose gradient is always zero)."""
    if cfg.tokenizer.mode != "extend" or not cfg.tokenizer.freeze_source_rows:
        return None
    base_size = len(load_tokenizer(cfg.tokenizer.path or cfg.primary_model))
    masks = {}
    for name in ("input_embeddings", "coordinates", "output_embeddings"):
        if name in trainable:
            masks[name] = torch.zeros(trainable[name].shape, dtype=torch.bool)
            masks[name][base_size:] = True
    rows = {n: trainable[n].detach()[:base_size].float().cpu().clone() for n in masks}
    return FrozenRows(GradientHooks({n: trainable[n] for n in masks}, {}, masks), rows)


def claim_language(cfg, lang: str, models: dict[str, str | None], reads: tuple[str, ...] | None = None):
    """(run directory, config with target_lang=lang, what the directory holds for it: provenance.claim_output) of
    one language of a per-language stage. The run reads `<data_dir>/<lang>` only (`reads`: the languages it reads
    there, e.g. BiStil's source and target): it depends on that data (another language added to or changed in the
    data stage leaves it valid; its own, rebuilt, is refused naming what changed). Finish it with
    `finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())`: what was claimed. The resolved config is saved
    there as config.yaml. Its data and `models` ({config key: Hugging Face directory}) are checked first: the run
    of a mistyped path would hold the directory, and refuse the corrected command as another config's."""
    for key, model_dir in models.items():
        require_model_dir(model_dir, key)
    missing = [code for code in reads or (lang,) if not (Path(cfg.data_dir) / code).is_dir()]
    if missing:  # this language's failure (FileNotFoundError): the others still run
        raise FileNotFoundError(f"data_dir: {cfg.data_dir} holds no data of {', '.join(missing)}: build it with "
                                "pretrain/prepare_data.py (languages.<lang> in its config), or fix data_dir")
    run_dir = Path(cfg.output_dir) / lang
    lang_cfg = dataclasses.replace(cfg, target_lang=lang)
    claimed = claim_output(run_dir, lang_cfg, resumable=True, overwrite=cfg.overwrite,
                           ignore=lang_cfg.neutral_keys(), uses={"data_dir": reads or (lang,)})
    if distributed.is_rank0():
        save_config(lang_cfg, run_dir / "config.yaml")
    return run_dir, lang_cfg, claimed


def adapt_language(cfg: AdaptConfig, lang: str) -> str:
    """Learn `lang` embeddings; returns "done" or "interrupted" (resume by running the same command again)."""
    distributed.initialize_deepspeed()
    rank = dist.get_rank()
    models = {"primary_model": cfg.primary_model, **({"mini_model": cfg.mini_model} if cfg.over == "mini" else {})}
    run_dir, lang_cfg, claimed = claim_language(cfg, lang, models)
    if claimed == "finished" and read_info(run_dir) is not None:
        if rank == 0:
            log.info("%s: already adapted with this config (%s): skipping", lang, run_dir / "adapt.json")
        return "done"

    # Alignment is checked before anything is written or trained.
    if cfg.over == "mini":
        manifest = check_aligned(cfg.mini_model, cfg.primary_model)
        model_dir, kind, primary_sha = cfg.mini_model, manifest["kind"], manifest["primary_model"]["sha256"]
    else:
        model_dir, kind, primary_sha = cfg.primary_model, "standard", model_hash(cfg.primary_model)
    if cfg.method is not None and parse_method(cfg.method).model != kind:
        raise ValueError(f"method {cfg.method} adapts over a {parse_method(cfg.method).model} model, but "
                         f"{model_dir} is a {kind} model: fix method or mini_model")
    method = cfg.method or kind

    def prepare():
        run_dir.mkdir(parents=True, exist_ok=True)
        return prepare_target_data(cfg, lang, run_dir)

    train_prefix, valid_prefix = distributed.on_rank0(prepare)
    target_tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    model, trainable, fixed, init_summary = build_adaptation_model(cfg, model_dir, target_tokenizer, lang)
    frozen_rows = freeze_source_rows(cfg, trainable)
    flops_fn = MLMFlops(model)  # before DeepSpeed: ZeRO-3 empties the parameters it partitions
    train_data = MaskedLMDataset(train_prefix, target_tokenizer, cfg.seq_length, cfg.mask_prob, cfg.data_seed)
    valid_data = MaskedLMDataset(valid_prefix, target_tokenizer, cfg.seq_length, cfg.mask_prob, cfg.data_seed)

    tags = {"stage": "adapt", "method": method, "over": cfg.over, "source_lang": cfg.source_lang,
            "target_lang": lang, "zero_stage": cfg.train.zero_stage()}
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or f"adapt-{method}-{lang}")
    with Tracker.resumable(tracking, run_dir, lang_cfg, tags=tags, resume=claimed == "resume") as tracker:
        vocab_size = model.get_input_embeddings().weight.shape[0]  # before ZeRO-3 partitions it
        hidden_size = model.config.hidden_size
        provenance = {
            "over": cfg.over, "method": method, "source_lang": cfg.source_lang, "target_lang": lang,
            "adapted_model": str(Path(model_dir).resolve()), "adapted_layers": model.config.num_hidden_layers,
            "primary_model": {"path": str(Path(cfg.primary_model).resolve()), "sha256": primary_sha},
            "vocab_size": vocab_size, "hidden_size": hidden_size, "pad_token_id": target_tokenizer.pad_token_id,
            "tokenizer_sha256": tokenizer_fingerprint(target_tokenizer), "init": cfg.init.method,
            "init_summary": init_summary, "factorized_dim": cfg.embedding.factorized_dim,
            "trainable": sorted(trainable), "tied_output": "output_embeddings" not in trainable,
            "trainable_numel": sum(p.numel() for p in trainable.values()), "zero_stage": tags["zero_stage"],
            "adapt_run_id": tracker.run_id,  # continued by a resumed run
        }

        # Step 0: the initial embeddings, the start of every compute-vs-quality curve and the zero of the target
        # MLM gain (zero-shot task target_mlm). Written before DeepSpeed partitions anything; kept on resume.
        def write_step0() -> None:
            if read_info(snapshot_dir(run_dir, 0)) is None:
                write_artifact(snapshot_dir(run_dir, 0),
                               {**{k: p.detach().float().clone() for k, p in trainable.items()}, **fixed},
                               {**provenance, "steps": 0, "flops": 0.0, "wall_clock_s": 0.0})

        distributed.on_rank0(write_step0)

        def learned(engine) -> dict[str, torch.Tensor]:  # collective
            tensors = gather_full_params(engine, trainable)
            return tensors if frozen_rows is None else frozen_rows.restore(tensors)

        def snapshot(engine, state: dict) -> None:
            if not (cfg.snapshot_interval and state["step"] % cfg.snapshot_interval == 0):
                return
            tensors = learned(engine)
            distributed.on_rank0(lambda: write_artifact(
                snapshot_dir(run_dir, state["step"]), {**tensors, **fixed},
                {**provenance, "steps": state["step"], "flops": state["flops"], "wall_clock_s": state["wall_clock_s"]}))

        result = train(cfg.train, model, train_data, masked_lm_loss, flops_fn, output_dir=run_dir,
                       eval_data=valid_data, tracker=tracker, on_step=snapshot, desc=f"adapt {lang} ({method})")
        if frozen_rows is not None:
            frozen_rows.hooks.remove()
        if result.interrupted:
            tracker.interrupted(result.step)
            return "interrupted"
        tensors = learned(result.engine)
        state_numel = optimizer_state_numel(result.engine)  # collective

        def finish():  # rank 0; its error reaches every rank (run_languages goes on to the next language)
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            info = {**provenance, "optimizer_state_numel": state_numel, "steps": result.step,
                    "flops": last["compute/flops"], "wall_clock_s": last["compute/wall_clock_s"],
                    "final_train_loss": last["train/loss"], "final_eval_loss": last.get("eval/loss")}
            write_artifact(run_dir, {**tensors, **fixed}, info)
            tracker.log_artifact(run_dir / "adapt.json")
            tracker.log_artifact(plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_vs_flops.png",
                                             {"train/loss": "train", "eval/loss": "valid"}, x="compute/flops",
                                             x_label="cumulative FLOPs", title=f"{method} adaptation to {lang}"))
            finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())

        distributed.on_rank0(finish)
    return "done"


def record_statuses(output_dir: Path, statuses: dict[str, str]) -> Path:
    """Merge {lang: status} into <output_dir>/summary.json. The Slurm array tasks of one output_dir (one language
    each) update it concurrently: an exclusive lock serialises the read-modify-write, the atomic write keeps readers
    from ever seeing a half-written file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "summary.json"
    with open(output_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary.update(statuses)
        write_text_atomic(path, json.dumps(summary, indent=2))
    return path


def run_adaptation(cfg: AdaptConfig) -> StageResult:
    """Adapt to every selected language in turn (see run_languages)."""
    return run_languages(cfg, adapt_language, "adaptation")


def run_languages(cfg, run_one, what: str) -> StageResult:
    """run_one(cfg, lang) for every language of cfg.languages() in turn; one failure does not stop the others (its
    traceback: <cfg.output_dir>/<lang>.error.txt), a changed config or a missing model every language reads does
    (exit 2). Outputs {lang: status}, status "done" | "interrupted" | "failed: <error>", also written to
    <cfg.output_dir>/summary.json (rank 0); the stage failed if a language failed, else it is interrupted if a stop
    signal ended one."""
    distributed.initialize_deepspeed()
    rank = dist.get_rank()
    statuses: dict[str, str] = {}
    for lang in cfg.languages():
        try:
            statuses[lang] = run_one(cfg, lang)
            if rank == 0:  # an earlier failure's traceback is not this run's
                (Path(cfg.output_dir) / f"{lang}.error.txt").unlink(missing_ok=True)
        except (ConfigChanged, MissingInputError, NotAnOutputDirectory):
            raise  # the user's settings or inputs: every language would hit it (exit 2, its message)
        except Exception as e:  # noqa: BLE001 - recorded; the other languages still run
            statuses[lang] = f"failed: {type(e).__name__}: {e}"
            if rank == 0:  # beside its directory: one it did not claim holds nothing (else it would be no stage's)
                error = Path(cfg.output_dir) / f"{lang}.error.txt"
                write_text_atomic(error, traceback.format_exc())
                log.error("%s: %s failed (%s); traceback in %s", lang, what, e, error)
        if statuses[lang] == "interrupted":
            break  # a stop signal: checkpointed, leave the remaining languages to the resubmitted job
    if rank == 0:
        record_statuses(Path(cfg.output_dir), statuses)
    failed = any(s.startswith("failed") for s in statuses.values())
    return StageResult("failed" if failed else "interrupted" if "interrupted" in statuses.values() else "finished",
                       statuses)
