"""Progressive distillation (``[curriculum]``; AKD, and POCL, arXiv 2506.05695): pure logic, no models.

A curriculum is a table of stages; stage s adds domains to the training mix (stages are cumulative: stage s
trains on the domains of stages 1..s) and may set its own KD temperature and ``kd_weight``.

**Steps.** Stage s covers the optimizer steps ``start_s <= step < start_{s+1}``, where ``step`` counts the
steps done before it (so ``metrics.jsonl`` rows ``start_s + 1 .. start_{s+1}``). A stage's length is
``steps``, or ``fraction`` of ``[train] max_steps`` rounded down (fractions summing to 1 never exceed the
run); ``num_stages`` and the pocl preset give ``max_steps // S`` each. The **last stage runs to
max_steps** whatever its length says: lengths that do not cover the run lengthen the last stage, lengths
that exceed it are a ConfigError.

**Domains.** Listed per stage, or, when no stage lists any, ranked at step 0 by ``[curriculum] order``:
the teacher's (``teacher_ce``; from a teacher cache, the CE its writer measured) or the initial student's
(``student_ce``) per-domain validation CE, lowest (easiest) first, ties in config order; ``config`` is the
``[[data.domains]]`` order. The ranking is split into S consecutive groups, the first ``N mod S`` one
domain larger (``numpy.array_split``), easiest group first.

**Weights** (:meth:`Curriculum.weights`). The run's mixing policy (:class:`~ddk_fast.ddk.DomainMixer`:
DDK, uniform or static) runs on the *active* domains only: DDK's factor, smooth update, uniform floor
``(1 - alpha) / n_active`` and ``max_weight`` are those of the active subset (``max_weight`` is raised to
``1 / n_active`` while fewer domains are active than it allows); uniform and static renormalise over it.
Inactive domains get weight exactly 0, which the sampler's largest-deficit walk never draws. Then the
**replay floor**: while stage s >= 2 is active, let E be the domains added by stages 1..s-1 and A those of
stage s; when ``sum(w[E]) < replay``, E's weights are scaled to sum to ``replay`` and A's to
``1 - replay`` (the proportions inside each group kept). It is applied after the cap, so it wins over it.

**Boundaries.** The schedule updates the weights at every DDK interval and at every stage start (so the
sampler switches to the new active set at exactly ``start_s``; the student is re-measured there, one extra
validation pass when ``start_s`` is not a multiple of ``[ddk] interval``). Eq. 2's smoothing restarts at a
stage start from r_0 over the new active set (the added domains have no previous weight) and continues from
the stage's own weights until the next stage. Stage and weights are functions of the step and of the
all-reduced validation losses, so every rank derives the same ones without another collective.

**Loss.** A stage's ``temperature`` (0 = inherit) and ``kd_weight`` (-1 = inherit) replace the ``[loss]``
values for its steps (:meth:`Curriculum.loss_config`); pocl also sets ``scale_by_t2 = true``. With
``[model] teacher_cache`` the sparse-teacher loss tempers the cached top-k at the stage's T, the same
approximation as a ``[loss] temperature`` != 1 there (exact when k = V).

**State.** The resolved table, ranked domains included, is part of the checkpoint (:meth:`state_dict`);
resuming with another table is refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config.curriculum import (
    INHERIT_KD_WEIGHT,
    INHERIT_TEMPERATURE,
    POCL_TEMPERATURES,
    check_curriculum,
    num_stages,
    stage_lengths,
)
from ..ddk import DomainMixer

__all__ = ["Curriculum", "Stage", "check_curriculum", "num_stages", "stage_lengths"]


@dataclass
class Stage:
    index: int  # 1-based
    start: int  # first step (steps done before it)
    end: int  # exclusive; the last stage ends at max_steps
    domains: list[int] | None  # indices of the domains this stage adds; None until ranked
    temperature: float | None = None  # None: the [loss] temperature
    kd_weight: float | None = None  # None: the [loss] kd_weight
    scale_by_t2: bool | None = None  # None: the [loss] scale_by_t2


# ----------------------------------------------------------------------------------------------- resolution
def split_ranked(order: list[int], n_stages: int) -> list[list[int]]:
    """``order`` (easiest first) in ``n_stages`` consecutive groups, the first ``len % n`` one larger."""
    base, extra = divmod(len(order), n_stages)
    groups, i = [], 0
    for s in range(n_stages):
        size = base + (s < extra)
        groups.append(list(order[i : i + size]))
        i += size
    return groups


# ----------------------------------------------------------------------------------------------- weights
def subset_weights(mixer, active: list[int], student, teacher, restart: bool) -> list[float]:
    """``mixer``'s policy over the ``active`` domains (the others get 0), from r_0 when ``restart``."""
    n = len(active)
    static = None if mixer.static_weights is None else [mixer.static_weights[i] for i in active]
    previous = [] if restart or not mixer.weights else [mixer.weights[i] for i in active]
    sub = DomainMixer(
        n,
        mixer.mode,
        mixer.alpha,
        mixer.smoothing,
        static,
        factor=mixer.factor,
        factor_temperature=mixer.factor_temperature,
        max_weight=max(mixer.max_weight, 1.0 / n),
        weights=previous,
        min_weight=mixer.min_weight if mixer.min_weight * n < 1 else 0.0,
        history=[] if restart or not mixer.history else [_restrict(mixer.history[-1], active)],
    )
    w = sub.update(-1, [student[i] for i in active], [teacher[i] for i in active])
    full = [0.0] * mixer.num_domains
    share = [0.0] * mixer.num_domains  # the factor before the floor, for the collapse check and history
    for i, x, f in zip(active, w, sub.factor_share or [0.0] * n):
        full[i], share[i] = float(x), float(f)
    mixer.factor_share = share if sub.factor_share else []
    return full


