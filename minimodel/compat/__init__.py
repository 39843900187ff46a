"""Narrow compatibility layers for environments the stock libraries do not target (see cpu.py)."""
