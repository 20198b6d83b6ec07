"""``report.md`` and plots of a comparison (:mod:`ddk_fast.compare`), from its ``results.json`` alone."""

from __future__ import annotations

import statistics
from pathlib import Path

_BASELINES = ("ddk_paper", "ddk_nosmooth", "uniform", "static", "ce")


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _signed(xs: list[float]) -> str:
    return ", ".join(f"{d:+.4f}" for d in xs)


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


def verdicts(results: dict) -> list[str]:
    """The comparison's goals, each checked per seed against the numbers (never only on means)."""
    runs = by_arm(results)
    lines = []
    if "ddk" not in runs:
        return lines
    for base in ("uniform", "static"):
        if base not in runs:
            continue
        worst = paired(results, "ddk", base, "worst_gap")
        mean = paired(results, "ddk", base, "mean_gap")
        w_ok = sum(d < 0 for d in worst)
        m_ok = sum(d <= 0 for d in mean)
        lines.append(
            f"- ddk vs {base}: worst-domain gap lower in {w_ok}/{len(worst)} seeds "
            f"(Δ {_signed(worst)}); mean gap no worse in {m_ok}/{len(mean)} seeds "
            f"(Δ {_signed(mean)})."
        )
    if "ce" in runs:
        kd_arms = [a for a in runs if a != "ce"]
        beats = {a: sum(d < 0 for d in paired(results, a, "ce", "mean_gap")) for a in kd_arms}
        n = len(paired(results, kd_arms[0], "ce", "mean_gap")) if kd_arms else 0
        lines.append(
            "- KD arms vs ce (mean gap lower, seeds): "
            + ", ".join(f"{a} {k}/{n}" for a, k in beats.items())
            + "."
        )
    if "ddk_nosmooth" in runs:
        osc = paired(results, "ddk_nosmooth", "ddk", "weight_oscillation")
        lines.append(
            f"- ddk_nosmooth oscillates more than ddk in {sum(d > 0 for d in osc)}/{len(osc)} seeds "
            f"(Δ mean |Δw| {_signed(osc)})."
        )
    return lines


# (arm, base) pairs of the AKD arms: each part against plain KD, all parts against plain KD and against
# DDK, and what DDK adds on top of AKD
_AKD_PAIRS = (
    ("akd_hidden", "uniform"),
    ("akd_curriculum", "uniform"),
    ("akd_prompts", "uniform"),
    ("akd", "uniform"),
    ("akd", "ddk"),
    ("akd_ddk", "akd"),
    ("akd_ddk", "ddk"),
    ("akd_ddk", "uniform"),
)


def akd_lines(results: dict) -> list[str]:
    """Paired per-seed differences of the AKD arms (nothing when the comparison has none)."""
    runs = by_arm(results)
    pairs = [(a, b) for a, b in _AKD_PAIRS if a in runs and b in runs]
    if not pairs:
        return []
    lines = [
        "",
        "## AKD arms, paired by seed (negative = the first arm better)",
        "",
        "| arm − base | Δ mean gap per seed | Δ worst gap per seed | mean lower | worst lower |",
        "|---|---|---|---|---|",
    ]
    for a, b in pairs:
        dm, dw = paired(results, a, b, "mean_gap"), paired(results, a, b, "worst_gap")
        lines.append(
            f"| {a} − {b} | {_signed(dm)} | {_signed(dw)} | {sum(d < 0 for d in dm)}/{len(dm)} | "
            f"{sum(d < 0 for d in dw)}/{len(dw)} |"
        )
    return lines


