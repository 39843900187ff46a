"""`deepspeed --num_gpus 2 evaluate/finetune.py`: extractive QA (MLQA / SQuAD-format files) on two ranks with
ZeRO-3; the saved task model keeps the primary model's embeddings bit-identical and is scored with EM / F1."""
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from eval_helpers import EMBEDDINGS, REPO, mlqa_world, stage_env
from minimodel.distributed import free_port
from minimodel.evaluation.finetune import TaskFlops
from minimodel.evaluation.models import load_task_model
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TaskConfig
from minimodel.hf import load_tokenizer


@pytest.mark.slow
def test_deepspeed_two_ranks_qa_zero3(tmp_path):
    primary, train = mlqa_world(tmp_path)
    out = tmp_path / "finetune"
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "evaluate" / "finetune.py"), "--config", str(REPO / "configs/evaluate/finetune/mlqa.yaml"),
           f"model_dir={primary}", f"task.data_dir={tmp_path / 'MLQA_V1'}", f"task.train_file={train}",
           "task.max_length=24", "task.doc_stride=4", "train.steps=6", "train.schedule.warmup_steps=2",
           "train.micro_batch_size=4", "train.optim.lr=0.001", "train.zero_config=configs/deepspeed/zero3.json",
           "train.torch_adam=true", "train.checkpoint.save_every=0", "train.eval.every=3", "train.eval.batches=2",
           f"output_dir={out}", f"tracking.store_dir={tmp_path / 'mlflow'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    before, after = load_file(primary / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert torch.equal(after[EMBEDDINGS], before[EMBEDDINGS])
    assert not torch.equal(after["bert.encoder.layer.1.attention.self.query.weight"],
                           before["bert.encoder.layer.1.attention.self.query.weight"])
    assert "qa_outputs.weight" in after
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {f"{s}/{m}" for s in ("dev", "test") for m in ("exact_match", "f1", "n_examples")}
    # as many questions as each MLQA file holds (counted here), and the scores of the saved model: re-scored here
    for split in ("dev", "test"):
        squad = json.loads((tmp_path / "MLQA_V1" / split / f"{split}-context-en-question-en.json").read_text())
        questions = sum(len(p["qas"]) for article in squad["data"] for p in article["paragraphs"])
        assert metrics[f"{split}/n_examples"] == questions == 40
    task = TaskConfig(name="mlqa", data_dir=str(tmp_path / "MLQA_V1"), max_length=24, doc_stride=4)
    saved = load_task_model(out / "model", "qa").eval()
    assert score(task, saved, load_tokenizer(out / "model"), "en", "test", 64) == {
        k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    steps = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6] and "eval/loss" in steps[2]
    # two ranks each ran one micro-batch of 4 windows x 24 tokens: FLOPs are counted over both
    from transformers import AutoModelForQuestionAnswering

    per_rank = TaskFlops(AutoModelForQuestionAnswering.from_pretrained(out / "model"))(
        {"input_ids": torch.zeros(4, 24, dtype=torch.long)})
    assert steps[0]["compute/flops"] == 2 * per_rank and steps[-1]["compute/flops"] == 12 * per_rank
