"""Composable sparse fine-tuning (LT-SFT): which parameters may change (select.py), the SFT file and its use on a
model (file.py), and training one inside the DeepSpeed loop (train.py)."""
