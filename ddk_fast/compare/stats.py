"""The statistics of a comparison: per-arm gaps over seeds, and paired differences with 95 % intervals.

Each seed shares one student initialisation, one sampler seed and one test set between the arms, so arms are
compared **paired by seed**: d_s = metric(treatment, s) − metric(baseline, s) for the seeds both have, and

    mean d̄ = Σ d_s / n,   sd = sqrt(Σ (d_s − d̄)² / (n − 1)),   95 % interval = d̄ ± t_{0.975, n−1} · sd / √n

(Student's t over seeds: the paired t interval). The verdict reads the interval only: ``lower`` when it lies
below 0 (the treatment's gap is smaller), ``higher`` when above 0, otherwise ``no detectable difference``.
With 5 seeds t_{0.975, 4} = 2.776: a difference needs |d̄| > 1.24 sd to be detected.
"""

from __future__ import annotations

import math
import statistics

from .arms import ARM_TABLE

# Arms whose effect is measured (the treatments) and what each is measured against (the baselines). A pair is
# reported when both arms are in a comparison.
TREATMENTS = (
    "ddk",
    "ddk_paper",
    "ddk_nosmooth",
    "ddk_nocap",
    "ddk_minimax",
    "akd_hidden",
    "akd_curriculum",
    "akd_prompts",
    "akd",
    "akd_ddk",
)
BASELINES = ("uniform", "static", "temperature", "best_fixed", "ce")
# The goal of a DDK factor (issue 20 item 5): its worst gap no worse than each fixed mix's, its mean gap no
# worse than uniform's, each read as the upper end of the paired 95 % interval <= GOAL_MARGIN nats
GOAL_WORST_AGAINST = ("uniform", "static", "temperature")
GOAL_MEAN_AGAINST = ("uniform",)
GOAL_MARGIN = 0.01
METRICS = ("mean_gap", "worst_gap")

