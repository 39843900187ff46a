"""MiniPost: an aligned mini-model from any pretrained masked LM (paper step 1b)."""
