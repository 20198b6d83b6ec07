"""The ``[curriculum]`` section (progressive distillation; the runtime is ``ddk_fast/training/curriculum.py``)
and its checks: stage lengths and domain lists are resolved and validated here, before any model or data is
touched, so a bad table is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .fields import TEMPERATURE_RANGE, _nonneg_int, _opt

POCL_STAGES = 4
POCL_TEMPERATURES = (1.0, 4.0 / 3.0, 5.0 / 3.0, 2.0)


INHERIT_TEMPERATURE = 0.0  # a stage's temperature = 0: the [loss] temperature
INHERIT_KD_WEIGHT = -1.0  # a stage's kd_weight = -1: the [loss] kd_weight


@dataclass
class StageConfig:
    """One curriculum stage (``[[curriculum.stages]]``): its length and the domains it adds."""

    steps: int = _opt(0, "length of the stage in optimizer steps (set steps or fraction)", *_nonneg_int)
    fraction: float = _opt(
        0.0,
        "length of the stage as a fraction of train.max_steps (rounded down; set steps or fraction)",
        lambda v: 0 <= v <= 1,
        "a number in [0, 1]",
    )
    domains: list[str] = _opt(
        [],
        "names of the [[data.domains]] this stage adds (stages are cumulative); empty in every stage = "
        "ranked by [curriculum] order",
    )
    temperature: float = _opt(
        INHERIT_TEMPERATURE,
        "KD temperature T of this stage (0 = the [loss] temperature)",
        lambda v: v == INHERIT_TEMPERATURE or TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
        f"0 (inherit [loss] temperature) or a number in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}]",
    )
    kd_weight: float = _opt(
        INHERIT_KD_WEIGHT,
        "weight of the KD term in this stage (-1 = the [loss] kd_weight)",
        lambda v: v == INHERIT_KD_WEIGHT or v >= 0,
        "-1 (inherit [loss] kd_weight) or a number >= 0",
    )


@dataclass
class CurriculumConfig:
    """Progressive distillation: stages that add domains (easiest first), each with its own T / kd_weight."""

    preset: Literal["none", "pocl"] = _opt(
        "none",
        "pocl: 4 equal stages, T = 1, 4/3, 5/3, 2 with T^2 scaling, domains ranked by `order` "
        "(stages must be empty); none: the `stages` table or `num_stages` (neither = no curriculum)",
    )
    order: Literal["teacher_ce", "student_ce", "config"] = _opt(
        "teacher_ce",
        "ranking of the domains when no stage lists domains, easiest (lowest CE at step 0) first: the "
        "teacher's or the initial student's validation CE, or the [[data.domains]] order",
    )
    num_stages: int = _opt(
        0, "equal-length stages over the ranked domains, without a `stages` table (0 = off)", *_nonneg_int
    )
    replay: float = _opt(
        0.2,
        "while stage s > 1 is active, the domains added by stages 1..s-1 together get at least this "
        "share of the sampling weight",
        lambda v: 0 <= v < 1,
        "a number in [0, 1)",
    )
    stages: list[StageConfig] = _opt(
        [],
        "the stages, as [[curriculum.stages]] tables (the last one runs to train.max_steps)",
    )

    @property
    def enabled(self) -> bool:
        return self.preset != "none" or bool(self.stages) or self.num_stages > 0


def num_stages(cur) -> int:
    if cur.preset == "pocl":
        return POCL_STAGES
    return len(cur.stages) if cur.stages else cur.num_stages


def stage_lengths(cfg) -> list[int]:
    """The nominal length of every stage (the last one is extended to max_steps). Raises ConfigError."""
    cur, total = cfg.curriculum, cfg.train.max_steps
    if not cur.stages:
        n = num_stages(cur)
        if total < n:
            raise ConfigError("train.max_steps", total, f"at least {n} (one step per curriculum stage)")
        return [total // n] * n
    lengths, used, fractions = [], 0, 0.0
    for i, st in enumerate(cur.stages):
        key = f"curriculum.stages[{i}]"
        if st.steps and st.fraction:
            raise ConfigError(
                f"{key}.steps", st.steps, "steps or fraction, not both", f"fraction = {st.fraction}"
            )
        if not st.steps and not st.fraction:
            raise ConfigError(f"{key}.steps", st.steps, "steps >= 1 or a fraction > 0 of train.max_steps")
        if st.steps:
            n, name, value = st.steps, "steps", st.steps
        else:
            n, name, value = math.floor(round(st.fraction * total, 6)), "fraction", st.fraction
            fractions += st.fraction
            if fractions > 1 + 1e-9:
                raise ConfigError(
                    f"{key}.fraction", value, "fractions of train.max_steps summing to at most 1"
                )
            if n < 1:
                raise ConfigError(
                    f"{key}.fraction",
                    value,
                    f"a fraction giving at least 1 of train.max_steps ({total}) steps",
                )
        if used + n > total:
            raise ConfigError(
                f"{key}.{name}",
                value,
                f"at most {total - used} steps (train.max_steps {total} minus the {used} of the stages "
                "before)",
            )
        lengths.append(n)
        used += n
    return lengths


def check_curriculum(cfg) -> None:
    """The ``[curriculum]`` cross-checks (an enabled curriculum): ConfigError naming the key and value."""
    cur, names = cfg.curriculum, [d.name for d in cfg.data.domains]
    if cur.preset == "pocl":
        if cur.stages:
            raise ConfigError(
                "curriculum.stages",
                [dataclasses.asdict(s) for s in cur.stages],
                'no [[curriculum.stages]] with preset = "pocl" (the preset defines its 4 stages)',
            )
        if cur.num_stages not in (0, POCL_STAGES):
            raise ConfigError("curriculum.num_stages", cur.num_stages, '0 or 4 with preset = "pocl"')
    elif cur.stages and cur.num_stages:
        raise ConfigError(
            "curriculum.num_stages",
            cur.num_stages,
            "0 with [[curriculum.stages]] (their count is the stages')",
        )
    stage_lengths(cfg)
    listed = [bool(st.domains) for st in cur.stages]
    if any(listed):
        if not all(listed):
            i = listed.index(False)
            raise ConfigError(
                f"curriculum.stages[{i}].domains",
                [],
                "domain names in every stage or in none (none: ranked by [curriculum] order)",
            )
        seen: dict[str, int] = {}
        for i, st in enumerate(cur.stages):
            for name in st.domains:
                if name not in names:
                    raise ConfigError(
                        f"curriculum.stages[{i}].domains",
                        name,
                        f"a [[data.domains]] name ({', '.join(names)})",
                    )
                if name in seen:
                    raise ConfigError(
                        f"curriculum.stages[{i}].domains",
                        name,
                        f"a domain not already added by stage {seen[name] + 1}",
                    )
                seen[name] = i
        missing = [n for n in names if n not in seen]
        if missing:
            raise ConfigError(
                "curriculum.stages",
                missing,
                "every [[data.domains]] name in some stage (a domain in none would never be trained)",
            )
    else:
        n = num_stages(cur)
        if n > len(names):
            key, value = (
                ("curriculum.preset", cur.preset)
                if cur.preset == "pocl"
                else ("curriculum.stages", n)
                if cur.stages
                else ("curriculum.num_stages", n)
            )
            raise ConfigError(
                key,
                value,
                f"at most {len(names)} stages, the number of domains (each stage adds one at least)",
            )
    for i, st in enumerate(cur.stages):
        if st.kd_weight == 0 and cfg.loss.ce_weight == 0:
            raise ConfigError(
                f"curriculum.stages[{i}].kd_weight",
                st.kd_weight,
                "> 0 with [loss] ce_weight = 0 (the loss is 0)",
            )
    if cfg.ddk.mixing == "static":
        for i, dom in enumerate(cfg.data.domains):
            if dom.weight <= 0:
                raise ConfigError(
                    f"data.domains[{i}].weight",
                    dom.weight,
                    "a weight > 0 with [curriculum] and static mixing (the mix renormalises over the "
                    "active domains)",
                )
