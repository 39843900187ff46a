"""Where a pipeline's stages put their outputs: one object owns every path, for the pipeline that writes them and
the report that reads them back (results live on disk; MLflow only shows them).

    <data_dir>/<lang>/{tokenizer,train,valid,verses.jsonl}       data stage
    <root>/config.yaml                                            the pipeline's resolved config
    <root>/plan/settings/<content hash>/<file>                    a Slurm plan's copies of the stages' settings files
    <root>/logs/<stage>.log                                       each stage's output
    <root>/pretrain/checkpoints                                   step 1
    <root>/export/{primary,mini}                                  primary + MiniJoint mini-model (or primary_model:
                                                                  the user's Hugging Face model, used in place)
    <root>/head/mini                                              a headless primary_model with a learned MLM head
    <root>/minipost/mini                                          MiniPost mini-model
    <root>/adapt/<method>/<lang>/                                 step 2 (adapt.json, snapshots/step_N/, metrics.jsonl)
    <root>/adapt/lt_sft/<lang>/sft/                               LT-SFT: the language SFT (the source language's too;
                                                                  bistil@lt_sft: its teachers')
    <root>/plugged_mlm[/<base>]/<lang>/                           BiStil (but @lt_sft), lt_sft_vocab: the
                                                                  primary (masked LM) with the standard adaptation's
                                                                  embeddings (with <base>: that method's, for
                                                                  bistil@<base>, lt_sft_vocab@<base>), phase 1's
                                                                  target teacher / the model lt_sft_vocab's language
                                                                  SFT is learned over
    <root>/adapt/lt_sft_vocab/<lang>/sft/                         lt_sft_vocab: the language SFT of plugged_mlm/<lang>
    <root>/adapt/bistil/<lang>/                                   BiStil phase 1 (train/metrics.jsonl: its compute;
                                                                  student/ with target_tokenizer/, none with one
                                                                  teacher vocabulary; comparison.json)
    <root>/finetune/model                                         step 3: the task model
    <root>/task_sft/model                                         LT-SFT (lt_sft and lt_sft_vocab): the primary +
                                                                  source language SFT + task SFT; bistil@lt_sft's
                                                                  phase-2 teacher
    <root>/plugged/<method>/<lang>/                               the task model with the target embeddings
    <root>/distill_task[/<method>]/<lang>/model/                  BiStil phase 2: the student task model (source
                                                                  tokenizer; target_tokenizer/), metrics.json;
                                                                  <method>: bistil@<base>'s
    <root>/zero_shot/<task>/<method>/                             step 4 (metrics.json, snapshots.json,
                                                                  per_example.json); method
                                                                  none: the unadapted primary (metrics.json)
    <root>/report/                                                report.json, report.md, compute_vs_quality.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STUDENT_TARGET_TOKENIZER = "target_tokenizer"  # a BiStil student's (and student task model's) target tokenizer
# a zero-shot result's per-example scores of its headline metric: {lang: {"final" or snapshot step: {"examples": a
# digest of what was scored, "scores": [...]}}}, so that the report compares two results on the same examples paired
PER_EXAMPLE_FILE = "per_example.json"
TASK_FILE = "task.json"  # a task model's (evaluate/finetune.py): its task, labels, and the primary it was tuned from
STUDENT_VOCABULARY = "vocabulary.json"  # a BiStil student's (and student task model's) id maps, method and languages


@dataclass(frozen=True)
class PipelineLayout:
    root: Path
    data_dir: Path | None = None  # the data stage's output (a reader of results only, like the report, needs none)
    primary_model: Path | None = None  # a given Hugging Face model instead of the exported one

    def data(self, lang: str) -> Path:
        return Path(self.data_dir) / lang

    def tokenizer(self, lang: str) -> Path:
        return self.data(lang) / "tokenizer"

    def dataset(self, lang: str, split: str) -> Path:
        """The indexed dataset prefix (<prefix>.bin/.idx) of a language's split."""
        return self.data(lang) / split

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan_settings(self) -> Path:
        return self.root / "plan" / "settings"

    def word_vectors(self, lang: str) -> Path:
        """OFA's aligned word vectors of (source, lang), learned for the +ofa methods' adaptation to lang."""
        return self.root / "word_vectors" / lang

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def primary(self) -> Path:
        return self.primary_model or self.export / "primary"

    @property
    def head(self) -> Path:
        return self.root / "head"

    @property
    def minipost(self) -> Path:
        return self.root / "minipost"

    def model(self, source: str) -> Path:
        """The model adaptation runs over, per model source of minimodel/methods.py."""
        return {"standard": self.primary, "minijoint": self.export / "mini", "minipost": self.minipost / "mini"}[source]

    def adapt(self, method: str, lang: str | None = None) -> Path:
        """The adaptation stage's output_dir of a method, or with `lang` that language's run directory."""
        out = self.root / "adapt" / method
        return out / lang if lang else out

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def task_model(self) -> Path:
        return self.finetune / "model"

    def language_sft(self, lang: str, method: str = "lt_sft") -> Path:
        """A sparse method's language SFT of `lang` (adapt/sft.py's <output_dir>/<lang>/sft); the source language's,
        which every task SFT is trained with, is lt_sft's."""
        return self.adapt(method, lang) / "sft"

    @property
    def task_sft(self) -> Path:
        """LT-SFT's step 3: the sparse task fine-tuning's output_dir (model/: the composed task model)."""
        return self.root / "task_sft"

    def plugged_mlm(self, lang: str, base: str | None = None) -> Path:
        """The primary masked LM with the target embeddings of the method BiStil and lt_sft_vocab build on (BiStil
        phase 1's teacher of the target language; the model lt_sft_vocab's language SFT is learned over); `base`:
        a Method.base, None for their default (standard adaptation)."""
        return self.root / "plugged_mlm" / (f"{base}/{lang}" if base else lang)

    def student(self, lang: str, method: str = "bistil") -> Path:
        """BiStil phase 1's student for (source, lang) (adapt/distill.py's <output_dir>/<lang>/student)."""
        return self.adapt(method, lang) / "student"

    def distill_task(self, lang: str, method: str = "bistil") -> Path:
        """BiStil phase 2's output_dir for lang's student (method: bistil or a bistil@<base>)."""
        return self.root / "distill_task" / (lang if method == "bistil" else f"{method}/{lang}")

    def student_task_model(self, lang: str, method: str = "bistil") -> Path:
        """BiStil: the student task model of lang (its source tokenizer at the top)."""
        return self.distill_task(lang, method) / "model"

    def student_target_tokenizer(self, lang: str, method: str = "bistil") -> Path:
        return self.student_task_model(lang, method) / STUDENT_TARGET_TOKENIZER

    def plugged(self, method: str, lang: str) -> Path:
        return self.root / "plugged" / method / lang

    def zero_shot(self, task: str, method: str) -> Path:
        return self.root / "zero_shot" / task / method

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
