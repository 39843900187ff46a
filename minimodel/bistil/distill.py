"""BiStil phase 1, general distillation: a small student for (source, target) learns the teacher's hidden states and
attention maps on masked monolingual text of both languages, in the shared DeepSpeed loop.

Teachers. `teacher_model` reads the source language (the primary). For the target language, `target_teacher_model`
is the primary with the target embeddings plugged in (adapt/plug.py: same body, the target's own vocabulary), so the
student can serve a language the primary's vocabulary never covered; unset, `teacher_model` reads both.
Method bistil@lt_sft (the reference's teachers): `teacher_model` reads both languages, with lt_sft's language SFT of
each applied to that language's copy (`teacher_sft`: the source's, `target_teacher_sft`: the target's; adapt/sft.py's
<output_dir>/<lang>/sft); the student starts from the primary without them, as the reference's does.

The student's vocabulary (minimodel/bistil/trim.py): the teacher's tokens frequent in either corpus (one teacher), or
the source block followed by the target's non-special tokens (two teachers: both kept sets, the target's special
tokens mapped to the source's by role). With two teachers the student directory holds the source tokenizer
(loaded by AutoTokenizer) and target_tokenizer/, numbered in the student's ids (StudentVocabulary picks the one a
language is read with), so each language reads its own pieces with a plain Hugging Face tokenizer. In training the student reads the teachers' segmentation (positions must align for the
state losses), a piece the trimming dropped as <unk>; its own tokenizer splits such rare words into kept pieces.

Each micro-batch holds the same number of sequences of each language, and each forward is monolingual. The
teachers are frozen outside the optimiser; the student's MLM head is not trained (phase 1 has no MLM loss).

Output per target language, <output_dir>/<lang>/: source/ and target/ (the corpora in the teachers' vocabularies),
projection.safetensors (narrower students: M [L+1, h, d], M[j] projects teacher state j), train/ (the loop's
checkpoints and metrics.jsonl), student/ (a plain Hugging Face model directory with its tokenizer(s) and
vocabulary.json), comparison.json (student beside teacher: held-out verse retrieval, parameters, FLOPs per token,
measured tokens/s; minimodel/bistil/compare.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM

from minimodel import distributed
from minimodel.adaptation.artifact import TOKENIZER_DIR
from minimodel.adaptation.plug import plugged_info
from minimodel.adaptation.train import (AdaptConfig, TargetTokenizerConfig, claim_language, prepare_target_data,
                                        run_languages)
from minimodel.bistil.compare import Reader, compare
from minimodel.bistil.loss import DistillationWeights, distillation_loss, state_projection
from minimodel.bistil.student import StudentConfig, build_student
from minimodel.bistil.trim import install_rows, kept_ids, token_counts, trim_tokenizer
from minimodel.config import PerLanguageRun, require
from minimodel.data.mlm import MaskedLMDataset
from minimodel.errors import UserError
from minimodel.evaluation.tasks import TaskConfig, read_verses
from minimodel.files import replace_dir, write_text_atomic
from minimodel.hf import load_model, load_tokenizer
from minimodel.layout import STUDENT_TARGET_TOKENIZER, STUDENT_VOCABULARY
from minimodel.manifest import model_hash
from minimodel.methods import DISTILLED, SPARSE, job_name, parse_method_of
from minimodel.provenance import finish_output
from minimodel.sft.file import MANIFEST_FILE as SFT_MANIFEST
from minimodel.sft.file import SparseFineTuning, read_sft_manifest
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.deepspeed_loop import gather_full_params, release_engine, train
from minimodel.training.hf_mlm import MLMFlops, check_architecture, require_positions

log = logging.getLogger(__name__)

VOCABULARY_FILE = STUDENT_VOCABULARY
TARGET_TOKENIZER_DIR = STUDENT_TARGET_TOKENIZER
PROJECTION_FILE = "projection.safetensors"
COMPARISON_FILE = "comparison.json"
SPECIAL_ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")


@dataclass
class DistillConfig(PerLanguageRun):
    output_dir: str = "runs/distill"
    method: str = DISTILLED  # its name in results and runs: bistil, or bistil@<base> (minimodel/methods.py)
    teacher_model: str | None = None  # HF masked-LM directory reading the source language (the primary)
    target_teacher_model: str | None = None  # the plugged primary (adapt/plug.py output); None: teacher_model
    teacher_sft: str | None = None  # bistil@lt_sft: the source language's SFT of teacher_model, applied to it
    target_teacher_sft: str | None = None  # bistil@lt_sft: the target language's SFT of teacher_model (its copy)
    source_lang: str = "en"
    target_langs: list[str] = field(default_factory=lambda: ["sw"])
    target_lang: str | None = None  # one language of target_langs (a Slurm array task); None: all, in turn
    data_dir: str = "data/default"
    seq_length: int = 128
    mask_prob: float = 0.15
    data_seed: int = 0
    vocab_threshold: float = 1e-6  # keep a token whose relative frequency in either corpus reaches this
    projection_tokens: int = 4096  # teacher states (first tokens of the corpora) each state's M[j] is fitted on
    compare_texts: int = 256  # held-out target verses the student's and teacher's throughput are measured on
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: DistillationWeights = field(default_factory=DistillationWeights)
    train: DeepSpeedLoopConfig = field(default_factory=lambda: DeepSpeedLoopConfig(
        steps=20000, optim=OptimizerConfig(lr=1e-4), schedule=ScheduleConfig(warmup_steps=500)))
    overwrite: bool = False  # a language's directory holding another config's run: discard it (else: an error)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(self.teacher_model is not None, "teacher_model",
                "is required: the Hugging Face directory of the primary model (e.g. <export>/primary)")
        method = parse_method_of(self.method, DISTILLED)
        self.validate_languages()
        require_positions(self.seq_length, "seq_length", {"teacher_model": self.teacher_model,
                                                          "target_teacher_model": self.target_teacher_model})
        if method.builds_on_sfts:
            self._validate_teacher_sfts()
        else:
            self._validate_target_teacher(method)
        require(0 <= self.vocab_threshold < 1, "vocab_threshold", "must be in [0, 1)")
        require(self.source_lang not in self.target_langs, "target_langs",
                f"lists the source language {self.source_lang!r}: a student is for (source, target) pairs")
        require(self.loss.soft_ce == 0 and self.loss.gold == 0, "loss.soft_ce",
                "phase 1 has no task logits or labels to match: set loss.soft_ce and loss.gold to 0")
        require(self.train.zero_stage() <= 2, "train.zero_config",
                f"{self.train.zero_config} is ZeRO stage 3: phase 1 runs at stages 0-2 (configs/deepspeed/"
                "zero2.json), where every rank holds the whole student its teachers' states are matched on and saved")
        self.student.validate()

    def _validate_target_teacher(self, method) -> None:
        """Results are filed under the method: its target teacher must hold the embeddings the method builds on."""
        for key in ("teacher_sft", "target_teacher_sft"):
            require(getattr(self, key) is None, key, f"language SFTs on the teachers are method {DISTILLED}@{SPARSE}'s "
                    f"(its results are filed under it): set method={DISTILLED}@{SPARSE}, or drop {key}")
        plugged = plugged_info(self.target_teacher_model) if self.target_teacher_model else None
        require(plugged is not None or method.base is None, "target_teacher_model",
                f"method {self.method} distils from the primary with {method.builds_on} adaptation's target "
                f"embeddings plugged in: give that directory (adapt/plug.py; the pipeline's plugged_mlm/"
                f"{method.base}/<lang>)")
        require(plugged is None or plugged.get("method") in (None, method.builds_on), "target_teacher_model",
                f"{self.target_teacher_model} holds {(plugged or {}).get('method')} embeddings (its plug.json), but "
                f"method {self.method} builds on {method.builds_on}'s: plug those, or name the method it builds on")
        if plugged is None:
            return
        self.require_language_of("target_teacher_model", f"{self.target_teacher_model} holds the embeddings of",
                                 plugged.get("target_lang"))
        primary = plugged.get("primary_model")
        if primary and (Path(self.teacher_model) / "config.json").is_file():  # refused now, not after data prep
            require(primary["sha256"] == model_hash(self.teacher_model), "target_teacher_model",
                    f"{self.target_teacher_model} is {primary.get('path')} with embeddings plugged in, not "
                    f"teacher_model {self.teacher_model}: plug the target embeddings into that primary")

    def _validate_teacher_sfts(self) -> None:
        """bistil@lt_sft: lt_sft's language SFT of the source language and of each selected target language."""
        require(self.target_teacher_model is None, "target_teacher_model",
                f"method {self.method}: the primary (teacher_model) reads both languages, each with its SFT applied; "
                "drop target_teacher_model")
        for key, langs in (("teacher_sft", [self.source_lang]), ("target_teacher_sft", self.languages())):
            path = getattr(self, key)
            require(path is not None, key, f"is required by method {self.method}: lt_sft's language SFT of "
                    f"{'the source language' if key == 'teacher_sft' else 'the target language'} (adapt/sft.py's "
                    "<output_dir>/<lang>/sft)")
            manifest = read_sft_manifest(path) or {}
            info = manifest.get("info", {})
            require(info.get("kind") == "language", key,
                    f"{path} is not a language SFT (no {SFT_MANIFEST} of kind language): give adapt/sft.py's "
                    "<output_dir>/<lang>/sft")
            self.require_language_of(key, f"{path} is the language SFT of", info.get("target_lang"), langs)
            require(info.get("method") == SPARSE, key, f"{path} was learned by method {info.get('method')}, over "
                    f"another model than the primary: give {SPARSE}'s")
            base = manifest["base_model"]
            if (Path(self.teacher_model) / "config.json").is_file():  # refused here, not after the data is prepared
                require(base["sha256"] == model_hash(self.teacher_model), key, f"{path} was learned from "
                        f"{base.get('path') or 'another model'} (sha256 {base['sha256']}), not from teacher_model "
                        f"{self.teacher_model}: give the language SFTs of that primary")


