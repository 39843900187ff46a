"""Step 4: zero-shot transfer. Score task models plugged with target-language embeddings on the target languages'
test sets (with the target tokenizers), and the source-language task model as the upper reference.

    python evaluate/zero_shot.py --config configs/evaluate/zero_shot/verse_class_tiny.yaml method=minijoint \
        source_model_dir=runs/evaluate/verse_class_tiny/model \
        'targets=[{lang: ny, model_dir: runs/plugged/ny, tokenizer: data/tiny/ny/tokenizer}]'

method=none scores the unadapted baseline: 'targets=[{lang: ny}]', read by source_model_dir with its own tokenizer.

One MLflow run per language (tags stage=evaluate, method, target_lang); <output_dir>/metrics.json.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("zero_shot", __doc__)