def _restrict(entry: dict, active: list[int]) -> dict:
    """A history entry over the ``active`` domains only (what the minimax factor reads its progress from)."""
    return {k: [entry[k][i] for i in active] for k in ("weights", "student_loss", "teacher_loss")}


def replay_floor(weights: list[float], earlier: list[int], added: list[int], replay: float) -> list[float]:
    """Scale the ``earlier`` domains up to ``replay`` of the mix in total (and the ``added`` ones down to
    ``1 - replay``) when they have less; proportions inside each group kept."""
    w = list(weights)
    old = math.fsum(w[i] for i in earlier)
    new = math.fsum(w[i] for i in added)
    if not earlier or not added or old >= replay or new <= 0:
        return w
    for i in earlier:
        w[i] = w[i] * replay / old if old > 0 else replay / len(earlier)
    for i in added:
        w[i] = w[i] * (1.0 - replay) / new
    return w


# ----------------------------------------------------------------------------------------------- the table
class Curriculum:
    """The resolved stage table of a run (``enabled`` False: no stages, and nothing here is used)."""

    def __init__(self, cfg, names: list[str]):
        cur = cfg.curriculum
        self.names = list(names)
        self.enabled = cur.enabled
        self.order = cur.order
        self.replay = cur.replay
        self.stages: list[Stage] = []
        if not self.enabled:
            return
        lengths = stage_lengths(cfg)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        ends = starts[1:] + [cfg.train.max_steps]
        for i, (a, b) in enumerate(zip(starts, ends)):
            st = cur.stages[i] if cur.stages else None
            stage = Stage(
                i + 1, a, b, [self.names.index(n) for n in st.domains] if st and st.domains else None
            )
            if cur.preset == "pocl":
                stage.temperature, stage.scale_by_t2 = POCL_TEMPERATURES[i], True
            elif st is not None:
                stage.temperature = None if st.temperature == INHERIT_TEMPERATURE else st.temperature
                stage.kd_weight = None if st.kd_weight == INHERIT_KD_WEIGHT else st.kd_weight
            self.stages.append(stage)
        if self.needs_ranking and self.order == "config":
            self.rank(None, None)

    @property
    def needs_ranking(self) -> bool:
        return self.enabled and self.stages[0].domains is None

    def rank(self, teacher_losses, student_losses) -> list[int]:
        """Fill the stages' domains from the step-0 validation CE (``order``); returns the ranking."""
        key = {"teacher_ce": teacher_losses, "student_ce": student_losses, "config": None}[self.order]
        ids = range(len(self.names))
        order = list(ids) if key is None else sorted(ids, key=lambda i: (float(key[i]), i))
        for stage, group in zip(self.stages, split_ranked(order, len(self.stages))):
            stage.domains = group
        return order

    def stage_at(self, step: int) -> Stage:
        """The stage that trains step ``step`` (counted from 0)."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.start <= step:
                current = stage
        return current

    def is_boundary(self, step: int) -> bool:
        """A stage (not the first) starts at ``step``."""
        return self.enabled and any(s.start == step for s in self.stages[1:])

    def active(self, stage: Stage) -> list[int]:
        return sorted(i for s in self.stages[: stage.index] for i in s.domains)

    def num_active(self, step: int) -> int:
        if not self.enabled or self.needs_ranking:
            return len(self.names)
        return len(self.active(self.stage_at(step)))

    def weights(self, mixer, step: int, student, teacher) -> list[float]:
        """The domain weights from ``step`` on (see the module docstring), recorded in ``mixer.history``."""
        stage = self.stage_at(step)
        full = subset_weights(mixer, self.active(stage), student, teacher, restart=step == stage.start)
        if stage.index > 1:
            earlier = self.active(self.stages[stage.index - 2])
            full = replay_floor(full, earlier, stage.domains, self.replay)
        return mixer.record(step, full, student, teacher)

    def loss_config(self, stage: Stage, base):
        """``base`` (a LossConfig) with the stage's overrides."""
        over = {
            "temperature": stage.temperature,
            "kd_weight": stage.kd_weight,
            "scale_by_t2": stage.scale_by_t2,
        }
        return dataclasses.replace(base, **{k: v for k, v in over.items() if v is not None})

    def overrides_kd_weight(self) -> bool:
        return any(s.kd_weight is not None for s in self.stages)

    def metrics(self, stage: Stage, loss) -> dict:
        """The ``metrics.jsonl`` fields of a step of ``stage`` trained with ``loss`` (its LossConfig)."""
        row = {"stage": stage.index, "temperature": loss.temperature}
        if self.overrides_kd_weight():
            row["kd_weight"] = loss.kd_weight
        return row

    def table(self, base=None) -> list[dict]:
        """One dict per stage (``base``: the [loss] config, to resolve inherited values)."""
        out = []
        for s in self.stages:
            loss = self.loss_config(s, base) if base is not None else s
            out.append(
                {
                    "stage": s.index,
                    "start": s.start,
                    "end": s.end,
                    "domains": None if s.domains is None else [self.names[i] for i in s.domains],
                    "active": None if s.domains is None else [self.names[i] for i in self.active(s)],
                    "temperature": loss.temperature,
                    "kd_weight": loss.kd_weight,
                    "scale_by_t2": loss.scale_by_t2,
                }
            )
        return out

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stages": self.table(), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        """Restore the ranked domains; ValueError when the checkpoint's table is not this config's."""
        saved = state["stages"]
        mine = self.table()
        keys = ("stage", "start", "end", "temperature", "kd_weight", "scale_by_t2")
        same = len(saved) == len(mine) and all(all(a[k] == b[k] for k in keys) for a, b in zip(saved, mine))
        for a, b in zip(saved, mine):
            same = same and (b["domains"] is None or a["domains"] == b["domains"])
        if not same or state.get("order") != self.order:
            raise ValueError(f"the [curriculum] stages differ from the checkpoint's: {saved} here {mine}")
        for stage, s in zip(self.stages, saved):
            if s["domains"] is not None:
                stage.domains = [self.names.index(n) for n in s["domains"]]
