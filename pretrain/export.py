"""Export a MiniJoint checkpoint to Hugging Face: <output_dir>/primary and <output_dir>/mini (the mini-model).

    python pretrain/export.py checkpoint=runs/pretrain/checkpoints/iter_0001000 \
        tokenizer=data/default/en/tokenizer output_dir=runs/export [mini=false]
"""
from minimodel.cli import main

if __name__ == "__main__":  # required: dist_checkpointing starts a spawn-context process that re-imports this file
    main("export", __doc__)
