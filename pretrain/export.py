"""Export a MiniJoint checkpoint to Hugging Face: <output_dir>/primary and <output_dir>/mini (the mini-model).

    python pretrain/export.py checkpoint=runs/pretrain/checkpoints/iter_0001000 \
        tokenizer=data/default/en/tokenizer output_dir=runs/export
"""
from minimodel.config import parse_cli
from minimodel.models.minijoint.export import ExportConfig, run

if __name__ == "__main__":  # required: dist_checkpointing starts a spawn-context helper that re-imports this file
    result = run(parse_cli(ExportConfig, description=__doc__))
    print(f"primary model: {result['primary']}\nmini-model:    {result['mini']}\n"
          f"max |logit diff| vs megatron: {result['max_logit_diff']}")
