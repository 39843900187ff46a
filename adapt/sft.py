"""LT-SFT step 2: a sparse language fine-tuning (SFT) of the primary model per target language, by MLM on the target
text in the primary's own vocabulary (minimodel/sft/language.py; the SFT format: minimodel/sft/file.py).

    deepspeed [--num_gpus N | --hostfile H] adapt/sft.py primary_model=<export>/primary data_dir=<data> \
        target_langs=[sw] sft.k_proportion=0.01 sft.full_steps=10000 sft.sparse_steps=10000 [key=value ...]

Exit status: 0 when every selected language finished, 75 when a signal stopped it after checkpointing (run the same
command again to resume), 1 when a language failed (see <output_dir>/summary.json), 2 on a config error.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("lang_sft", __doc__)
