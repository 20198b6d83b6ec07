"""Models: loading teachers and (QLoRA / LoRA / full) students (``loading.py``), the distillation objective
(``objective.py``), per-domain evaluation (``evaluation.py``) and hidden-state distillation
(``hidden.py``)."""
