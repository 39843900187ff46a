"""The pipeline report: zero-shot quality per language and method against the adaptation compute spent, and the
compute each method needed to reach 95% / 99% / 100% of standard adaptation's final quality.

    python evaluate/report.py --config configs/evaluate/report.yaml parent_run_id=<pipeline run id>

Writes report.json, report.md and compute_vs_quality.png to output_dir and attaches them to the parent run.
"""
import logging
import sys

from minimodel.config import parse_cli
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.report import ReportConfig, report

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_cli(ReportConfig, description=__doc__)
    try:
        paths = report(cfg)
    except EvaluationError as e:
        print(f"report: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for kind, path in paths.items():
        print(f"{kind}: {path}")