class StudentVocabulary:
    """The tokenizer each language of a student directory is read with (both give student ids)."""

    def __init__(self, student_dir: str | Path):
        self.dir = Path(student_dir)
        spec = json.loads((self.dir / VOCABULARY_FILE).read_text())
        self.tokenizer_dirs = {lang: self.dir / sub for lang, sub in spec["tokenizer"].items()}

    def tokenizer(self, lang: str):
        return load_tokenizer(self.tokenizer_dirs[lang])


def _special_ids_by_role(tokenizer) -> dict[str, int]:
    return {role: tokenizer.convert_tokens_to_ids(getattr(tokenizer, role)) for role in SPECIAL_ROLES
            if getattr(tokenizer, role, None) is not None}


def build_vocabulary(cfg: DistillConfig, lang: str, sources: dict[str, tuple[Path, Path]], student_dir: Path) -> dict:
    """Trim the teachers' tokenizers into `student_dir`. `sources`: {language: (its teacher's tokenizer directory,
    its corpus' dataset prefix)}. Returns {"to_student": {language: teacher id -> student id}, "rows": {language:
    the teacher ids of its block of the student's vocabulary}, "tokenizer": {language: subdirectory}}. Rank 0."""
    src = cfg.source_lang
    tokenizers = {k: load_tokenizer(tok_dir) for k, (tok_dir, _) in sources.items()}
    counts = {k: token_counts(prefix, len(tokenizers[k])) for k, (_, prefix) in sources.items()}
    source_unk = tokenizers[src].unk_token_id
    if cfg.target_teacher_model is None:  # one vocabulary reads both
        kept = kept_ids([counts[src], counts[lang]], tokenizers[src].all_special_ids, cfg.vocab_threshold)
        rows = trim_tokenizer(sources[src][0], kept, student_dir)
        ids = _positions(rows, len(tokenizers[src]))
        ids[ids < 0] = ids[source_unk]  # dropped rare tokens read as <unk>
        return {"to_student": {src: ids.tolist(), lang: ids.tolist()}, "rows": {src: rows.tolist(), lang: []},
                "tokenizer": {src: ".", lang: "."}}
    src_rows = trim_tokenizer(sources[src][0], kept_ids([counts[src]], tokenizers[src].all_special_ids,
                                                        cfg.vocab_threshold), student_dir)
    src_ids = _positions(src_rows, len(tokenizers[src]))
    src_ids[src_ids < 0] = src_ids[source_unk]
    src_roles = _special_ids_by_role(tokenizers[src])
    # the target's special tokens are the source's of the same role (one without a counterpart is dropped)
    specials = {tid: int(src_ids[src_roles[role]]) for role, tid in _special_ids_by_role(tokenizers[lang]).items()
                if role in src_roles}

    def target_block(rows: np.ndarray) -> dict[int, int]:  # the target's kept ids -> student ids
        plain = [int(o) for o in rows if o not in specials]
        return {**{o: len(src_rows) + n for n, o in enumerate(plain)}, **{int(o): specials[o] for o in rows
                                                                          if o in specials}}

    tgt_kept = kept_ids([counts[lang]], list(specials), cfg.vocab_threshold)
    tgt_kept = tgt_kept[~np.isin(tgt_kept, list(set(tokenizers[lang].all_special_ids) - set(specials)))]
    tgt_rows = trim_tokenizer(sources[lang][0], tgt_kept, student_dir / TARGET_TOKENIZER_DIR, renumber=target_block)
    tgt_ids = np.full(len(tokenizers[lang]), src_ids[source_unk], dtype=np.int64)  # dropped rare tokens: <unk>
    for old, new in target_block(tgt_rows).items():
        tgt_ids[old] = new
    return {"to_student": {src: src_ids.tolist(), lang: tgt_ids.tolist()},
            "rows": {src: src_rows.tolist(), lang: [int(o) for o in tgt_rows if o not in specials]},
            "tokenizer": {src: ".", lang: TARGET_TOKENIZER_DIR}}


