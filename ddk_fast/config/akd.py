"""The AKD config sections ``[hidden]`` and ``[teacher_prompt]`` (``[curriculum]`` is in ``curriculum.py``)
and the checks across them: :class:`~ddk_fast.config.run.RunConfig` holds them and
:func:`~ddk_fast.config.run.cross_checks` calls :func:`akd_checks` before any model or data is touched.

The prompts file of ``[teacher_prompt] use`` is read and checked by ``ddk_fast.prompts`` (its owner) when the
run opens its teacher, still before any model weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .curriculum import check_curriculum
from .fields import _nonneg, _nonneg_int, _opt, _pos_int


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


DEFAULT_TEMPLATES = ["The following is {domain} text:\n", "Here is an example of {domain}:\n"]
MAX_FEWSHOT = 5


@dataclass
class TeacherPromptConfig:
    """Teacher prompt search (AKD): a per-domain prefix shown to the teacher only (``ddk_fast.prompts``)."""

    use: str = _opt(
        "",
        "a prompts.json written by `python -m ddk_fast.prompts`: the teacher sees each domain's prefix "
        "(training, and its val/test CE); empty = off",
    )
    templates: list[str] = _opt(
        DEFAULT_TEMPLATES,
        "search: the candidate templates explored first; {domain} is replaced by the domain name",
        lambda v: all(t.strip() for t in v),
        "a list of non-empty strings",
    )
    budget: int = _opt(
        24, "search: candidate evaluations per domain (teacher passes over the dev slice)", *_pos_int
    )
    dev_sequences: int = _opt(
        8,
        "search: sequences of the dev slice a candidate is scored on (the last documents of the domain's "
        "train split; never val or test)",
        *_pos_int,
    )
    max_fewshot: int = _opt(
        3,
        f"search: few-shot prefixes of k = 1..max_fewshot train documents (0 = none; at most {MAX_FEWSHOT})",
        lambda v: 0 <= v <= MAX_FEWSHOT,
        f"an integer in [0, {MAX_FEWSHOT}]",
    )
    max_prefix_tokens: int = _opt(
        128, "search: longest prefix in tokens (longer few-shot prefixes keep their last tokens)", *_pos_int
    )
    seed: int = _opt(0, "search: seed of the swap order and the few-shot document pool", *_nonneg_int)
    out: str = _opt(
        "", "search: where the CLI writes prompts.json (+ prompts.md); empty = <output.dir>/prompts.json"
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
            "0 with [model] teacher_cache (a cache holds no teacher decoder layers)",
        )
    p = cfg.teacher_prompt
    if p.use and m.teacher_cache:
        raise ConfigError(
            "teacher_prompt.use",
            p.use,
            "empty with [model] teacher_cache (the cache holds the plain teacher's top-k; write the cache "
            "without prefixes, or train online)",
        )
    if cfg.curriculum.enabled:
        check_curriculum(cfg)
