"""The pipeline report: zero-shot quality per language and method against the adaptation compute spent, and the
compute each method needed to reach 95% / 99% / 100% of standard adaptation's final quality.

    python evaluate/report.py --config configs/evaluate/report.yaml parent_run_id=<pipeline run id>

Writes report.json, report.md and compute_vs_quality.png to output_dir and attaches them to the parent run.
"""
from minimodel.cli import run_stage
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.report import ReportConfig, report

if __name__ == "__main__":
    paths = run_stage(ReportConfig, report, __doc__, EvaluationError)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
