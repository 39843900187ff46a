"""Worker for tests/test_minijoint_model.py, run under torchrun (gloo, CPU).

    reference (1 process):  TP1/PP1 model -> reference checkpoint, loss and gradients of one step, for each
                             secondary-head variant (separate, shared_transform, none)
    layouts   (4 processes): each parallel layout loads its variant's reference checkpoint and runs the same step;
                             its gradients are written as a dist checkpoint (layout-independent), then read back
                             at TP1/PP1 as plain tensors; plus the TP2xPP2 -> TP1 -> TP2xPP2 checkpoint round trip.
Outputs go to <out>/ (results.json, *.pt); the pytest file does the comparisons.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minimodel import distributed
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint import model as model_module
from minimodel.models.minijoint import parallelize as P
from minimodel.models.minijoint.config import ModelConfig

MODEL = ModelConfig(vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=128,
                    seq_length=16, mini_layers=2, aux_weight=0.5, hidden_dropout=0.0, attention_dropout=0.0)
# name suffix -> model; "" is the default (separate secondary head)
VARIANTS = {"": MODEL, "_shared": dataclasses.replace(MODEL, secondary_head="shared_transform"),
            "_none": dataclasses.replace(MODEL, secondary_head="none")}
MICRO, GLOBAL = 2, 8  # 4 microbatches in the reference
# The distributed optimizer only takes Adam. Its first step moves p by lr * g / (|g| + eps); with a huge eps that
# is (lr / eps) * g to ~|g|/eps relative, so (old - new) / STEP_SCALE recovers the gradient to ~1e-7.
ADAM_EPS = 1e6
STEP_SCALE = 1000.0

# name -> (tp, pp, vpp, sequence_parallel, distributed_optimizer); world size 4 (the rest is data parallel)
LAYOUTS = {
    "tp2_sp_dp2": (2, 1, None, True, False),
    "pp2_dp2": (1, 2, None, False, False),
    "tp2_pp2": (2, 2, None, False, False),
    "pp4_middle": (1, 4, None, False, False),  # layer 2 (secondary head) on stage 1 of 4
    "pp2_vpp2_dp2_distopt": (1, 2, 2, False, True),  # layer 2 in chunk 0 of the last rank
}
# shared_transform: the main head's copy on stage 0 with TP (sharded bias), on a middle stage, and in another
# chunk of the last rank (distributed optimizer)
SHARED_LAYOUTS = ("tp2_pp2", "pp4_middle", "pp2_vpp2_dp2_distopt")


def batches(seed: int = 0, count: int = GLOBAL // MICRO) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, MODEL.vocab_size, (MICRO, MODEL.seq_length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, MODEL.seq_length - 5:] = 0
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


TIMEOUT_MINUTES = 7  # not a backend's default (gloo 30, NCCL 10): every group must get the configured one


def parallel(tp=1, pp=1, vpp=None, sp=False, distopt=False) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp,
                          use_distributed_optimizer=distopt, micro_batch_size=MICRO, global_batch_size=GLOBAL,
                          timeout_minutes=TIMEOUT_MINUTES)


def replica_batches(pc: ParallelConfig) -> tuple[list[dict], int]:
    from megatron.core import parallel_state

    n = pc.num_microbatches(distributed.world_size())
    r = parallel_state.get_data_parallel_rank()
    return batches()[r * n:(r + 1) * n], n


def named_full_params(model) -> dict[str, torch.Tensor]:
    """TP1/PP1 model -> {name: tensor}."""
    return {n: p.detach().clone() for n, p in P.unwrap(model[0]).named_parameters()}


def save(model, path: Path) -> None:
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(P.sharded_state_dict(model), str(path))


def grads_into_params(model) -> None:
    for chunk in model:
        for p in P.unwrap(chunk).parameters():
            p.data.copy_(p.main_grad)


def tied_grad_spread(model) -> tuple[float, list[list[int]]]:
    """Max difference between the gradients of all copies of each tied weight (all stages, max over all ranks), and
    per rank, per tied set (word embeddings; the main head under shared_transform), how many gradient tensors that
    rank compared: its own owners and copies, plus the one gathered from each other rank of the set's group. With
    one tensor (no copies anywhere: pp=1) the spread is 0 by construction, so the test checks the count too."""
    spread, compared = 0.0, []
    for owners, copies, group in P._tied_weights(model):
        holders = owners + copies
        compared.append(len(holders) + (dist.get_world_size(group) - 1 if group is not None and holders else 0))
        for i in range(len(holders[0]) if holders else 0):
            grads = [h[i].main_grad for h in holders]
            spread = max([spread] + [(g - grads[0]).abs().max().item() for g in grads])
            if group is not None:
                gathered = [torch.empty_like(grads[0]) for _ in range(dist.get_world_size(group))]
                dist.all_gather(gathered, grads[0].contiguous(), group=group)
                spread = max([spread] + [(g - gathered[0]).abs().max().item() for g in gathered])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (spread, compared))  # every rank's view, not rank 0's alone
    return max(s for s, _ in every), [c for _, c in every]


def reference(out: Path) -> None:
    pc = parallel()
    for suffix, model_cfg in VARIANTS.items():
        P.setup(model_cfg, pc, seed=1)
        model = P.build_model(model_cfg, pc)
        save(model, out / f"ckpt_ref{suffix}")
        params = named_full_params(model)
        data, n = replica_batches(pc)
        losses = P.forward_backward(model, iter(data), n)
        grads = {name: p.main_grad.clone() for name, p in P.unwrap(model[0]).named_parameters()}
        chunk = P.unwrap(model[0]).eval()
        # the training losses as the exported models compute them: cross-entropy over the vocabulary's own ids
        by_hand = {"main": [], "secondary": []}
        for batch in data:
            masked = batch["labels"] != -100
            for head, logits in zip(by_hand, chunk.mlm_logits(batch["input_ids"], batch["attention_mask"])):
                if logits is not None:
                    head_loss = torch.nn.functional.cross_entropy(logits[masked], batch["labels"][masked])
                    by_hand[head].append(head_loss.item())
        b = batches(seed=5, count=1)[0]
        main, secondary = chunk.mlm_logits(b["input_ids"], b["attention_mask"])
        torch.save({"params": params, "grads": grads, "losses": losses, "losses_by_hand": by_hand,
                    "logits": {"batch": b, "main": main, "secondary": secondary}}, out / f"reference{suffix}.pt")
    distributed.destroy()


def gradient_step(model) -> None:
    """One distributed-optimizer step that moves every parameter by -STEP_SCALE x its gradient."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=STEP_SCALE * ADAM_EPS, adam_eps=ADAM_EPS,
                                                 weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=True),
                                 model)
    opt.step()


