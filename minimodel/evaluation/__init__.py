"""Evaluation: task data (tasks), metrics, task models (models, features, scoring), step 3 (finetune), step 4
(zero_shot) and the pipeline report (report)."""

from minimodel.errors import UserError


class EvaluationError(UserError):
    """A problem with the user's input (data, models, tokenizers, runs); the message names it and the fix."""
