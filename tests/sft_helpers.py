"""The LT-SFT training world of tests/test_sft_train.py: a tiny BERT MLM, its data and loop settings, the worker
that trains it under a real DeepSpeed launcher, and the plain PyTorch loop it is compared with.

Worker (run by `deepspeed --num_gpus 2 tests/sft_helpers.py <out> <zero stage>...`): for each ZeRO stage, trains an
SFT in <out>/zero<N>/ and writes (rank 0) theta0.pt (every parameter before training), rewound.pt (every parameter
as phase 2's first forward sees it) and final.pt (every parameter after phase 2). Exit 75 when a stop signal
interrupted it (relaunch to resume). With HOLD_PHASE2_AT_STEP=<n> in its environment, every rank waits at phase 2's
step n until it has received a stop signal (up to 10 minutes): a test that stops it after step n-1 cannot miss the
window, however late its signal comes."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from minimodel.sft.train import SFTConfig
from minimodel.training.config import CheckpointConfig, DeepSpeedLoopConfig, EvalConfig, OptimizerConfig, \
    ScheduleConfig
from minimodel.training.hf_mlm import masked_lm_loss
from minimodel.training.preemption import PreemptionSignal
from minimodel.training.sampler import MicroBatches

WORLD, MICRO, ACCUMULATION = 2, 4, 2
GRAD_CLIP = 0.05  # below every step's gradient norm here: clipping acts at each step
SFT = SFTConfig(k=300, full_steps=4, sparse_steps=6, full_l1=0.0, sparse_l1=50.0)
BASE_SHA = "0" * 64  # the tiny model is built in memory: no directory to hash


def loop_config(zero: int) -> DeepSpeedLoopConfig:
    return DeepSpeedLoopConfig(steps=1, micro_batch_size=MICRO, grad_accumulation=ACCUMULATION, seed=3,
                               optim=OptimizerConfig(lr=0.02, grad_clip=GRAD_CLIP),
                               schedule=ScheduleConfig(warmup_steps=2), eval=EvalConfig(every=0, batches=1),
                               checkpoint=CheckpointConfig(save_every=1, keep_last=2), torch_adam=True,
                               precision="fp32", zero_config=f"configs/deepspeed/zero{zero}.json")


def tiny_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def tiny_data(n: int = 96, seq: int = 8) -> list[dict]:
    g = np.random.default_rng(0)
    items = []
    for _ in range(n):
        ids = g.integers(4, 40, seq)
        masked = g.random(seq) < 0.3
        masked[0] = True
        items.append({"input_ids": np.where(masked, 3, ids), "attention_mask": np.ones(seq, dtype=np.int64),
                      "labels": np.where(masked, ids, -100)})
    return items


def plain_phase2(model: nn.Module, theta0: dict, masks: dict, lrs: list[float], *, reset_instead: bool = False):
    """Phase 2 as a plain PyTorch loop over the DeepSpeed loop's batches: the mean loss over ranks and
    micro-batches, L1 gradient, gradient masking, global-norm clipping, AdamW at the logged learning rates.
    reset_instead: no gradient masking; the masked-out entries are put back to theta0 after each step instead.
    Returns the parameters after it and each step's gradient norm before clipping."""
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    n_params = sum(p.numel() for p in model.parameters())
    cfg = loop_config(0)
    opt = torch.optim.AdamW(trainable.values(), lr=lrs[0], betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=0.0)
    data = tiny_data()
    samplers = [MicroBatches(lambda epoch: data, seed=cfg.seed, shuffle=True, global_batch=MICRO * ACCUMULATION * WORLD,
                             micro_batch=MICRO, dp_size=WORLD, dp_rank=r) for r in range(WORLD)]
    norms = []
    for step, lr in enumerate(lrs):
        opt.zero_grad()
        for sampler in samplers:
            for micro in range(ACCUMULATION):
                batch = {k: torch.as_tensor(v) for k, v in sampler.microbatch(step, micro).items()}
                (masked_lm_loss(model, batch) / (WORLD * ACCUMULATION)).backward()
        with torch.no_grad():
            for n, p in trainable.items():
                p.grad += SFT.sparse_l1 * torch.sign(p - theta0[n]) / n_params
                if n in masks and not reset_instead:
                    p.grad *= masks[n]
        norms.append(float(torch.nn.utils.clip_grad_norm_(trainable.values(), GRAD_CLIP)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        if reset_instead:
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].copy_(torch.where(m, params[n], theta0[n]))
    return {n: p.detach().clone() for n, p in params.items()}, norms


def main(out: Path, stages: list[int]) -> int:
    import torch.distributed as dist

    from minimodel.distributed import initialize_deepspeed
    from minimodel.sft.train import train_sft

    initialize_deepspeed()
    rank = dist.get_rank()
    for zero in stages:
        run_dir = out / f"zero{zero}"
        model = tiny_model()
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, run_dir / "theta0.pt")
        calls = [0]
        phase1_calls = SFT.full_steps * ACCUMULATION
        hold = int(os.environ.get("HOLD_PHASE2_AT_STEP", 0))

        def loss_fn(m, batch):
            calls[0] += 1
            if calls[0] == phase1_calls + 1 and rank == 0 and not (run_dir / "rewound.pt").exists():
                torch.save({n: p.detach().clone() for n, p in m.named_parameters()}, run_dir / "rewound.pt")
            if hold and calls[0] == phase1_calls + (hold - 1) * ACCUMULATION + 1:  # phase 2's step `hold` begins
                deadline = time.time() + 600
                while PreemptionSignal().received is None and time.time() < deadline:
                    time.sleep(0.05)
            return masked_lm_loss(m, batch)

        result = train_sft(SFT, loop_config(zero), model, tiny_data(), loss_fn, lambda batch: 1.0,
                           output_dir=run_dir, base_sha256=BASE_SHA, desc=f"sft zero{zero}")
        if result.status == "interrupted":
            return 75
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, run_dir / "final.pt")
        dist.barrier()
    return 0


if __name__ == "__main__":
    from minimodel.cli import setup_logging

    from minimodel.distributed import destroy

    setup_logging()  # the stage's own console lines (the loop's "resumed from ...")
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    code = main(Path(args[0]), [int(s) for s in args[1:]])
    destroy()  # as a stage's cli does: a process group left up can abort the exit in gloo's threads (rare)
    sys.exit(code)
