"""Language SFTs (LT-SFT step 2, the reference's recipe): a sparse difference of the primary model learned by MLM
on target-language text over the primary's own vocabulary; or (method lt_sft_vocab, beyond the reference) over the
primary with a target vocabulary's embeddings plugged in (the pipeline's plugged_mlm[/<base>]/<lang>), whose
tokenizer reads the target text: primary_model is whichever model the SFT is learned over, and its hash is the SFT's base. The
output decoder is untied and frozen (the reference's --untie_embeddings --freeze_decoder), so the word embeddings
change sparsely like the rest of the body while the output layer the task models never use stays put.

Each target language is an independent run in <output_dir>/<lang>/ (minimodel/sft/train.py's layout: phase
directories, the mask, and the SFT in sft/); `target_lang=<code>` selects one language of the list (a Slurm array
task). Exit 75 when a stop signal interrupted it (relaunch to resume), 1 when a language failed.

    deepspeed [--num_gpus N] adapt/sft.py primary_model=<export>/primary data_dir=<data> target_langs=[sw] ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from minimodel import distributed
from minimodel.adaptation.artifact import TOKENIZER_DIR
from minimodel.adaptation.plug import PLUG_FILE, plugged_info
from minimodel.adaptation.train import (AdaptConfig, TargetTokenizerConfig, claim_language, prepare_target_data,
                                        run_languages)
from minimodel.config import PerLanguageRun, require
from minimodel.data.mlm import MaskedLMDataset
from minimodel.data.tokenizer import load_tokenizer
from minimodel.hf import load_masked_lm
from minimodel.manifest import model_hash
from minimodel.provenance import finish_output
from minimodel.methods import SPARSE, job_name, parse_method
from minimodel.sft.file import SFT_DIR
from minimodel.sft.train import SFTConfig, check_loop_config, train_sft
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.hf_mlm import MLMFlops, masked_lm_loss, require_positions


@dataclass
class LanguageSFTConfig(PerLanguageRun):
    output_dir: str = "runs/lang_sft"
    # HF masked-LM directory: theta0, and the vocabulary the target text is read in (its tokenizer): the primary
    # (lt_sft), or the primary with target embeddings plugged in (lt_sft_vocab: adapt/plug.py's output)
    primary_model: str | None = None
    method: str = SPARSE  # the pipeline's method these SFTs are filed under (minimodel/methods.py, learns="sft")
    source_lang: str = "en"
    target_langs: list[str] = field(default_factory=lambda: ["sw"])
    target_lang: str | None = None  # one language of target_langs (a Slurm array task); None: all, in turn
    data_dir: str = "data/default"  # the data stage's output (<data_dir>/<lang>/verses.jsonl ...)
    seq_length: int = 128
    mask_prob: float = 0.15
    data_seed: int = 0
    freeze_decoder: bool = True  # untie and freeze the output embeddings (the reference's language SFTs)
    # the reference's language SFTs: L1 in both phases (its 0.1 at gradient accumulation 2: 0.2 per step, see
    # SFTConfig.full_l1); K: 1% of the eligible values unless sft.k is set
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(full_l1=0.2, sparse_l1=0.2))
    train: DeepSpeedLoopConfig = field(default_factory=lambda: DeepSpeedLoopConfig(
        steps=10000, optim=OptimizerConfig(lr=5e-5), schedule=ScheduleConfig(warmup_steps=100)))
    overwrite: bool = False  # a language's directory holding another config's run: discard it (else: an error)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(self.primary_model is not None, "primary_model",
                "is required: the Hugging Face directory of the primary model (e.g. <export>/primary)")
        require_positions(self.seq_length, "seq_length", {"primary_model": self.primary_model})
        method = parse_method(self.method)
        require(method.source.learns == "sft", "method",
                f"{self.method} learns no language SFT: name a sparse method (lt_sft, lt_sft_vocab)")
        require(not method.reads_plugged or (Path(self.primary_model) / PLUG_FILE).is_file(), "primary_model",
                f"{self.primary_model} has no {PLUG_FILE}: method {self.method} learns its SFT over the primary with "
                "target embeddings plugged in by adapt/plug.py (the pipeline's plugged_mlm[/<base>]/<lang>): give "
                "that "
                "directory, or method=lt_sft for an SFT of the primary itself")
        if method.reads_plugged:  # one language's plugged model, of the embeddings the method builds on
            plugged = plugged_info(self.primary_model)
            self.require_language_of("primary_model", f"{self.primary_model} holds the embeddings of",
                                     plugged["target_lang"])
            require(plugged.get("method") in (None, method.builds_on), "primary_model",
                    f"{self.primary_model} holds {plugged.get('method')} embeddings (its {PLUG_FILE}), but method "
                    f"{self.method} builds on {method.builds_on}'s: plug those, or name the method it builds on")
        self.validate_languages()
        check_loop_config(self.train, self.sft)  # now, not after the data is prepared and the model loaded


def untie_and_freeze_decoder(model: nn.Module) -> None:
    """Give the output layer its own frozen copy of the (tied) word embeddings."""
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def train_language(cfg: LanguageSFTConfig, lang: str) -> str:
    """One language's SFT; returns "done" or "interrupted"."""
    distributed.initialize_deepspeed()
    run_dir, lang_cfg, claimed = claim_language(cfg, lang, {"primary_model": cfg.primary_model})
    if claimed == "finished" and (run_dir / SFT_DIR).is_dir():
        return "done"
    # the target text in primary_model's vocabulary (re-encoded when the data stage used another tokenizer)
    data_cfg = AdaptConfig(primary_model=cfg.primary_model, data_dir=cfg.data_dir,
                           tokenizer=TargetTokenizerConfig(mode="reuse", path=cfg.primary_model))
    train_prefix, valid_prefix = distributed.on_rank0(lambda: prepare_target_data(data_cfg, lang, run_dir))
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    model = load_masked_lm(cfg.primary_model)  # refuses a headless or unsupported model (a random head learns nothing)
    if cfg.freeze_decoder:
        untie_and_freeze_decoder(model)
    flops_fn = MLMFlops(model)
    train_data = MaskedLMDataset(train_prefix, tokenizer, cfg.seq_length, cfg.mask_prob, cfg.data_seed)
    valid_data = MaskedLMDataset(valid_prefix, tokenizer, cfg.seq_length, cfg.mask_prob, cfg.data_seed)
    primary_sha = model_hash(cfg.primary_model)
    tags = {"stage": "lang_sft", "method": cfg.method, "source_lang": cfg.source_lang, "target_lang": lang}
    name = f"{job_name('lang_sft', cfg.method, SPARSE)}-{lang}"  # the pipeline stage's
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or name)
    with Tracker.resumable(tracking, run_dir, lang_cfg, tags=tags, resume=claimed == "resume") as tracker:
        result = train_sft(cfg.sft, cfg.train, model, train_data, masked_lm_loss, flops_fn, output_dir=run_dir,
                           base_sha256=primary_sha, base_path=str(Path(cfg.primary_model).resolve()),
                           eval_data=valid_data, tracker=tracker, desc=f"language SFT {lang}",
                           info={"kind": "language", "method": cfg.method, "target_lang": lang,
                                 "source_lang": cfg.source_lang, "lang_sft_run_id": tracker.run_id})
        if result.status == "interrupted":
            tracker.interrupted()
            return "interrupted"

        def finish():
            tracker.log_artifact(result.sft_dir / "sft.json")
            finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())

        distributed.on_rank0(finish)
    return "done"


def run_language_sft(cfg: LanguageSFTConfig) -> StageResult:
    """Every selected language in turn; one failure does not stop the others (adaptation's run_languages)."""
    return run_languages(cfg, train_language, "language SFT")