def _positions(rows: np.ndarray, size: int) -> np.ndarray:
    """old id -> its position in `rows` (the old ids of a block, ascending); -1 where absent."""
    out = np.full(size, -1, dtype=np.int64)
    out[rows] = np.arange(len(rows))
    return out


def teacher_for_student(source_teacher: str, teachers: dict[str, torch.nn.Module], vocab: dict):
    """A copy of the source teacher with the student's vocabulary: the source teacher's rows of the source block,
    then the target teacher's rows of the target block (init=teacher / init=svd start the student from it)."""
    model = load_model(source_teacher, AutoModelForMaskedLM)
    install_rows(model, [(teachers[lang], np.asarray(rows)) for lang, rows in vocab["rows"].items() if rows],
                 model.config.pad_token_id)
    return model


class BilingualMLM(torch.utils.data.Dataset):
    """item i: sequence i of each language (cycled), masked, in teacher ids and in student ids."""

    def __init__(self, data: dict[str, MaskedLMDataset], to_student: dict[str, np.ndarray]):
        self.data, self.to_student = data, to_student

    def __len__(self) -> int:
        return max(len(d) for d in self.data.values())

    def for_epoch(self, epoch: int) -> BilingualMLM:
        """Each language masked as epoch `epoch` masks it (see MaskedLMDataset.for_epoch)."""
        return BilingualMLM({lang: d.for_epoch(epoch) for lang, d in self.data.items()}, self.to_student)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = {}
        for lang, data in self.data.items():
            x = data[i % len(data)]
            item[f"{lang}/teacher_ids"] = x["input_ids"]
            item[f"{lang}/student_ids"] = self.to_student[lang][x["input_ids"]]
            item[f"{lang}/attention_mask"] = x["attention_mask"]
        return item


