"""Step 4: plug learned target-language embeddings into the primary model or a task model.

    python adapt/plug.py embeddings=runs/adapt/minijoint/sw model=runs/export/primary output_dir=runs/plugged/sw
    python adapt/plug.py embeddings=runs/adapt/minijoint/sw model=runs/task/xnli primary_model=runs/export/primary \
        output_dir=runs/task/xnli-sw

Writes a Hugging Face model directory with the target tokenizer; refuses mismatched shapes, the wrong tokenizer,
or a primary model the embeddings were not learned for.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain script run from anywhere

from minimodel.adaptation.plug import PlugConfig, PlugError, plug  # noqa: E402
from minimodel.config import parse_cli  # noqa: E402
from minimodel.manifest import ManifestError  # noqa: E402


def main() -> int:
    cfg = parse_cli(PlugConfig, description=__doc__)
    try:
        out = plug(cfg)
    except (PlugError, ManifestError, FileNotFoundError) as e:
        print(f"plug: {e}", file=sys.stderr)
        return 2
    print(f"plug: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
