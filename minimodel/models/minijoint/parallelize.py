"""MiniJoint under megatron-core parallelism: build the model for a layout, run steps, checkpoint the weights.

Typical loop (minimodel/training/megatron_loop.py):

    setup(model_cfg, parallel_cfg, seed)                 # process groups, seeds; validates the layout
    model = build_model(model_cfg, parallel_cfg)         # list of DDP-wrapped chunks (one per virtual stage)
    optimizer = get_megatron_optimizer(OptimizerConfig(..., bf16=parallel_cfg.bf16(),
                     use_distributed_optimizer=parallel_cfg.use_distributed_optimizer), model)
    model_config(model).grad_scale_func = optimizer.scale_loss
    for step: zero_grad_buffers(model); optimizer.zero_grad()
              losses = forward_backward(model, batches, num_microbatches)   # loss values on every rank
              optimizer.step()
    dist_checkpointing.save(sharded_state_dict(model) | optimizer part, ckpt_dir); load_checkpoint_into(model, ckpt_dir)

Batches are MaskedLMDataset items collated: {"input_ids", "labels", "attention_mask"}, each [micro_batch, seq].
Every pipeline stage reads the same microbatches (every stage needs the labels: the secondary head can sit on
any stage); within a tensor-parallel group only TP rank 0 reads, the others receive the batch by broadcast.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_model_config

from minimodel import distributed
from minimodel.config import require
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint.config import ModelConfig
from minimodel.models.minijoint.model import MiniJointModel, layer_spec

BATCH_KEYS = ("input_ids", "labels", "attention_mask")
# ModelConfig fields that determine the weights' shapes and meaning (dropout, aux_weight may change on resume).
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_size", "seq_length",
              "mini_layers", "secondary_head", "share_aux_output_embedding", "padded_vocab_size")


# -- layout -----------------------------------------------------------------------------------------------
def check_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Fail at start-up, naming the key, if the model cannot be split as `parallel` asks."""
    tp, pp, chunks = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, \
        parallel.num_model_chunks
    require(model.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
            f"num_attention_heads={model.num_attention_heads} is not divisible by tensor_model_parallel_size={tp}")
    require(model.ffn_size % tp == 0, "parallel.tensor_model_parallel_size",
            f"ffn_hidden_size={model.ffn_size} is not divisible by tensor_model_parallel_size={tp}")
    require(model.padded_vocab_size % tp == 0, "parallel.tensor_model_parallel_size",
            f"the padded vocabulary ({model.padded_vocab_size}, a multiple of make_vocab_size_divisible_by="
            f"{model.make_vocab_size_divisible_by}) is not divisible by tensor_model_parallel_size={tp}")
    key = f"parallel.{'virtual_' if chunks > 1 else ''}pipeline_model_parallel_size"
    require(model.num_layers % (pp * chunks) == 0, key,
            f"num_layers={model.num_layers} cannot be split evenly into pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size = {pp} x {chunks} stages")
    if parallel.sequence_parallel:
        require(model.seq_length % tp == 0, "parallel.sequence_parallel",
                f"seq_length={model.seq_length} is not divisible by tensor_model_parallel_size={tp}")


def secondary_head_stage(model: ModelConfig, parallel: ParallelConfig) -> int:
    """The pipeline rank whose chunk holds layer `mini_layers` (megatron's interleaved layer assignment)."""
    layers_per_chunk = model.num_layers // (parallel.pipeline_model_parallel_size * parallel.num_model_chunks)
    return ((model.mini_layers - 1) // layers_per_chunk) % parallel.pipeline_model_parallel_size


def setup(model: ModelConfig, parallel: ParallelConfig, seed: int) -> None:
    """Validate the layout, then start the process groups (megatron's embedding group includes the secondary
    head's stage when that head projects with the tied word embeddings; the output-head group, when it is the
    main head) and seed every generator."""
    check_layout(model, parallel)
    stage = [secondary_head_stage(model, parallel)] if model.secondary_head != "none" else []
    distributed.initialize(parallel, seed, embedding_stages=stage if model.share_aux_output_embedding else [],
                           head_stages=stage if model.secondary_head == "shared_transform" else [])


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    bf16 = parallel.bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    vpp = parallel.virtual_pipeline_model_parallel_size
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_size, hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout, layernorm_epsilon=model.layernorm_epsilon,
        init_method_std=model.init_method_std,
        activation_func=F.gelu,  # exact (erf) gelu, as Hugging Face's "gelu"
        add_bias_linear=True, normalization="LayerNorm",
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=parallel.use_cpu_initialization or not torch.cuda.is_available(),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        # batch_p2p_comm=True gives silently wrong gradients with interleaved stages (upstream bug).
        batch_p2p_comm=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # the whole layer: what the default "full" means, without its deprecation warning
    )


