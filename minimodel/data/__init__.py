"""The data pipeline: corpora (sources), clean (verse cleaning), tokenizer (SentencePiece -> Hugging Face),
indexed (megatron-core .bin/.idx), prepare (the data stage), mlm (masked-LM training examples)."""
