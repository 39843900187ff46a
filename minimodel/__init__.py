"""minimodel: mini-model adaptation of multilingual masked language models (see README.md)."""
from minimodel.compat import cpu as _cpu
from minimodel.compat import jit_builds as _jit_builds

# Before any stage imports megatron-core or DeepSpeed, whose CPU-only warnings are emitted at import.
_cpu.quiet()
_jit_builds.use_environment_dir()  # inherited by every launcher and rank this process starts
