"""Step 4: plug learned target-language embeddings into the primary model or a task model.

    python adapt/plug.py embeddings=runs/adapt/minijoint/sw model=runs/export/primary output_dir=runs/plugged/sw
    python adapt/plug.py embeddings=runs/adapt/minijoint/sw model=runs/task/xnli primary_model=runs/export/primary \
        output_dir=runs/task/xnli-sw

Writes a Hugging Face model directory with the target tokenizer; refuses mismatched shapes, the wrong tokenizer,
or a primary model the embeddings were not learned for.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("plug", __doc__)