# -- model --------------------------------------------------------------------------------------------------
def build_model(model: ModelConfig, parallel: ParallelConfig) -> list[DistributedDataParallel]:
    """This rank's model chunks (one per virtual pipeline stage), on this process's device, wrapped in
    megatron DDP; the model config's finalize_model_grads_func is set (call `setup` first)."""
    check_layout(model, parallel)
    config = transformer_config(model, parallel)
    spec = layer_spec()
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(parallel.num_model_chunks):
        stage = vp_stage if vpp else None
        chunk = MiniJointModel(
            model, config, spec,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage)
        chunk = chunk.to(distributed.device())
        # bf16 the megatron way: every parameter (the norms too) cast, the loss returned in fp32
        chunks.append(Float16Module(config, chunk) if config.bf16 else chunk)
    sync_tied_weights(chunks)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.bf16, overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer, bucket_size=grad_bucket_size(parallel))
    wrapped = [DistributedDataParallel(config, ddp_config, chunk,
                                       # megatron-LM: only the first chunk's buckets overlap with backward
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    if parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return wrapped


# The distributed optimizer's state is laid out by gradient buckets: megatron's default size grows with the
# data-parallel size past 40 ranks, and a checkpoint would then reload at none other. Its default up to 40 ranks, fixed.
GRAD_BUCKET_SIZE = 40_000_000


def grad_bucket_size(parallel) -> int | None:
    """Elements per gradient bucket: one bucket for all (None) unless the reduction overlaps the backward pass."""
    return GRAD_BUCKET_SIZE if parallel.overlap_grad_reduce else None


def unwrap(chunk) -> MiniJointModel:
    while not isinstance(chunk, MiniJointModel):
        chunk = chunk.module
    return chunk


def model_config(model: list) -> TransformerConfig:
    """The TransformerConfig the chunks share (where megatron looks for grad_scale_func etc.)."""
    return get_model_config(model[0])


def _tied_weights(chunks) -> list[tuple[list[torch.Tensor], list[torch.Tensor], object]]:
    """Per tied set (word embeddings; the main head's parameters under shared_transform): (this rank's owner
    tensors, this rank's copies, the group of the stages that hold them). Owners and copies are lists of equal
    length per chunk (one tensor for the word embeddings, MaskedLMHead.TIED_PARAMETERS for the head)."""
    words = ([], [])
    head = ([], [])
    for chunk in chunks:
        master, copies = unwrap(chunk).word_embedding_weights()
        words[0].extend([[master]] if master is not None else [])
        words[1].extend([[w] for w in copies])
        head_master, head_copy = unwrap(chunk).head_weights()
        head[0].extend([head_master] if head_master is not None else [])
        head[1].extend([head_copy] if head_copy is not None else [])
    sets = [(*words, _group(parallel_state.get_embedding_group(check_initialized=False)))]
    if unwrap(chunks[0]).cfg.secondary_head == "shared_transform":
        sets.append((*head, _group(distributed.output_head_group())))
    return sets


def _group(group):
    return group if group is not None and dist.get_world_size(group) > 1 else None


def sync_tied_weights(chunks) -> None:
    """Set every copy of a tied weight (see model.py) to its owner's value: all-reduce over the set's group, where
    only the owner's stage contributes a non-zero term."""
    for owners, copies, group in _tied_weights(chunks):
        if not copies and (group is None or not owners):
            continue  # nothing to set here, and no other stage waits for this one
        for i, reference in enumerate((owners or copies)[0]):
            value = owners[0][i].data.clone() if owners else torch.zeros_like(reference.data)
            if group is not None:
                dist.all_reduce(value, group=group)
            for copy in copies:
                copy[i].data.copy_(value)


def sync_tied_grads(model) -> None:
    """Sum the gradients of all copies of each tied weight (over chunks and pipeline stages), so every copy takes
    the same update: the gradient of the one tied parameter."""
    for owners, copies, group in _tied_weights(model):
        holders = owners + copies
        if group is None and len(holders) < 2:
            continue
        for i in range(len(holders[0])):
            grads = [h[i].main_grad for h in holders]
            total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0].clone()
            if group is not None:
                dist.all_reduce(total, group=group)
            for g in grads:
                g.copy_(total)


def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """megatron's gradient finalisation (data parallel, sequence-parallel norms), then the tied-weight sync;
    installed as config.finalize_model_grads_func by build_model, so the schedules call it."""
    megatron_finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    sync_tied_grads(model)


# -- steps ---------------------------------------------------------------------------------------------------
def get_batch(data_iterator: Iterator[dict] | None) -> dict[str, torch.Tensor]:
    """Next microbatch as int64 tensors on this device. TP rank 0 reads `data_iterator`; the other TP ranks
    may pass None and receive it by broadcast."""
    dev = distributed.device()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        item = next(data_iterator)
        stacked = torch.stack([torch.as_tensor(item[k], dtype=torch.int64) for k in BATCH_KEYS]).to(dev)
        shape = torch.tensor(stacked.shape, dtype=torch.int64, device=dev)
    else:
        shape = torch.empty(3, dtype=torch.int64, device=dev)
    if dist.get_world_size(tp_group) > 1:
        src = parallel_state.get_tensor_model_parallel_src_rank()
        dist.broadcast(shape, src, group=tp_group)
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            stacked = torch.empty(*shape.tolist(), dtype=torch.int64, device=dev)
        dist.broadcast(stacked, src, group=tp_group)
    return dict(zip(BATCH_KEYS, stacked))


def _main_loss(loss: torch.Tensor):
    # The schedule divides `loss` in place by the number of microbatches: report a copy.
    return loss, {"lm_loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict], model):
    """megatron forward_step_func over batches from get_batch (as forward_backward passes them)."""
    batch = next(data_iterator)
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"]), _main_loss


def forward_backward(model: list, data_iterator: Iterator[dict] | None, num_microbatches: int,
                     forward_only: bool = False) -> dict:
    """One step's forward (and backward) over `num_microbatches` microbatches with megatron's schedule for
    the layout (1F1B, interleaved with virtual stages, or none); gradients land in the DDP grad buffers.

    Returns, on every rank: {"loss", "lm_loss", "aux_loss": means over the microbatches and data-parallel
    replicas, "lm_loss_per_microbatch", "aux_loss_per_microbatch": this replica's values}; loss =
    lm_loss + aux_weight * aux_loss (each the mean cross-entropy over a microbatch's masked tokens). Without a
    secondary head (secondary_head "none") the aux_* entries are absent and loss = lm_loss.
    """
    chunks = [unwrap(m) for m in model]
    cfg = chunks[0].cfg
    config = model_config(model)
    loss_scale = config.grad_scale_func(torch.ones(1, device=distributed.device())).item() \
        if config.grad_scale_func is not None else 1.0
    for chunk in chunks:
        chunk.secondary_loss_scale = cfg.aux_weight * loss_scale / num_microbatches
        chunk.secondary_losses.clear()
    batches = [get_batch(data_iterator) for _ in range(num_microbatches)]
    micro_batch_size, seq_length = batches[0]["input_ids"].shape
    iterators = [iter(batches) for _ in chunks]  # every virtual stage walks the same microbatches
    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)

    values = torch.zeros(2, num_microbatches, dtype=torch.float32, device=distributed.device())
    if reported:  # last pipeline stage
        values[0] = torch.stack([r["lm_loss"].float() for r in reported])
    secondary = [loss for chunk in chunks for loss in chunk.secondary_losses]
    if secondary:
        values[1] = torch.stack(secondary).float()
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    per_replica = values.clone()
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    lm, aux = values.mean(1).tolist()
    if cfg.secondary_head == "none":
        return {"loss": lm, "lm_loss": lm, "lm_loss_per_microbatch": per_replica[0].tolist()}
    return {"loss": lm + cfg.aux_weight * aux, "lm_loss": lm, "aux_loss": aux,
            "lm_loss_per_microbatch": per_replica[0].tolist(), "aux_loss_per_microbatch": per_replica[1].tolist()}


def zero_grad_buffers(model: list) -> None:
    for chunk in model:
        chunk.zero_grad_buffer()


# -- checkpoints --------------------------------------------------------------------------------------------
def sharded_state_dict(model: list) -> dict:
    """The model part of a dist_checkpointing checkpoint: {"model": {"chunk<i>": ...}, "model_config": {...}}.

    Tensors are stored under layout-independent keys (global layer numbers, full TP shapes), so a checkpoint
    saved at one TP/PP/VPP layout loads at any other; "model_config" makes the checkpoint self-describing
    (the exporter builds the model from it).
    """
    chunks = [unwrap(m) for m in model]
    return {"model": {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)},
            "model_config": dataclasses.asdict(chunks[0].cfg)}


def read_model_config(ckpt_dir) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with."""
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    return ModelConfig(**common["model_config"])


def load_checkpoint_into(model: list, ckpt_dir) -> None:
    """Load the model weights of a checkpoint saved (at any layout) from `sharded_state_dict(model)`."""
    chunks = [unwrap(m) for m in model]
    saved, built = read_model_config(ckpt_dir), chunks[0].cfg
    for key in SHAPE_KEYS:
        require(getattr(saved, key) == getattr(built, key), key,
                f"checkpoint {ckpt_dir} holds a model with {key}={getattr(saved, key)}, this one has "
                f"{getattr(built, key)}")
    loaded = dist_checkpointing.load(sharded_state_dict(model), str(ckpt_dir))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model"][f"chunk{i}"])
