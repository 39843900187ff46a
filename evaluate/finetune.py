"""Step 3: fine-tune the primary model on a source-language task with its token embeddings frozen.

    python evaluate/finetune.py --config configs/evaluate/finetune/verse_class_tiny.yaml model_dir=... task.data_dir=...
    deepspeed --num_gpus 8 evaluate/finetune.py --config configs/evaluate/finetune/xnli.yaml model_dir=... \
        task.data_dir=XNLI-1.0 task.train_file=multinli_1.0/multinli_1.0_train.jsonl

Writes <output_dir>/model (the task model that adapt/plug.py plugs target embeddings into) and metrics.json.
Rerunning the same command resumes; on SIGTERM / SIGUSR1 it checkpoints and exits with code 75 (requeue).
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("finetune", __doc__)
