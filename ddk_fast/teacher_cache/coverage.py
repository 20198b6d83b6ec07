"""How many sequences of each domain a run can draw: what a teacher cache must hold so the run never stops
mid-way (``--epochs auto``), and the check training runs before its first step.

The sampler's largest-deficit walk (``ddk_fast/data/packing.py``) restarts its window at every weight update;
within a window of m draws a domain of weight w gets at most ``w m + 2`` sequences. A run of S optimizer
steps draws ``S x batch_size x grad_accum`` sequences (global), so domain d needs at most

    sum over windows j of (w_max(d, j) m_j + 2)  <=  sum over stages s of w_max(d, s) m_s  +  2 J  +  1

where J is the number of weight updates (every ``[ddk] interval`` steps and every curriculum stage start) and
w_max the largest weight the mixing can give (:meth:`~ddk_fast.ddk.DomainMixer.weight_bounds`: DDK's floor
of the other domains and ``max_weight``, a static mix's proportion, 1/N when uniform). With a curriculum each
stage counts with its own active set (a domain is drawn only from its stage on; while it is an earlier
stage's domain the replay floor can raise it to ``replay``); when the stages' domains are ranked at step 0,
every domain is counted as active in every stage. The bound does not depend on the losses, so it holds for
any DDK trajectory, resume or world size.
"""

from __future__ import annotations

import math

from ..config.curriculum import num_stages, stage_lengths
from ..ddk import DomainMixer
from .store import TeacherCacheError


def _mixer(cfg, active: list[int]) -> DomainMixer:
    k = cfg.ddk
    static = [cfg.data.domains[i].weight for i in active] if k.mixing == "static" else None
    return DomainMixer(
        len(active), k.mixing, k.alpha, k.smoothing, static, factor=k.factor,
        factor_temperature=k.factor_temperature, max_weight=max(k.max_weight, 1.0 / len(active)),
        min_weight=k.min_weight if k.min_weight * len(active) < 1 else 0.0,
    )  # fmt: skip


def _stage_sets(cfg, n: int) -> list[tuple[int, list[list[int]] | None]]:
    """(steps, the domains each stage adds, or None when ranked at step 0) per curriculum stage."""
    cur = cfg.curriculum
    lengths = stage_lengths(cfg)
    lengths[-1] += cfg.train.max_steps - sum(lengths)  # the last stage runs to max_steps
    names = [d.name for d in cfg.data.domains]
    if cur.stages and any(st.domains for st in cur.stages):
        added = [[names.index(x) for x in st.domains] for st in cur.stages]
    else:
        added = None
    return [(m, added) for m in lengths] if lengths else [(cfg.train.max_steps, None)]


def update_steps(cfg) -> list[int]:
    """The steps at which the weights are set (every interval from 0, and every curriculum stage start)."""
    steps = set(range(0, cfg.train.max_steps, cfg.ddk.interval))
    if cfg.curriculum.enabled:
        lengths = stage_lengths(cfg)
        steps.update(sum(lengths[:i]) for i in range(len(lengths)))
    return sorted(s for s in steps if s < cfg.train.max_steps)


def sequences_needed(cfg) -> list[int]:
    """Per domain (config order), the most sequences the run in ``cfg`` can draw (module doc)."""
    n = len(cfg.data.domains)
    per_step = cfg.data.batch_size * cfg.train.grad_accum
    slack = 2 * len(update_steps(cfg)) + 1
    if not cfg.curriculum.enabled:
        bounds = _mixer(cfg, list(range(n))).weight_bounds()
        return [math.ceil(b * cfg.train.max_steps * per_step) + slack for b in bounds]
    replay = cfg.curriculum.replay
    stages = _stage_sets(cfg, n)
    sizes = [len(g) for g in _split_sizes(n, num_stages(cfg.curriculum))]
    total = [0.0] * n
    for s, (steps, added) in enumerate(stages):
        if added is not None:
            active = sorted(i for g in added[: s + 1] for i in g)
            earlier = {i for g in added[:s] for i in g}
        else:  # ranked at step 0: which domains are active is unknown, only how many
            active = list(range(sum(sizes[: s + 1])))
            earlier = set(range(n)) if s > 0 else set()
        bounds = _mixer(cfg, active).weight_bounds() if added is not None else None
        for d in range(n):
            if added is not None and d not in active:
                continue
            if bounds is not None:
                b = bounds[active.index(d)]
            elif cfg.ddk.mixing == "static":
                b = 1.0  # proportions over an active set not known until the ranking
            else:
                b = _mixer(cfg, active).weight_bounds()[0]
            if s > 0 and d in earlier:
                b = max(b, replay)
            total[d] += min(1.0, b) * steps * per_step
    return [math.ceil(x) + slack for x in total]


def _split_sizes(n: int, n_stages: int) -> list[range]:
    base, extra = divmod(n, n_stages)
    return [range(base + (s < extra)) for s in range(n_stages)]


def epochs_for(sequences: int, stream_len: int, seq_len: int) -> float:
    """Passes over a domain's stream that ``sequences`` sequences take (rounded up to 0.01)."""
    return math.ceil(100.0 * sequences * seq_len / max(stream_len, 1)) / 100.0


def check_coverage(store, cfg, stream_lens: dict[str, int]) -> None:
    """Refuse, before the first step, a cache that holds fewer sequences of a domain than the run in ``cfg``
    can draw: TeacherCacheError naming every such domain, sequences needed vs held, and how to rebuild."""
    short = []
    need_epochs = 0.0
    for dom, need in zip(cfg.data.domains, sequences_needed(cfg)):
        held = store.sequences(dom.name)
        if held < need:
            e = epochs_for(need, stream_lens[dom.name], cfg.data.seq_len)
            need_epochs = max(need_epochs, e)
            short.append(f"{dom.name!r} needs up to {need} sequences, holds {held}")
    if short:
        raise TeacherCacheError(
            f"teacher cache {store.path} is too small for this run (it could stop mid-way): "
            + "; ".join(short)
            + f". Rebuild it with `python -m ddk_fast.teacher_cache --config <this config> --epochs auto` "
            f"(or --epochs {need_epochs:g})"
        )