class DistillStep:
    """(student, batch) -> the mean over the two languages of the distillation loss, and its FLOPs."""

    def __init__(self, teachers: dict[str, torch.nn.Module], ratio: int, weights: DistillationWeights,
                 projections: torch.Tensor | None, student):
        device = distributed.device()  # the teachers run frozen beside the engine's student, on its device
        self.teachers = {lang: t.to(device) for lang, t in teachers.items()}
        self.projections = None if projections is None else projections.to(device)
        self.ratio, self.weights = ratio, weights
        self.student_flops, self.teacher_flops = MLMFlops(student), {k: MLMFlops(t) for k, t in teachers.items()}

    def loss(self, student, batch) -> torch.Tensor:
        terms = []
        for lang, teacher in self.teachers.items():
            mask = batch[f"{lang}/attention_mask"]
            with torch.no_grad():
                t = teacher.base_model(input_ids=batch[f"{lang}/teacher_ids"], attention_mask=mask,
                                       output_hidden_states=True, output_attentions=True)
            s = student.base_model(input_ids=batch[f"{lang}/student_ids"], attention_mask=mask,
                                   output_hidden_states=True, output_attentions=True)
            terms.append(distillation_loss(s, t, mask, self.ratio, self.weights, self.projections))
        return torch.stack(terms).mean()

    def flops(self, batch) -> float:
        total = 0.0
        for lang in self.teachers:
            n, s = batch[f"{lang}/student_ids"].shape
            total += self.student_flops.per_batch(n, s, 0) + self.teacher_flops[lang].per_batch(n, s, 0)
        return total

    def tokens(self, batch) -> int:
        return int(sum(batch[f"{lang}/attention_mask"].sum() for lang in self.teachers))


