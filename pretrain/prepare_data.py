"""Step 0: corpora -> cleaned verses -> train/valid split -> tokenizers -> megatron-core indexed datasets.

    python pretrain/prepare_data.py --config configs/data/default.yaml [key.sub=value ...]
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("data", __doc__)
