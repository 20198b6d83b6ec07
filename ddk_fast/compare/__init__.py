"""Does DDK help? The comparison harness (``python -m ddk_fast.compare``; see ``__main__.py``).

``arms.py``: the arms (``ARM_TABLE``) and a run's identity; ``runs.py``: training and scoring the arms;
``stats.py``: paired differences and their 95 % intervals; ``report.py``: the report and plots of
``results.json``; ``pilot.py``: choosing a DDK setting on val with pilot seeds.
"""

from .arms import (
    AKD_ARMS,
    ARM_TABLE,
    ARMS,
    BEST_FIXED_GRID,
    arm_overrides,
    fixed_mix,
    quick_overrides,
    run_key,
    split_compare_table,
)
from .runs import best_fixed_row, compare, run_arm, score, summarise, weight_oscillation
from .stats import BASELINES, TREATMENTS, paired_interval, paired_intervals, t975

__all__ = [
    "AKD_ARMS", "ARM_TABLE", "ARMS", "BASELINES", "BEST_FIXED_GRID", "TREATMENTS", "arm_overrides",
    "best_fixed_row", "compare", "fixed_mix", "paired_interval", "paired_intervals", "quick_overrides",
    "run_arm", "run_key", "score", "split_compare_table", "summarise", "t975", "weight_oscillation",
]  # fmt: skip
