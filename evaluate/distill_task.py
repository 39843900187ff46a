"""BiStil phase 2, task distillation: the phase-1 student learns the source-language task from the fine-tuned task
model as a sparse fine-tuning (minimodel/bistil/task.py).

    deepspeed [--num_gpus N] evaluate/distill_task.py --config configs/distill/task_tiny.yaml \
        student=<adapt/distill.py output_dir>/<lang>/student teacher=<evaluate/finetune.py output_dir>/model

Exit status: 0 when finished, 75 when a signal stopped it after checkpointing (run the same command again to resume),
2 on a config error.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("distill_task", __doc__)
