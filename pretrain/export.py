"""Export a MiniJoint checkpoint to Hugging Face: <output_dir>/primary and <output_dir>/mini (the mini-model).

    python pretrain/export.py checkpoint=runs/pretrain/checkpoints/iter_0001000 \
        tokenizer=data/default/en/tokenizer output_dir=runs/export [mini=false]
"""
import sys

from minimodel.config import ConfigError, parse_cli
from minimodel.models.minijoint.export import ExportConfig, run

if __name__ == "__main__":  # required: dist_checkpointing starts a spawn-context helper that re-imports this file
    try:
        result = run(parse_cli(ExportConfig, description=__doc__))
    except ConfigError as e:
        print(f"export: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    mini = result["mini"] or "none (the model has no secondary head; build one with pretrain/minipost.py)"
    print(f"primary model: {result['primary']}\nmini-model:    {mini}\n"
          f"max |logit diff| vs megatron: {result['max_logit_diff']}")