def layouts(out: Path) -> None:
    results = {}
    runs = [(name, "", spec, True) for name, spec in LAYOUTS.items()]
    runs += [("pp4_middle_not_injected", "", LAYOUTS["pp4_middle"], False)]
    runs += [(f"shared_{name}", "_shared", LAYOUTS[name], True) for name in SHARED_LAYOUTS]
    for name, variant, (tp, pp, vpp, sp, distopt), inject in runs:
        pc = parallel(tp, pp, vpp, sp, distopt)
        model_cfg = VARIANTS[variant]
        P.setup(model_cfg, pc, seed=1)
        model = P.build_model(model_cfg, pc)
        P.load_checkpoint_into(model, out / f"ckpt_ref{variant}")
        data, n = replica_batches(pc)
        original = model_module._AddLossGradient.apply
        if not inject:  # negative control: the secondary loss is computed but its gradient is dropped
            model_module._AddLossGradient.apply = lambda hidden, loss: hidden
        try:
            losses = P.forward_backward(model, iter(data), n)
        finally:
            model_module._AddLossGradient.apply = original
        spread, compared = tied_grad_spread(model)
        if distopt:
            gradient_step(model)
        else:
            grads_into_params(model)
        save(model, out / f"ckpt_{name}")
        results[name] = {"losses": losses, "tied_grad_spread": spread, "tied_grads_compared": compared,
                         "variant": variant, "pipeline_stages": pp,
                         "step_scale": STEP_SCALE if distopt else None}
        head_group = distributed.output_head_group()  # the shared head's copies (rank 0 holds one at stage 0)
        if head_group is not None:
            results[name]["head_group_timeout_s"] = \
                head_group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    # Checkpoint round trip: fresh weights at TP2 x PP2 -> TP1 x PP1 -> TP2 x PP2.
    pc = parallel(2, 2)
    P.setup(MODEL, pc, seed=7)
    model = P.build_model(MODEL, pc)
    original = {k: v.clone() for k, v in P.unwrap(model[0]).state_dict().items() if torch.is_tensor(v)}
    save(model, out / "ckpt_tp2pp2_fresh")
    fixed = batches(seed=5, count=1)
    results["tp2pp2_fresh_forward"] = P.forward_backward(model, iter(fixed), 1, forward_only=True)

    # TP1 x PP1 (data parallel over all 4 processes): read every layout's checkpoint as plain tensors.
    pc1 = parallel()
    for variant in ("_shared", ""):
        P.setup(VARIANTS[variant], pc1, seed=1)
        model1 = P.build_model(VARIANTS[variant], pc1)
        for name, name_variant, _, _ in runs:
            if name_variant == variant:
                P.load_checkpoint_into(model1, out / f"ckpt_{name}")
                if dist.get_rank() == 0:
                    torch.save(named_full_params(model1), out / f"{name}.pt")
    P.load_checkpoint_into(model1, out / "ckpt_tp2pp2_fresh")
    chunk = P.unwrap(model1[0]).eval()
    b = fixed[0]
    results["tp2pp2_fresh_at_tp1_forward"] = P.forward_backward(model1, iter(fixed), 1, forward_only=True)
    main, secondary = chunk.mlm_logits(b["input_ids"], b["attention_mask"])
    if dist.get_rank() == 0:
        torch.save({"batch": b, "main": main, "secondary": secondary}, out / "tp2pp2_fresh_logits.pt")
    save(model1, out / "ckpt_tp2pp2_fresh_resaved_tp1")

    P.setup(MODEL, pc, seed=3)
    model = P.build_model(MODEL, pc)
    P.load_checkpoint_into(model, out / "ckpt_tp2pp2_fresh_resaved_tp1")
    reloaded = P.unwrap(model[0]).state_dict()
    diff = torch.tensor(max((reloaded[k] - v).abs().max().item() for k, v in original.items()))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    results["round_trip_max_diff"] = diff.item()

    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":  # dist_checkpointing.save needs the guard
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"reference": reference, "layouts": layouts}[mode](out)