def fit_projections(teachers: dict[str, torch.nn.Module], data: dict[str, MaskedLMDataset], tokens: int,
                    d: int) -> torch.Tensor:
    """M [L+1, h, d]: M[j] from teacher state j alone (0: the embeddings' output; the reference's per-layer
    mappings), on the first sequences of both corpora (about `tokens` states of each)."""
    n_states = next(iter(teachers.values())).config.num_hidden_layers + 1  # the teachers share one architecture
    states: list[list[torch.Tensor]] = [[] for _ in range(n_states)]
    for lang, teacher in teachers.items():
        taken, i = 0, 0
        while taken < tokens // len(teachers) and i < len(data[lang]):
            x = data[lang][i]
            ids, mask = torch.as_tensor(x["input_ids"])[None], torch.as_tensor(x["attention_mask"])[None]
            with torch.no_grad():
                out = teacher.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            for j, h in enumerate(out.hidden_states):
                states[j].append(h[mask.bool()])
            taken, i = taken + int(mask.sum()), i + 1
    n = sum(len(h) for h in states[0])
    if n < d:  # each state's SVD alone: fewer token vectors than d give fewer than d singular vectors
        raise UserError(f"projection_tokens: {n} teacher token states fit M, fewer than the student's width {d}: "
                        f"raise projection_tokens to at least {d}")
    return torch.stack([state_projection(torch.cat(s), d) for s in states])


