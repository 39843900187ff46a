"""BiStil (bilingual distillation): a small model for one language pair, distilled from the adapted multilingual
model. Vocabulary trimming (trim.py), the student and its initialisation (student.py), the distillation losses
(loss.py)."""
