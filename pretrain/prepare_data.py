"""Step 0: corpora -> cleaned verses -> train/valid split -> tokenizers -> megatron-core indexed datasets.

    python pretrain/prepare_data.py --config configs/data/default.yaml [key.sub=value ...]
"""
import logging
import sys

from minimodel.config import ConfigError, parse_cli
from minimodel.data.prepare import DataConfig, prepare_data

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("minimodel").setLevel(logging.INFO)
    cfg = parse_cli(DataConfig, description=__doc__)
    try:
        prepare_data(cfg)
    except ConfigError as e:  # bad input found while reading it (e.g. a malformed JSONL line)
        print(f"data error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