def load_projections(path: Path, teacher_config, d: int) -> torch.Tensor:
    """Phase 1's M [L+1, h, d] for this teacher; an older run's single M [h, d] (fitted on every layer's states
    pooled) is refused rather than applied to every state."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: phase 1 writes its projections of the teacher's states beside the "
                        "student directory; give the student where phase 1 wrote it (<output_dir>/<lang>/student)")
    m = load_file(str(path))["M"]
    expected = (teacher_config.num_hidden_layers + 1, teacher_config.hidden_size, d)
    if tuple(m.shape) != expected:
        raise UserError(f"{path}: M is {tuple(m.shape)}, not one projection per teacher state {expected} (an older "
                        f"phase 1 fitted one M on every state pooled): delete {path.parent} and rerun adapt/distill.py "
                        "for its language")
    return m


def load_teachers_and_student(cfg: DistillConfig, paths: dict[str, str], vocab: dict):
    """({language: its frozen teacher, from `paths`; bistil@lt_sft: with that language's SFT applied}, the student
    as initialised from the source teacher with the student's vocabulary, before any SFT: the reference's start)."""
    teachers = {code: load_model(p, AutoModelForMaskedLM, attn_implementation="eager").eval().requires_grad_(False)
                for code, p in paths.items()}
    for code, teacher in teachers.items():
        check_architecture(teacher, paths[code])  # seq_length fits its positions: DistillConfig.validate
    student = build_student(teacher_for_student(cfg.teacher_model, teachers, vocab), cfg.student)
    target_lang = next(code for code in paths if code != cfg.source_lang)
    for code, sft in ((cfg.source_lang, cfg.teacher_sft), (target_lang, cfg.target_teacher_sft)):
        if sft:
            SparseFineTuning.load(sft).apply(teachers[code], model_hash(paths[code]), with_abs=False,
                                             what=paths[code])
    return teachers, student


def claim_student(cfg: DistillConfig, lang: str):
    """claim_language of one student: it depends on the source language's data too (phase 1 trains on both)."""
    teachers = {"teacher_model": cfg.teacher_model, "target_teacher_model": cfg.target_teacher_model}
    return claim_language(cfg, lang, {k: v for k, v in teachers.items() if v}, reads=(cfg.source_lang, lang))


def distill_language(cfg: DistillConfig, lang: str) -> str:
    """Distil one (source, lang) student; returns "done" or "interrupted" (run the same command to resume)."""
    distributed.initialize_deepspeed()
    run_dir, lang_cfg, claimed = claim_student(cfg, lang)
    if claimed == "finished" and (run_dir / "student" / VOCABULARY_FILE).is_file():
        return "done"
    paths = {cfg.source_lang: cfg.teacher_model, lang: cfg.target_teacher_model or cfg.teacher_model}

    def prepare():  # rank 0: each corpus in its teacher's vocabulary, then the student's vocabulary
        sources = {}
        for code, path in paths.items():
            data_cfg = AdaptConfig(primary_model=path, data_dir=cfg.data_dir,
                                   tokenizer=TargetTokenizerConfig(mode="reuse", path=path))
            train_prefix, _ = prepare_target_data(data_cfg, code, run_dir / code)
            sources[code] = (run_dir / code / TOKENIZER_DIR, train_prefix)
        vocab_dir = run_dir / "vocabulary"
        if not (vocab_dir / VOCABULARY_FILE).is_file():
            tmp = run_dir / ".vocabulary.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            vocab = build_vocabulary(cfg, lang, sources, tmp)
            write_text_atomic(tmp / VOCABULARY_FILE, json.dumps(vocab))
            replace_dir(tmp, vocab_dir)
        return {code: str(prefix) for code, (_, prefix) in sources.items()}

    prefixes = distributed.on_rank0(prepare)
    vocab = json.loads((run_dir / "vocabulary" / VOCABULARY_FILE).read_text())
    teachers, student = load_teachers_and_student(cfg, paths, vocab)
    tokenizers = {code: load_tokenizer(run_dir / code / TOKENIZER_DIR) for code in paths}  # the teachers' own
    to_student = {k: np.asarray(v, dtype=np.int64) for k, v in vocab["to_student"].items()}
    # a masked token's random replacement is one the student has too: teacher and student read the same text
    kept = {code: np.flatnonzero(to_student[code] != to_student[code][tokenizers[code].unk_token_id])
            for code in paths}
    data = {code: MaskedLMDataset(prefixes[code], tokenizers[code], cfg.seq_length, cfg.mask_prob, cfg.data_seed,
                                  replacement_ids=kept[code]) for code in paths}
    student.requires_grad_(True)
    for name, p in student.named_parameters():  # phase 1 has no MLM loss: the head stays as initialised
        if not name.startswith(student.base_model_prefix + "."):
            p.requires_grad_(False)
    # no optimizer keeps an fp32 copy of the frozen head, and bf16 training casts the module in place
    frozen = {name: p.detach().float().cpu().clone() for name, p in student.named_parameters() if not p.requires_grad}
    projections = None
    teacher_config = teachers[cfg.source_lang].config
    if student.config.hidden_size < teacher_config.hidden_size:
        proj_file = run_dir / PROJECTION_FILE

        def fit():  # rank 0; its error (too few tokens) reaches every rank instead of leaving them in a barrier
            if not proj_file.is_file():
                m = fit_projections(teachers, data, cfg.projection_tokens, student.config.hidden_size)
                save_file({"M": m.contiguous()}, str(run_dir / f".{PROJECTION_FILE}.partial"))
                (run_dir / f".{PROJECTION_FILE}.partial").replace(proj_file)

        distributed.on_rank0(fit)
        projections = load_projections(proj_file, teacher_config, student.config.hidden_size)
    step = DistillStep(teachers, cfg.student.layer_ratio, cfg.loss, projections, student)
    tags = {"stage": "distill", "method": cfg.method, "source_lang": cfg.source_lang, "target_lang": lang}
    name = f"{job_name('distill', cfg.method, DISTILLED)}-{lang}"  # the pipeline stage's
    tracking = dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or name)
    with Tracker.resumable(tracking, run_dir, lang_cfg, tags=tags, resume=claimed == "resume") as tracker:
        result = train(cfg.train, student, BilingualMLM(data, to_student), step.loss, step.flops,
                       output_dir=run_dir / "train", tracker=tracker, tokens_fn=step.tokens,
                       desc=f"distill {cfg.source_lang}+{lang}")
        if result.interrupted:
            release_engine(result.engine)
            tracker.interrupted(result.step)
            return "interrupted"
        trained = {name: p for name, p in student.named_parameters() if p.requires_grad}
        final = {**frozen, **gather_full_params(result.engine, trained)}
        release_engine(result.engine)

        def save():  # rank 0; its error reaches every rank instead of leaving them in a barrier
            _save_student(student, final, run_dir, vocab, cfg, lang)
            comparison = _compare(cfg, lang, teachers, tokenizers, run_dir / "student")
            write_text_atomic(run_dir / COMPARISON_FILE, json.dumps(comparison, indent=2))
            tracker.log_metrics({f"compare/{who}/{k}": v for who, row in comparison.items() for k, v in row.items()},
                                step=result.step)
            finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())

        distributed.on_rank0(save)
    return "done"


