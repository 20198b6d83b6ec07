"""Does DDK help? The comparison harness (``python -m ddk_fast.compare``; see ``__main__.py``).

``arms.py``: the arms and a run's identity; ``runs.py``: training and scoring the arms; ``report.py``: the
report and plots of ``results.json``.
"""

from .arms import AKD_ARMS, ARMS, arm_overrides, quick_overrides, run_key, split_compare_table
from .runs import compare, run_arm, score, summarise, weight_oscillation

__all__ = [
    "AKD_ARMS", "ARMS", "arm_overrides", "compare", "quick_overrides", "run_arm", "run_key", "score",
    "split_compare_table", "summarise", "weight_oscillation",
]  # fmt: skip
