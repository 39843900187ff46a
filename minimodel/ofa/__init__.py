"""OFA (Liu et al., 2023) in this project: aligned multilingual word vectors (read from files, or learned here from
verse-parallel text), the OFA initialisation of new subword embeddings from them, and factorised embeddings."""
