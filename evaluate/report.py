"""The pipeline report: zero-shot quality per language and method against the adaptation compute spent, and the
compute each method needed to reach 95% / 99% / 100% of standard adaptation's final quality; the unadapted primary
(method none) as a horizontal line, with a warning for each method that ends below it.

    python evaluate/report.py --config configs/evaluate/report.yaml pipeline_dir=<the pipeline's output_dir>

Reads the pipeline's results from its output directory; writes report.json, report.md and compute_vs_quality.png
to output_dir (with tracking, also attached to the pipeline's MLflow run).
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("report", __doc__)
