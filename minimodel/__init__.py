"""minimodel: mini-model adaptation of multilingual masked language models (see README.md)."""
from minimodel.compat import cpu as _cpu

# Before any stage imports megatron-core or DeepSpeed, whose CPU-only warnings are emitted at import.
_cpu.quiet()
