"""Step 0: corpora -> cleaned verses -> train/valid split -> tokenizers -> megatron-core indexed datasets.

    python pretrain/prepare_data.py --config configs/data/default.yaml [key.sub=value ...]
"""
from minimodel.cli import run_stage
from minimodel.data.prepare import DataConfig, prepare_data

if __name__ == "__main__":
    run_stage(DataConfig, prepare_data, __doc__)
