"""MiniJoint: a pre-LayerNorm BERT/RoBERTa-style masked LM with a secondary MLM head after layer m.

    tokens -> word + position embeddings -> layers 1..m -> ... -> layers m+1..L -> main MLM head -> main loss
                                                  \\-> secondary MLM head -> secondary loss
    loss = main + aux_weight * secondary

The mini-model is the embeddings, layers 1..m and the secondary head. Each MLM head is
final LayerNorm -> dense -> gelu -> LayerNorm -> projection onto the (tensor-parallel, padded) vocabulary, and is
applied only at the masked positions (labels != -100): no full-sequence vocabulary projection.

Output embeddings: the main head's projection is tied to the input word embeddings (like BERT/RoBERTa). With
`share_aux_output_embedding` (the default) the secondary head uses the same matrix, so the embeddings that
adaptation learns through the mini-model are exactly the primary model's input and output embeddings; without it
the secondary head has its own projection.

The secondary head (`ModelConfig.secondary_head`) is either its own module (separate), the main head itself
(shared_transform), or absent (none: plain MLM). It sits on whichever pipeline stage holds layer m. A forward hook
on that layer computes the secondary loss from the layer's output and injects its gradient into the backward pass
(`_AddLossGradient`), scaled like the main loss (`aux_weight * loss_scale / num_microbatches`).

Tied weights across pipeline stages, megatron's way (its word-embedding / output-layer tie): a chunk that needs a
tied matrix it does not own holds a copy; every copy is set to the owner's value once at build time and the
gradients of all copies are summed, so every copy takes the same update. Two tied sets exist:
  - the word embeddings (owner: the first stage's input embedding): copies in the last stage's main head and, if
    it projects with them, in the secondary head on another stage; summed over megatron's embedding group
    (extended to the secondary head's stage);
  - with shared_transform, the main head's parameters (owner: the last stage): a copy on the secondary head's
    chunk if that is not the last one; summed over distributed.output_head_group() (the last stage and the
    secondary head's stage).
Copies are tagged `shared` (counted once in the gradient norm) and, like their owners, `shared_embedding` (each in
its own DDP bucket, so the distributed optimizer shards owner and copies alike), and are checkpointed as replicas
of the owner's key: checkpoints do not depend on the layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.bert.bert_layer_specs import HAVE_TE, get_bert_layer_with_transformer_engine_spec
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
from torch import Tensor

from minimodel.models.minijoint.config import ModelConfig

IGNORE_INDEX = -100  # labels at positions that are not predicted


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron's norm-constructor signature.

    Inside the transformer layers, under sequence parallelism, each TP rank normalises its own slice of the
    sequence, so the parameters are tagged `sequence_parallel` and megatron sums their gradients over TP.
    The MLM heads run on gathered (replicated) hidden states and pass `replicated_input=True`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, replicated_input: bool = False):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel and not replicated_input)


def layer_spec():
    """Transformer Engine layer spec when TE is importable (GPU clusters), else megatron's local modules."""
    if HAVE_TE:
        return get_bert_layer_with_transformer_engine_spec()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as in the TE spec (norms fused into the following linear), so checkpoints move
            # between the two specs.
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


class _AddLossGradient(torch.autograd.Function):
    """Returns `hidden` unchanged; in backward also back-propagates `loss` (with gradient 1).

    This lets a loss computed in the middle of a pipeline stage join the stage's single backward pass.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        return hidden

    @staticmethod
    def backward(ctx, grad: Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class MaskedLMHead(MegatronModule):
    """final LayerNorm -> dense -> gelu -> LayerNorm -> vocab-parallel projection, at masked positions."""

    # Parameters a shared_transform secondary head takes from the main head (the projection weight is the tied
    # word embedding, handled with the embeddings).
    TIED_PARAMETERS = ("final_layernorm.weight", "final_layernorm.bias", "dense.weight", "dense.bias",
                       "layer_norm.weight", "layer_norm.bias", "output_layer.bias")

    def __init__(self, config, vocab_size: int, own_output_weight: bool, used_vocab_size: int):
        super().__init__(config=config)
        # this TP rank's first column of padding rows (past used_vocab_size: no token's, there for the TP split)
        first = parallel_state.get_tensor_model_parallel_rank() * (vocab_size // config.tensor_model_parallel_size)
        self.padding_from = max(0, used_vocab_size - first)
        h = config.hidden_size
        self.final_layernorm = LayerNorm(config, h, config.layernorm_epsilon, replicated_input=True)
        self.dense = torch.nn.Linear(h, h, dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.dense.weight)
            torch.nn.init.zeros_(self.dense.bias)
        self.layer_norm = LayerNorm(config, h, config.layernorm_epsilon, replicated_input=True)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            h, vocab_size, config=config, init_method=config.init_method, bias=True, skip_bias_add=False,
            gather_output=False, skip_weight_param_allocation=not own_output_weight)
        # The projection's input is already gathered over the sequence (see `select`).
        self.output_layer.sequence_parallel = False

    def select(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """hidden [s(/tp), b, h], labels [b, s] -> hidden states [n, h] and targets [n] at masked positions."""
        if self.config.sequence_parallel:
            # Every TP rank runs the head on all masked positions; backward keeps each rank's own slice.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        labels = labels.t()
        selected = labels != IGNORE_INDEX
        return hidden[selected], labels[selected]

    def logits(self, hidden: Tensor, output_weight: Tensor | None) -> Tensor:
        """[n, h] -> vocabulary logits [n, padded_vocab / tp] (this TP rank's slice)."""
        x = self.layer_norm(F.gelu(self.dense(self.final_layernorm(hidden))))
        logits, _ = self.output_layer(x.unsqueeze(1), weight=output_weight)
        logits = logits.squeeze(1)
        if self.padding_from >= logits.size(-1):
            return logits
        # the padding rows take no probability: the loss is the exported model's, which has no such rows
        padding = torch.arange(logits.size(-1), device=logits.device) >= self.padding_from
        return logits.masked_fill(padding, float("-inf"))

    def forward(self, hidden: Tensor, labels: Tensor, output_weight: Tensor | None) -> Tensor:
        """Mean cross-entropy over the masked positions (0 if there are none)."""
        x, target = self.select(hidden, labels)
        logits = self.logits(x, output_weight)
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float().unsqueeze(1), target.unsqueeze(1))
        return losses.sum() / max(target.numel(), 1)