def write_compare_report(results: dict, out: Path) -> Path:
    runs = by_arm(results)
    domains = results["domains"]
    s = results["setting"]
    lines = [
        f"# Does {'DDK (or AKD)' if any(a.startswith('akd') for a in runs) else 'DDK'} help? "
        f"Setting `{s['name']}`{' (quick)' if s.get('quick') else ''}",
        "",
        f"- {s['date']}, {s['machine']}, commit `{s['commit']}`; {len(results['seeds'])} seed(s) "
        f"{results['seeds']}; training time of the runs "
        f"{sum(r.get('wall_seconds', 0) for r in results['runs']) / 60:.1f} min (this invocation "
        f"{s['wall_seconds'] / 60:.1f} min; finished runs are reused)",
        f"- command: `{s['command']}`",
        "- every arm starts from the same student initialisation per seed and trains on the same number of "
        "tokens; CE is measured on the **test** split (whole documents held out, never used by DDK); "
        "gap = student − teacher test CE (nats/token; the plain teacher's, also for arms whose teacher "
        "sees prompts), mean gap weighted by test tokens, worst = largest.",
        "",
        "| arm | mean gap (mean ± std) | worst gap (mean ± std) | "
        + " | ".join(f"{d} gap" for d in domains)
        + " | weight oscillation | tokens |",
        "|---|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for arm, per_seed in runs.items():
        rs = list(per_seed.values())
        dom = [statistics.mean(r["gap"][i] for r in rs) for i in range(len(domains))]
        lines.append(
            f"| {arm} | {_ms([r['mean_gap'] for r in rs])} | {_ms([r['worst_gap'] for r in rs])} | "
            + " | ".join(f"{g:.4f}" for g in dom)
            + f" | {statistics.mean(r['weight_oscillation'] for r in rs):.4f} | {rs[0]['tokens']:,} |"
        )
    teacher = results["teacher_test_ce"]
    lines.append("| *teacher test CE* | | | " + " | ".join(f"*{t:.3f}*" for t in teacher) + " | | |")
    for ref in results.get("references", []):
        lines.append(
            f"| *{ref['arm']} (seed {ref['seed']})* | {ref['mean_gap']:.4f} | {ref['worst_gap']:.4f} | "
            + " | ".join(f"{g:.4f}" for g in ref["gap"])
            + " | | |"
        )
    lines += [
        "",
        "## Every seed",
        "",
        "| arm | seed | mean gap | worst gap | final weights |",
        "|---|---|---|---|---|",
    ]
    for arm, per_seed in runs.items():
        for seed, r in sorted(per_seed.items()):
            w = r["weights"][-1][1:] if r["weights"] else []
            lines.append(
                f"| {arm} | {seed} | {r['mean_gap']:.4f} | {r['worst_gap']:.4f} | "
                f"{' '.join(f'{x:.2f}' for x in w)} |"
            )
    if "ddk" in runs:
        lines += [
            "",
            "## Paired by seed: ddk − baseline (negative = ddk better)",
            "",
            "| baseline | Δ mean gap per seed | Δ worst gap per seed |",
            "|---|---|---|",
        ]
        for base in _BASELINES:
            if base in runs:
                dm, dw = paired(results, "ddk", base, "mean_gap"), paired(results, "ddk", base, "worst_gap")
                lines.append(f"| {base} | {_signed(dm)} | {_signed(dw)} |")
        lines += ["", "## Against the goals", "", *verdicts(results)]
    lines += akd_lines(results)
    _plot_gaps(results, out / "gaps.png")
    _plot_weights(results, out / "weights.png")
    lines += ["", "![per-domain test gap](gaps.png)", "", "![weights](weights.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_gaps(results: dict, path: Path) -> None:
    """Grouped bars: per-domain test gap of each arm, mean over seeds, error bar = std over seeds."""
    plt = _plt()
    runs = by_arm(results)
    domains = results["domains"]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(domains)), 4))
    width = 0.8 / max(1, len(runs))
    for k, (arm, per_seed) in enumerate(runs.items()):
        rs = list(per_seed.values())
        means = [statistics.mean(r["gap"][i] for r in rs) for i in range(len(domains))]
        errs = [statistics.stdev(r["gap"][i] for r in rs) if len(rs) > 1 else 0 for i in range(len(domains))]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(domains))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=arm)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("test gap: student − teacher CE (nats/token)")
    ax.set_title(f"{results['setting']['name']}: per-domain test gap (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_weights(results: dict, path: Path) -> None:
    """Weight trajectories of the arms whose mix changes (DDK, curriculum) for the first seed, one panel
    per arm."""
    plt = _plt()
    runs = by_arm(results)
    arms = [a for a in ("ddk", "ddk_paper", "ddk_nosmooth", "akd_curriculum", "akd_ddk") if a in runs]
    fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(4.5 * max(1, len(arms)), 3.6), squeeze=False)
    seed = results["seeds"][0]
    for ax, arm in zip(axes[0], arms):
        r = runs[arm].get(seed)
        if r and r["weights"]:
            steps = [w[0] for w in r["weights"]]
            for i, name in enumerate(results["domains"]):
                ax.step(steps, [w[1 + i] for w in r["weights"]], where="post", label=name)
        ax.set_title(f"{arm} (seed {seed})")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sampling weight")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
