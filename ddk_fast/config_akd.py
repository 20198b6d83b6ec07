"""The AKD config sections (``[hidden]``; see ``config.py`` for the format) and their cross-checks.

Kept apart from ``config.py`` so that section stays readable; :class:`~ddk_fast.config.RunConfig` holds them
and :func:`~ddk_fast.config.build_config` calls :func:`akd_checks` before any model or data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config_fields import _nonneg, _opt
from .errors import ConfigError


def _pairs_ok(v) -> bool:
    return all(len(p) == 2 and min(p) >= 0 for p in v) and len({tuple(p) for p in v}) == len(v)


@dataclass
class HiddenConfig:
    """Hidden-state distillation (AKD): match mapped decoder layers' outputs of student and teacher."""

    weight: float = _opt(0.0, "weight of the hidden-state loss added to the KD objective (0 = off)", *_nonneg)
    loss: Literal["mse", "cosine"] = _opt(
        "mse", "mse: mean squared error per token; cosine: 1 - cosine similarity per token"
    )
    layers: Literal["uniform", "pairs"] = _opt(
        "uniform",
        "uniform: student layer j <-> teacher layer round((j+1)*L_T/L_S) - 1 (every student layer); "
        "pairs: the explicit [student, teacher] pairs of `pairs`",
    )
    pairs: list[list[int]] = _opt(
        [],
        'the [student, teacher] decoder-layer pairs used with layers = "pairs", e.g. [[0, 1], [1, 3]]',
        _pairs_ok,
        "distinct [student, teacher] pairs of layer indices >= 0",
    )
    projection: Literal["linear", "none"] = _opt(
        "linear",
        "linear: a learned Linear(H_s, H_t) per mapped pair when the widths differ (trained with the "
        "adapters, kept in checkpoints, not in final/); none: compare directly (widths must match)",
    )
    export_projections: bool = _opt(
        False,
        "also write the learned projections to final/hidden_projections.safetensors (+ .json: the layer "
        "pairs and widths), e.g. to continue hidden-state distillation from the final student",
    )


def akd_checks(cfg) -> None:
    """Checks across AKD keys (and the rest of the run): ConfigError naming the key and value."""
    h, m = cfg.hidden, cfg.model
    if h.layers == "pairs" and not h.pairs:
        raise ConfigError(
            "hidden.pairs", h.pairs, 'at least one [student, teacher] pair with layers = "pairs"'
        )
    if h.layers == "uniform" and h.pairs:
        raise ConfigError("hidden.pairs", h.pairs, 'empty with layers = "uniform" (or set layers = "pairs")')
    if h.weight > 0 and m.teacher_cache:
        raise ConfigError(
            "hidden.weight",
            h.weight,
            "0 with [model] teacher_cache (the cache holds no teacher hidden states)",
        )
