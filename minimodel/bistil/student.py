"""BiStil step 2: the student, a smaller model of the teacher's class.

L / r layers (`layer_ratio` r), hidden and FFN sizes / h (`hidden_ratio` h), the teacher's attention heads, no
dropout. Initialisation (`init`):
- `teacher`: every teacher weight outside its layers (embeddings, head, a final LayerNorm, a relative position
  table), and the layers of `layer_map`: `regular` takes teacher layer (i+1)r-1
  for student layer i (spread over the depth, the reference's map), `bottom` the first L/r layers (exactly the
  MiniJoint / MiniPost mini-model's layers: those students start aligned). Needs h = 1.
- `svd`: with h > 1 only the word embeddings can come from the teacher: its (trimmed) embedding matrix projected on
  its top-d right singular vectors (E V_d = U_d S_d, the rank-d approximation in d coordinates, at the teacher's
  scale; `svd_scale: unit` starts from U_d alone, as the reference's released code does); everything else random.
- `random`: nothing from the teacher.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from minimodel.config import require


@dataclass
class StudentConfig:
    layer_ratio: int = 2  # r: the student has L / r layers
    hidden_ratio: int = 1  # h: hidden and FFN sizes / h (the reference: 1, or 2 for "6 layers, 384 dims")
    init: Literal["teacher", "svd", "random"] = "teacher"
    layer_map: Literal["regular", "bottom"] = "regular"  # which teacher layers init=teacher copies
    svd_scale: Literal["teacher", "unit"] = "teacher"  # init=svd: U_d S_d (the teacher's scale) or U_d (the reference)
    seed: int = 0

    def validate(self) -> None:
        require(self.layer_ratio >= 1, "student.layer_ratio", f"{self.layer_ratio} must be >= 1")
        require(self.hidden_ratio >= 1, "student.hidden_ratio", f"{self.hidden_ratio} must be >= 1")
        require(self.init != "teacher" or self.hidden_ratio == 1, "student.init",
                f"teacher copies the teacher's layers, which needs student.hidden_ratio=1 (got "
                f"{self.hidden_ratio}): use init=svd to start a narrower student from the teacher's embeddings")
        require(self.svd_scale == "teacher" or self.init == "svd", "student.svd_scale",
                f"scales init=svd's embeddings; student.init is {self.init}")


def teacher_layers(teacher_layers_n: int, cfg: StudentConfig) -> list[int]:
    """The teacher layer each student layer copies (init=teacher) under cfg.layer_map."""
    n = teacher_layers_n // cfg.layer_ratio
    if cfg.layer_map == "bottom":
        return list(range(n))
    return [(i + 1) * cfg.layer_ratio - 1 for i in range(n)]


def student_config(teacher_config, cfg: StudentConfig):
    """The teacher's config with L / r layers, sizes / h, no dropout, and attention maps the losses can read."""
    config = copy.deepcopy(teacher_config)
    layers, hidden = teacher_config.num_hidden_layers, teacher_config.hidden_size
    require(layers % cfg.layer_ratio == 0, "student.layer_ratio",
            f"{cfg.layer_ratio} does not divide the teacher's {layers} layers")
    require(hidden % cfg.hidden_ratio == 0 and (hidden // cfg.hidden_ratio) % teacher_config.num_attention_heads == 0,
            "student.hidden_ratio", f"{cfg.hidden_ratio}: hidden size {hidden} / h must be a multiple of the "
            f"{teacher_config.num_attention_heads} attention heads")
    config.num_hidden_layers = layers // cfg.layer_ratio
    config.hidden_size = hidden // cfg.hidden_ratio
    config.intermediate_size = teacher_config.intermediate_size // cfg.hidden_ratio
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config._attn_implementation = "eager"  # attention probabilities as outputs (the attention loss)
    return config


def embedding_projection(weight: torch.Tensor, d: int, unit: bool = False) -> torch.Tensor:
    """E V_d = U_d S_d: each row of E [V, h] in the coordinates of E's top-d right singular vectors; `unit`: U_d,
    the same directions with each coordinate divided by its singular value (orthonormal columns)."""
    u, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return (u[:, :d] if unit else weight.detach().double() @ vh[:d].T).to(weight.dtype)


def build_student(teacher: nn.Module, cfg: StudentConfig) -> nn.Module:
    """A student of the teacher's class (e.g. XLMRobertaForMaskedLM), initialised as cfg.init says."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    student = type(teacher)(student_config(teacher.config, cfg))
    if cfg.init == "teacher":
        # everything but the layers, whatever else the family keeps beside them (embeddings, head, MegatronBERT's
        # final LayerNorm, DeBERTa-v2's relative position table): the student differs from the teacher in depth only
        layers = f"{teacher.base_model_prefix}.encoder.layer."
        missing, _ = student.load_state_dict({k: v for k, v in teacher.state_dict().items()
                                              if not k.startswith(layers)}, strict=False)
        if outside := [k for k in missing if not k.startswith(layers)]:
            raise ValueError(f"{type(teacher).__name__}: init=teacher could not copy {outside[:3]} from the teacher")
        for i, j in enumerate(teacher_layers(teacher.config.num_hidden_layers, cfg)):
            student.base_model.encoder.layer[i].load_state_dict(teacher.base_model.encoder.layer[j].state_dict())
    elif cfg.init == "svd":
        with torch.no_grad():
            student.get_input_embeddings().weight.copy_(
                embedding_projection(teacher.get_input_embeddings().weight, student.config.hidden_size,
                                     unit=cfg.svd_scale == "unit"))
    student.tie_weights()
    return student
