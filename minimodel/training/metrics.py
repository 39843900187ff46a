"""Where both training loops send their per-step metrics, and the loss curve drawn from them.

`MetricSink.log` is called once per step with everything that step measured (training, and evaluation when it ran):
the row goes to `<output_dir>/metrics.jsonl` (the whole curve across resumes, one row per step) and to the tracker
(MLflow); `amend` adds to the row of a step already logged (an evaluation a stop signal left to the next launch).
Only rank 0 writes; on other ranks the sink does nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from minimodel.files import write_text_atomic


class MetricSink:
    def __init__(self, path: str | Path, tracker=None, *, rank0: bool):
        self.path = Path(path)
        self.tracker = tracker  # anything with log_metrics(dict, step); None: metrics.jsonl only
        self.rank0 = rank0
        self.history: list[dict] = []  # this launch's rows

    def resume(self, step: int) -> None:
        """Drop rows past `step`, the step a run resumes from (a launch killed after its last checkpoint wrote
        them; they are redone), so the file never holds a step twice. Step 0: start a new file."""
        if not self.rank0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            keep = [row for row in _rows(self.path) if row["step"] <= step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.rank0:
            return
        row = {"step": step, **metrics}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def amend(self, metrics: dict[str, float], step: int) -> None:
        """Add `metrics` to the row of `step`, logged by an earlier launch (a new row if it has none)."""
        if not self.rank0:
            return
        rows = _rows(self.path) if self.path.is_file() else []
        if rows and rows[-1]["step"] == step:  # resume(step) made it the last row
            logged = metrics.keys() <= rows[-1].keys()  # by a launch killed before its next checkpoint
            rows[-1].update(metrics)
        else:
            logged = False
            rows.append({"step": step, **metrics})
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        if self.tracker is not None and not logged:
            self.tracker.log_metrics(metrics, step=step)


def read_metrics(path: str | Path) -> dict[int, dict]:
    """step -> metrics from a metrics.jsonl; a step logged again replaces the earlier row."""
    by_step: dict[int, dict] = {}
    for row in _rows(Path(path)):
        by_step.setdefault(row["step"], {}).update(row)
    return dict(sorted(by_step.items()))


def _rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (a process killed mid-append; on a shared filesystem it may
    read as NULs) is dropped: its step came after the last checkpoint, and the resumed run logs it again."""
    lines = [line for line in path.read_text().splitlines() if line]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # damage before the end is no interrupted append: not dropped silently
                raise
    return rows


def plot_losses(metrics_path: str | Path, out_path: str | Path, curves: dict[str, str], *, title: str,
                x: str = "step", x_label: str = "step") -> Path:
    """The loss curves {metric key: label} of a metrics.jsonl against `x` (a metric key or "step"); evaluation
    metrics (eval/...) are drawn with markers."""
    # pyplot with the Agg backend (no display on compute nodes) only when drawing: importing this module must not
    # switch the backend of whoever imports it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in curves.items():
        points = [(step if x == "step" else row[x], row[key]) for step, row in rows.items() if key in row]
        if points:
            ax.plot(*zip(*points), "o--" if key.startswith("eval/") else "-", label=label, markersize=4)
    ax.set_xlabel(x_label)
    ax.set_ylabel("MLM loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
