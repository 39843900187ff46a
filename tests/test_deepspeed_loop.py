"""The shared DeepSpeed loop on a toy model, in a process of its own (one-process world, the CPU accelerator; two
ranks under the deepspeed launcher for ZeRO-3's evaluation)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TOY = textwrap.dedent("""
    import atexit
    import gc
    import sys
    import numpy as np
    import torch
    from torch import nn
    from minimodel.distributed import destroy
    from minimodel.training.config import CheckpointConfig, DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
    from minimodel.training.deepspeed_loop import gather_full_params, release_engine, train

    atexit.register(destroy)  # as a stage's cli: a process group left up can abort the exit in gloo's threads
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    data = [{"input_ids": np.array([i % 10, (i + 1) % 10])} for i in range(64)]

    def loss_fn(model, batch):
        ids = batch["input_ids"]
        return nn.functional.cross_entropy(model(ids[:, 0]), ids[:, 1])

    cfg = DeepSpeedLoopConfig(steps=8, schedule=ScheduleConfig(warmup_steps=4), optim=OptimizerConfig(lr=0.04),
                              micro_batch_size=4, torch_adam=True, zero_config="configs/deepspeed/zero1.json",
                              checkpoint=CheckpointConfig(save_every=0), precision="fp32")
""")
TOY_RUN = TOY + 'train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1])\n'
# LT-SFT's two phases: a second engine over the same parameters after the first is released; the first engine's
# garbage collection (DeepSpeed's __del__ destroys it again) must not unlink the second's fp32 masters
TWO_ENGINES = TOY + textwrap.dedent("""
    cfg.zero_config = "configs/deepspeed/zero2.json"
    first = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1] + "/first")
    release_engine(first.engine)
    second = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1] + "/second")
    del first
    gc.collect()
    params = dict(model.named_parameters())
    full = gather_full_params(second.engine, params)
    assert all(torch.equal(full[n], p.detach().float()) for n, p in params.items()), "fp32 masters unlinked"
    assert all(p.abs().sum() > 0 for p in full.values())
""")


def _run_toy(script: str, tmp_path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path), *args], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-3000:]


def test_each_update_runs_at_the_scheduled_positive_lr_and_logs_it(tmp_path):
    _run_toy(TOY_RUN, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["train/lr"] for row in rows]
    # linear warmup to 0.04 at update 4, then linear decay towards 0 at update 9 (never reached)
    expected = [0.01, 0.02, 0.03, 0.04, 0.032, 0.024, 0.016, 0.008]
    assert lrs == pytest.approx(expected), lrs


# Launch 1 saves every 2 steps up to STEPS; launch 2 (REMAINS given) resumes over a killed save's remains of that step
KILLED_SAVE = TOY + textwrap.dedent("""
    import os
    steps, keep_last, remains = map(int, sys.argv[2:5])
    cfg.checkpoint = CheckpointConfig(save_every=2, keep_last=keep_last)
    cfg.steps = steps
    if remains:
        os.makedirs(sys.argv[1] + f"/checkpoints/step_{remains:08d}")
        open(sys.argv[1] + f"/checkpoints/step_{remains:08d}/mp_rank_00_model_states.pt", "w").close()
    train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1])
""")


@pytest.mark.parametrize("remains", [10, 5])
def test_a_killed_saves_remains_are_never_kept_in_place_of_a_complete_checkpoint(tmp_path, remains):
    """The old code pruned every step_* by name: the remains of a later step counted as the newest, and keep_last=1
    deleted the checkpoint `latest` named (a relaunch then found no checkpoint to resume); the remains of a step
    before the next save (a preemption's save at step 5, killed at the end of the grace period) counted among the
    keep_last kept, and deleted the last complete checkpoint but one."""
    keep_last = 1 if remains == 10 else 2
    _run_toy(KILLED_SAVE, tmp_path, "4", str(keep_last), "0")
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    (ckpt / "step_00000004" / ".complete").unlink()  # saved by a version without completion marks: `latest` vouches
    _run_toy(KILLED_SAVE, tmp_path, "8" if remains == 10 else "6", str(keep_last), str(remains))
    kept = ["step_00000008"] if remains == 10 else ["step_00000004", "step_00000006"]
    assert (ckpt / "latest").read_text() == kept[-1]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == kept


# A dataset that varies by epoch (as masked-LM data masks afresh): the loop reads epoch e from for_epoch(e).
EPOCHS = TOY + textwrap.dedent("""
    import json

    class Epochs(list):
        requested = []

        def for_epoch(self, epoch):
            Epochs.requested.append(epoch)
            return self

    cfg.steps = 40  # 160 items of 64: epochs 0, 1 and 2
    train(cfg, model, Epochs(data), loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1])
    json.dump(sorted(set(Epochs.requested)), open(sys.argv[1] + "/epochs.json", "w"))