class MiniJointModel(MegatronModule):
    """One pipeline chunk of the MiniJoint masked LM (the whole model when unpipelined)."""

    # Megatron's own first/last-stage embedding sync is replaced by sync_word_embedding_grads (a third copy
    # can sit on a middle stage); this keeps finalize_model_grads from reducing the copies a second time.
    share_embeddings_and_output_weights = False

    def __init__(self, cfg: ModelConfig, config, spec, pre_process: bool, post_process: bool,
                 vp_stage: int | None = None):
        super().__init__(config=config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        vocab = cfg.padded_vocab_size
        if pre_process:
            self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab,
                                                    max_sequence_length=cfg.seq_length,
                                                    position_embedding_type="learned_absolute")
        # No final LayerNorm in the block: each head has its own, applied at masked positions only.
        self.encoder = TransformerBlock(config=config, spec=spec, post_layer_norm=False,
                                        pre_process=pre_process, post_process=post_process,
                                        vp_stage=vp_stage)
        if post_process:
            self.lm_head = MaskedLMHead(config, vocab, own_output_weight=not pre_process,
                                        used_vocab_size=cfg.vocab_size)
        secondary_layer = [layer for layer in self.encoder.layers if layer.layer_number == cfg.mini_layers]
        self.has_secondary_head = bool(secondary_layer) and cfg.secondary_head != "none"
        # shared_transform on the main head's own chunk: the main head serves both; elsewhere a copy of it.
        self._secondary_is_main_head = self.has_secondary_head and cfg.secondary_head == "shared_transform" \
            and post_process
        if self.has_secondary_head and not self._secondary_is_main_head:
            shared = cfg.share_aux_output_embedding
            self.aux_head = MaskedLMHead(config, vocab, used_vocab_size=cfg.vocab_size,
                                         own_output_weight=not shared or not (pre_process or post_process))
        if self.has_secondary_head:
            secondary_layer[0].register_forward_hook(self._secondary_head_hook)
        self.secondary_loss_scale: float | None = None  # set per step by parallelize.forward_backward
        self.secondary_losses: list[Tensor] = []  # one detached value per microbatch, for logging
        self._labels: Tensor | None = None
        self._secondary_hidden: Tensor | None = None
        self._tag_tied_copies()

    @property
    def secondary_head(self) -> MaskedLMHead:
        return self.lm_head if self._secondary_is_main_head else self.aux_head

    # -- tied weights ----------------------------------------------------------------------------------------
    def word_embedding_weights(self) -> tuple[Tensor | None, list[Tensor]]:
        """(the input word embedding if this chunk has it, this chunk's copies of it used as projections)."""
        master = self.embedding.word_embeddings.weight if self.pre_process else None
        copies = []
        if self.post_process and not self.pre_process:
            copies.append(self.lm_head.output_layer.weight)
        if (self.has_secondary_head and not self._secondary_is_main_head and self.cfg.share_aux_output_embedding
                and not (self.pre_process or self.post_process)):
            copies.append(self.aux_head.output_layer.weight)
        return master, copies

    def head_weights(self) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """shared_transform: (the main head's tied parameters if this chunk has the head, this chunk's copy of them
        in the secondary head), each in MaskedLMHead.TIED_PARAMETERS order; (None, None) otherwise."""
        if self.cfg.secondary_head != "shared_transform":
            return None, None

        def tied(head):
            params = dict(head.named_parameters())
            return [params[name] for name in MaskedLMHead.TIED_PARAMETERS]

        master = tied(self.lm_head) if self.post_process else None
        copy = tied(self.aux_head) if self.has_secondary_head and not self._secondary_is_main_head else None
        return master, copy

    def _tag_tied_copies(self) -> None:
        if self.config.pipeline_model_parallel_size == 1:
            return  # one stage: the heads use the owners themselves
        master, copies = self.word_embedding_weights()
        head_master, head_copy = self.head_weights()
        for w in ([master] if master is not None else []) + (head_master or []):
            w.shared_embedding = True  # its own DDP bucket, so every stage shards it alike
        for w in copies + (head_copy or []):
            w.data.fill_(0)  # set to the owner's value by parallelize.sync_tied_weights
            w.shared = True  # counted once in the gradient norm
            w.shared_embedding = True
        for w in copies:
            w.is_embedding_or_output_parameter = True

    def _main_output_weight(self) -> Tensor | None:
        return self.embedding.word_embeddings.weight if self.pre_process else None

    def _aux_output_weight(self) -> Tensor | None:
        if not self.cfg.share_aux_output_embedding:
            return None
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.lm_head.output_layer.weight
        return None

    # -- forward ------------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first get their input from the previous stage (called by megatron)."""
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "one input tensor per stage"
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    def _secondary_head_hook(self, layer, args, output):
        hidden, context = output
        if self._labels is None:  # mlm_logits(): hand the hidden states to the caller
            self._secondary_hidden = hidden
            return output
        loss = self.secondary_head(hidden, self._labels, self._aux_output_weight())
        self.secondary_losses.append(loss.detach().clone())
        if torch.is_grad_enabled():
            if self.secondary_loss_scale is None:
                raise RuntimeError("secondary_loss_scale is unset: run training steps through "
                                   "minimodel.models.minijoint.parallelize.forward_backward")
            hidden = _AddLossGradient.apply(hidden, loss * self.secondary_loss_scale)
        return hidden, context

    def encode(self, input_ids: Tensor | None, attention_mask: Tensor, labels: Tensor | None) -> Tensor:
        """Embeddings (first stage) and this chunk's layers -> hidden states [s(/tp), b, h]."""
        # [b, 1, 1, s], True = do not attend (padding keys); bidirectional otherwise.
        mask = (attention_mask < 0.5)[:, None, None, :]
        hidden = None
        if self.pre_process:
            positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
            hidden = self.embedding(input_ids=input_ids, position_ids=positions)
        self._labels = labels
        try:
            return self.encoder(hidden_states=hidden, attention_mask=mask)
        finally:
            self._labels = None

    def forward(self, input_ids: Tensor | None, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Last stage: the main MLM loss (scalar); other stages: hidden states for the next stage."""
        hidden = self.encode(input_ids, attention_mask, labels)
        if not self.post_process:
            return hidden
        return self.lm_head(hidden, labels, self._main_output_weight())

    @torch.no_grad()
    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(main, secondary) logits [b, s, vocab_size] at every position (secondary None with secondary_head
        "none"); unpipelined, TP=1 models only."""
        assert self.pre_process and self.post_process, "needs the whole model"
        assert parallel_state.get_tensor_model_parallel_world_size() == 1, "needs TP=1"
        hidden = self.encode(input_ids, attention_mask, labels=None)
        secondary, self._secondary_hidden = self._secondary_hidden, None

        def project(head, h, weight):
            b = input_ids.size(0)
            flat = h.transpose(0, 1).reshape(-1, h.size(-1))
            return head.logits(flat, weight).reshape(b, -1, self.cfg.padded_vocab_size)[..., :self.cfg.vocab_size]

        return (project(self.lm_head, hidden, self._main_output_weight()),
                project(self.secondary_head, secondary, self._aux_output_weight()) if self.has_secondary_head
                else None)

    # -- checkpointing ----------------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron's sharded state dict, with every tied copy stored as a replica of its owner's key."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        names = {id(p): n for n, p in self.named_parameters()}
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        _, copies = self.word_embedding_weights()
        for i, weight in enumerate(copies):
            sd[f"{prefix}{names[id(weight)]}"] = make_tp_sharded_tensor_for_checkpoint(
                tensor=weight, key=f"{prefix}embedding.word_embeddings.weight", replica_id=(1 + i, 0, dp_rank),
                allow_shape_mismatch=True)
        _, head_copy = self.head_weights()
        for name, weight in zip(MaskedLMHead.TIED_PARAMETERS, head_copy or []):
            entry = sd[f"{prefix}{names[id(weight)]}"]
            entry.key = f"{prefix}lm_head.{name}"
            entry.replica_id = (1, *entry.replica_id[1:])  # the main head's own tensor is the main replica
        if head_copy is not None:  # the copy's (empty) extra states stay local, not keyed twice
            for name, entry in sd.items():
                if name.startswith(f"{prefix}aux_head.") and name.endswith("_extra_state"):
                    sd[name] = LocalNonpersistentObject(entry.data)
        return sd
