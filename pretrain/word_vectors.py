"""Learn aligned multilingual word vectors from the verse-parallel corpora of a data config (OFA's input).

    python pretrain/word_vectors.py --config configs/word_vectors/default.yaml [dim=200 seed=0 ...]

Writes <output_dir>/vectors.bin (word2vec binary, keys <lang>:<word>) and summary.json with the alignment measured
on held-out verses (bilingual word translation precision@1/@10); see minimodel/ofa/learn.py.
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("word_vectors", __doc__)
