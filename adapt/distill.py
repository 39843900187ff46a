"""BiStil phase 1: distil a small bilingual student (source + one target language) from the primary model and, for a
language the primary's vocabulary lacks, the primary with the target embeddings plugged in (minimodel/bistil/).

    deepspeed [--num_gpus N | --hostfile H] adapt/distill.py teacher_model=<export>/primary \
        target_teacher_model=<plugged>/sw data_dir=<data> target_langs=[sw] student.layer_ratio=2 [key=value ...]
    # the reference's teachers: the primary with lt_sft's language SFTs (adapt/sft.py) applied
    deepspeed adapt/distill.py method=bistil@lt_sft teacher_model=<export>/primary teacher_sft=<lang_sft>/en/sft \
        target_teacher_sft=<lang_sft>/sw/sft data_dir=<data> target_langs=[sw] [key=value ...]

Exit status: 0 when every selected language finished, 75 when a signal stopped it after checkpointing (run the same
command again to resume), 1 when a language failed (see <output_dir>/summary.json), 2 on a config error.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("distill", __doc__)