def _save_student(student, final: dict[str, torch.Tensor], run_dir: Path, vocab: dict, cfg: DistillConfig,
                  lang: str) -> None:
    """The student with `final`'s fp32 values (bf16 training left the module in bf16), and its vocabulary."""
    student.float()
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(final[name])
    tmp = run_dir / ".student.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "vocabulary", tmp)
    student.save_pretrained(tmp)
    spec = {**json.loads((tmp / VOCABULARY_FILE).read_text()), "source_lang": cfg.source_lang, "target_lang": lang,
            "method": cfg.method, "teacher_model": cfg.teacher_model, "teacher_sha256": model_hash(cfg.teacher_model),
            "target_teacher_model": cfg.target_teacher_model,
            **{key: str(Path(path).resolve()) if path else None  # phase 2 checks its teacher against teacher_sft
               for key, path in (("teacher_sft", cfg.teacher_sft), ("target_teacher_sft", cfg.target_teacher_sft))}}
    write_text_atomic(tmp / VOCABULARY_FILE, json.dumps(spec))
    replace_dir(tmp, run_dir / "student")


def _compare(cfg: DistillConfig, lang: str, teachers: dict, tokenizers: dict, student_dir: Path) -> dict:
    """The student beside its teachers on held-out verse retrieval (lang -> source), size and speed (timed with the
    teachers' attention implementation: a student left at the library's default, sdpa, timed faster by that)."""
    vocab = StudentVocabulary(student_dir)
    student = load_model(student_dir, AutoModelForMaskedLM,
                         attn_implementation=teachers[cfg.source_lang].config._attn_implementation)
    readers = {"teacher": Reader(teachers[cfg.source_lang], tokenizers[cfg.source_lang], teachers[lang],
                                 tokenizers[lang]),
               "student": Reader(student, vocab.tokenizer(cfg.source_lang), student, vocab.tokenizer(lang))}
    task = TaskConfig(name="verse_retrieval", data_dir=cfg.data_dir, max_length=cfg.seq_length)
    texts = [v["text"] for v in read_verses(cfg.data_dir, lang) if v["split"] == "valid"][:cfg.compare_texts]
    result = compare(task, readers, cfg.source_lang, lang, "test", cfg.train.micro_batch_size, cfg.seq_length, texts)
    log.info("%s: student %s", lang, ", ".join(f"{k} {v:.4g} (teacher {result['teacher'][k]:.4g})"
                                               for k, v in result["student"].items()))
    return result


def run_distill(cfg: DistillConfig) -> StageResult:
    """Every selected target language in turn (adaptation's run_languages)."""
    return run_languages(cfg, distill_language, "distillation")