""")


def test_the_loop_reads_each_epoch_of_a_dataset_that_varies_by_epoch(tmp_path):
    _run_toy(EPOCHS, tmp_path)
    assert json.loads((tmp_path / "epochs.json").read_text()) == [0, 1, 2]


def test_a_released_engine_leaves_the_next_engine_over_the_same_model_intact(tmp_path):
    _run_toy(TWO_ENGINES, tmp_path)


# Nine held-out items, micro-batches of 4 on two ranks: rank 0 scores items 0-3 and 8, rank 1 items 4-7 and then has
# none left. Under ZeRO-3 every forward gathers the partitioned parameters collectively, so a rank that stopped early
# left the other waiting in its second forward: the run hung.
ZERO3_UNEVEN_EVAL = TOY + textwrap.dedent("""
    import json
    import torch.distributed as dist
    from minimodel.training.config import EvalConfig
    out = sys.argv[-1]  # after the launcher's --local_rank
    cfg.zero_config, cfg.steps, cfg.eval = out + "/zero3.json", 2, EvalConfig(every=2, batches=5)
    result = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=out,
                   eval_data=data[:9])
    full = gather_full_params(result.engine, dict(model.named_parameters()))  # collective
    if dist.get_rank() == 0:
        plain = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        plain.load_state_dict(full)
        with torch.no_grad():  # the mean of the three batches' losses, by hand
            losses = [float(loss_fn(plain, {"input_ids": torch.as_tensor(np.stack([d["input_ids"] for d in
                                                                                  data[a:b]]))}))
                      for a, b in ((0, 4), (4, 8), (8, 9))]
        json.dump(sum(losses) / 3, open(out + "/expected_eval.json", "w"))
""")


@pytest.mark.slow
def test_zero3_evaluation_on_a_held_out_set_two_ranks_do_not_split_evenly(tmp_path):
    from adapt_helpers import launch_env
    from minimodel.distributed import free_port

    script = tmp_path / "toy.py"
    script.write_text(ZERO3_UNEVEN_EVAL)
    repo = Path(__file__).resolve().parents[1]
    zero3 = json.loads((repo / "configs/deepspeed/zero3.json").read_text())
    # the toy's parameters partitioned and released after each use, as a large model's are
    zero3["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                      stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    run = subprocess.run([str(repo / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path)], env=launch_env(), cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = json.loads((tmp_path / "expected_eval.json").read_text())
    assert rows[-1]["eval/loss"] == pytest.approx(expected, rel=1e-5)


# A run stopped by SIGTERM (sent from the step hook of step 3, so the vote after step 4 sees it) at step 4, where an
# evaluation is due; the same script again resumes at step 4 and runs to step 8.
STOPPED_AT_AN_EVALUATION = TOY + textwrap.dedent("""
    import os
    import signal
    from minimodel.training.config import EvalConfig
    out, stop = sys.argv[1], sys.argv[2] == "stop"
    cfg.eval, cfg.checkpoint = EvalConfig(every=2, batches=2), CheckpointConfig(save_every=3)

    def on_step(engine, state):
        if stop and state["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=out, eval_data=data[:8],
                   on_step=on_step)
    assert result.interrupted == stop and result.step == (4 if stop else 8), (result.interrupted, result.step)
""")


def test_a_stop_signal_checkpoints_first_and_the_evaluation_due_runs_on_resume(tmp_path):
    """The grace period after a stop signal goes to the checkpoint: the evaluation due at the stopping step is not
    run then but at the start of the next launch, at the same step, so the curve misses no point (and gets it from
    the same weights as an uninterrupted run)."""
    for name, args in (("reference", ["run"]), ("stopped", ["stop"]), ("stopped", ["run"])):
        _run_toy(STOPPED_AT_AN_EVALUATION, tmp_path / name, *args)
        if args == ["stop"]:
            rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/loss" in rows[1]
            assert "eval/loss" not in rows[3]  # due, left to the next launch
            assert (tmp_path / name / "checkpoints" / "step_00000004").is_dir()
    reference = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))  # step 4's evaluation joined its row
    assert resumed[3]["train/loss"] == reference[3]["train/loss"]
    evaluated = {r["step"]: r["eval/loss"] for r in resumed if "eval/loss" in r}
    assert evaluated == pytest.approx({s: reference[s - 1]["eval/loss"] for s in (2, 4, 6, 8)}, rel=1e-6)


# Two trainings in one process (a stage's languages, LT-SFT's phases): SIGTERM during the first one's last step
# (from its step hook) ends nothing early there, and is not forgotten: the second stops at its first step.
SIGNAL_AT_THE_END_OF_THE_FIRST = TOY + textwrap.dedent("""
    import os
    import signal

    def on_step(engine, state):
        if state["step"] == cfg.steps:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1] + "/first",
                  on_step=on_step)
    assert (first.interrupted, first.step) == (False, 8), (first.interrupted, first.step)
    release_engine(first.engine)
    second = train(cfg, model, data, loss_fn, flops_fn=lambda batch: 1.0, output_dir=sys.argv[1] + "/second")
    assert (second.interrupted, second.step) == (True, 1), (second.interrupted, second.step)
""")


def test_a_stop_signal_at_the_end_of_one_training_stops_the_next_in_the_same_process(tmp_path):
    _run_toy(SIGNAL_AT_THE_END_OF_THE_FIRST, tmp_path)
    assert (tmp_path / "second" / "checkpoints" / "step_00000001").is_dir()