# t_{0.975, df} for df = 1..30 (two-sided 95 %); beyond, the normal quantile with a first-order correction.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def paired_interval(diffs: list[float]) -> dict:
    """Mean, sd and 95 % paired-t interval of per-seed differences (``lo``/``hi`` None with one seed)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("diffs: expected at least one paired difference")
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "verdict": "one seed: no interval"}
    sd = statistics.stdev(diffs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "lo": mean - half,
        "hi": mean + half,
        "verdict": verdict(mean - half, mean + half),
    }


def verdict(lo: float, hi: float) -> str:
    """What a 95 % interval of treatment − baseline supports (negative = the treatment's gap is lower)."""
    if hi < 0:
        return "lower"
    if lo > 0:
        return "higher"
    return "no detectable difference"


def by_arm(results: dict) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in results["runs"]:
        out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def paired(results: dict, arm: str, base: str, key: str) -> list[float]:
    """Per-seed ``arm − base`` of ``key`` over the seeds both have (pairs share the student init)."""
    runs = by_arm(results)
    a, b = runs.get(arm, {}), runs.get(base, {})
    return [a[s][key] - b[s][key] for s in results["seeds"] if s in a and s in b]


def paired_intervals(results: dict) -> list[dict]:
    """Every treatment − baseline pair present, for the mean and the worst gap: the ``intervals`` of
    results.json (``treatment``, ``baseline``, ``metric``, ``diffs`` per seed, ``n``,
    ``mean``, ``sd``, ``lo``, ``hi``, ``verdict``)."""
    runs = by_arm(results)
    out = []
    for treat, base in [(t, b) for t in TREATMENTS for b in BASELINES]:
        if treat not in runs or base not in runs:
            continue
        for metric in METRICS:
            diffs = paired(results, treat, base, metric)
            if diffs:
                out.append(
                    {"treatment": treat, "baseline": base, "metric": metric, "diffs": diffs,
                     **paired_interval(diffs)}
                )  # fmt: skip
    return out


def by_pair(intervals: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """Interval rows grouped as ``{(treatment, baseline): {metric: row}}``, in their order."""
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for row in intervals:
        pairs.setdefault((row["treatment"], row["baseline"]), {})[row["metric"]] = row
    return pairs


def goal_check(results: dict) -> list[dict]:
    """Per DDK arm present (``ddk*`` treatments): each interval the goal reads (``GOAL_*``), its upper end,
    and ``met`` (every upper end <= ``GOAL_MARGIN``; None with fewer than two seeds)."""
    iv = by_pair(results.get("intervals") or [])
    out = []
    for treat in (t for t in TREATMENTS if t.startswith("ddk")):
        need = [(b, "worst_gap") for b in GOAL_WORST_AGAINST] + [(b, "mean_gap") for b in GOAL_MEAN_AGAINST]
        rows = [iv.get((treat, b), {}).get(m) for b, m in need]
        if any(r is None for r in rows):
            continue
        his = [r["hi"] for r in rows]
        met = None if any(h is None for h in his) else all(h <= GOAL_MARGIN for h in his)
        out.append({"arm": treat, "checks": [{"baseline": b, "metric": m, "hi": h} for (b, m), h in
                                               zip(need, his)], "met": met})  # fmt: skip
    return out


# on-policy arm − its control (``Arm.control``): the test gaps, and the on-policy measure (the teacher's CE
# on the student's continuations of the test prompts, ``compare/onpolicy.py``)
ONPOLICY_METRICS = ("mean_gap", "worst_gap", "cont_ce_mean")


def onpolicy_intervals(results: dict) -> list[dict]:
    """Every on-policy arm − its control present (paired by seed), for the mean and the worst test gap and
    the on-policy measure: the ``onpolicy_intervals`` of results.json (rows as :func:`paired_intervals`)."""
    runs = by_arm(results)
    out = []
    for arm in runs:
        spec = ARM_TABLE.get(arm)
        if spec is None or spec.onpolicy == 0 or spec.control not in runs:
            continue
        for metric in ONPOLICY_METRICS:
            diffs = _paired_present(results, arm, spec.control, metric)
            if diffs:
                out.append(
                    {"treatment": arm, "baseline": spec.control, "metric": metric, "diffs": diffs,
                     **paired_interval(diffs)}
                )  # fmt: skip
    return out


def _paired_present(results: dict, arm: str, base: str, key: str) -> list[float]:
    runs = by_arm(results)
    a, b = runs.get(arm, {}), runs.get(base, {})
    return [
        a[s][key] - b[s][key]
        for s in results["seeds"]
        if s in a and s in b and a[s].get(key) is not None and b[s].get(key) is not None
    ]


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def interval_text(row: dict) -> str:
    """``+0.0123 [-0.0040, +0.0286]`` (mean [95 % interval]); the mean alone with one seed."""
    if row["lo"] is None:
        return f"{row['mean']:+.4f}"
    return f"{row['mean']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}]"


def summary_lines(results: dict) -> list[str]:
    """The two tables ``compare`` prints and ``report.md`` opens with: per arm, mean ± sd over seeds of the
    mean, worst and per-domain test gap; then every treatment − baseline difference with its interval."""
    runs = by_arm(results)
    domains = results["domains"]
    n = len(results["seeds"])
    lines = [
        f"Test gap (student − teacher CE, nats/token), mean ± sd over {n} seed(s):",
        "",
        "| arm | mean gap | worst gap | " + " | ".join(domains) + " |",
        "|---|---|---|" + "---|" * len(domains),
    ]
    for arm, per_seed in runs.items():
        rs = list(per_seed.values())
        dom = [_ms([r["gap"][i] for r in rs]) for i in range(len(domains))]
        name = f"{arm} ({', '.join(sorted({r['chosen'] for r in rs}))})" if "chosen" in rs[0] else arm
        lines.append(
            f"| {name} | {_ms([r['mean_gap'] for r in rs])} | {_ms([r['worst_gap'] for r in rs])} | "
            + " | ".join(dom)
            + " |"
        )
    intervals = results.get("intervals") or paired_intervals(results)
    if intervals:
        lines += [
            "",
            "Paired by seed, treatment − baseline (negative: the treatment's gap is lower), mean "
            "[95 % paired-t interval]:",
            "",
            "| treatment − baseline | Δ mean gap | verdict | Δ worst gap | verdict |",
            "|---|---|---|---|---|",
        ]
        for (treat, base), m in by_pair(intervals).items():
            mg, wg = m["mean_gap"], m["worst_gap"]
            lines.append(
                f"| {treat} − {base} | {interval_text(mg)} | {mg['verdict']} | {interval_text(wg)} | "
                f"{wg['verdict']} |"
            )
    return lines
