"""``report.md`` and plots of a comparison (:mod:`ddk_fast.compare`), from its ``results.json`` alone."""

from __future__ import annotations

import statistics
from pathlib import Path

from .stats import (
    GOAL_MARGIN,
    by_arm,
    by_pair,
    goal_check,
    interval_text,
    onpolicy_intervals,
    paired,
    paired_interval,
    summary_lines,
)


def _signed(xs: list[float]) -> str:
    return ", ".join(f"{d:+.4f}" for d in xs)


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def grid_lines(results: dict) -> list[str]:
    """What ``best_fixed`` chose per seed (on val), and the grid's compute."""
    rows = [r for r in results["runs"] if r["arm"] == "best_fixed"]
    if not rows:
        return []
    lines = [
        "",
        "## best_fixed: the grid, chosen on val",
        "",
        "Each seed trains every grid member; the member with the lowest worst **val** gap (ties: mean val "
        "gap) is scored on test. Grid compute: "
        f"{rows[0]['grid_tokens']:,} tokens per seed, {len(rows[0]['grid'])}x one arm's "
        f"{rows[0]['tokens']:,}.",
        "",
        "| seed | chosen | " + " | ".join(f"{g['arm']} worst val gap" for g in rows[0]["grid"]) + " |",
        "|---|---|" + "---|" * len(rows[0]["grid"]),
    ]
    for r in sorted(rows, key=lambda r: r["seed"]):
        lines.append(
            f"| {r['seed']} | {r['chosen']} | "
            + " | ".join(f"{g['val_worst_gap']:.4f}" for g in r["grid"])
            + " |"
        )
    return lines


def oscillation_lines(results: dict) -> list[str]:
    if "ddk_nosmooth" not in by_arm(results) or "ddk" not in by_arm(results):
        return []
    osc = paired(results, "ddk_nosmooth", "ddk", "weight_oscillation")
    return [
        "",
        f"- ddk_nosmooth − ddk, mean |Δw| per weight update, per seed: {_signed(osc)} "
        f"({sum(d > 0 for d in osc)}/{len(osc)} seeds oscillate more without smoothing).",
    ]


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


def onpolicy_lines(results: dict) -> list[str]:
    """The on-policy arms: the on-policy measure per arm and its reference points, the paired differences
    against each arm's control, and the cost (seconds per run); nothing when no arm was measured."""
    runs = by_arm(results)
    measured = {a: list(p.values()) for a, p in runs.items() if all("cont_ce_mean" in r for r in p.values())}
    if not measured:
        return []
    lam = results["setting"].get("onpolicy_fraction", {})
    op = results["setting"].get("onpolicy_measure", {})
    lines = [
        "",
        "## On-policy arms",
        "",
        "On-policy measure: the teacher's mean CE (nats/token) on the student's own continuations of the "
        f"test prompts (the first {op.get('prompt_tokens', '?')} tokens of each test sequence, "
        f"{op.get('max_new_tokens', '?')} new tokens, temperature {op.get('temperature', 1.0)}, top_p "
        f"{op.get('top_p', 1.0)}, noise keyed by the prompt: every student sees the same). Lower = the "
        "student writes what the teacher would. Every arm is measured from its final checkpoint. Seconds "
        "per run: wall time of the training loop (machine shared with other jobs: a rough cost).",
        "",
        "| arm | λ | continuation CE (mean ± sd over seeds) | "
        + " | ".join(results["domains"])
        + " | s/run |",
        "|---|---|---|" + "---|" * len(results["domains"]) + "---|",
    ]
    for arm, rs in measured.items():
        dom = [_ms([r["cont_ce"][i] for r in rs]) for i in range(len(results["domains"]))]
        secs = [r["wall_seconds"] for r in rs if "wall_seconds" in r]
        cost = f"{statistics.mean(secs):.0f}" if secs else "-"
        lines.append(
            f"| {arm} | {lam.get(arm, 0)} | {_ms([r['cont_ce_mean'] for r in rs])} | "
            + " | ".join(dom)
            + f" | {cost} |"
        )
    refs = [r["onpolicy_measure"] for r in results.get("references", []) if "onpolicy_measure" in r]
    if refs:
        lines.append(
            f"| untrained student | - | {_ms([r['student']['cont_ce_mean'] for r in refs])} | "
            + " | ".join(
                _ms([r["student"]["cont_ce"][i] for r in refs]) for i in range(len(results["domains"]))
            )
            + " | - |"
        )
        lines.append(
            f"| teacher's own continuations | - | {_ms([r['teacher']['cont_ce_mean'] for r in refs])} | "
            + " | ".join(
                _ms([r["teacher"]["cont_ce"][i] for r in refs]) for i in range(len(results["domains"]))
            )
            + " | - |"
        )
    intervals = results.get("onpolicy_intervals") or onpolicy_intervals(results)
    if intervals:
        lines += [
            "",
            "Paired by seed, on-policy arm − its off-policy control (negative = the on-policy arm lower), "
            "mean [95 % paired-t interval]:",
            "",
            "| on-policy − control | n | Δ mean test gap | Δ worst test gap | Δ continuation CE |",
            "|---|---|---|---|---|",
        ]
        for (treat, base), m in by_pair(intervals).items():
            cells = [
                f"{interval_text(m[k])} ({m[k]['verdict']})" if k in m else "-"
                for k in ("mean_gap", "worst_gap", "cont_ce_mean")
            ]
            n = max(r["n"] for r in m.values())
            lines.append(f"| {treat} − {base} | {n} | " + " | ".join(cells) + " |")
    return lines


def akd_lines(results: dict) -> list[str]:
    """Paired per-seed differences of the AKD arms (nothing when the comparison has none)."""
    runs = by_arm(results)
    pairs = [(a, b) for a, b in _AKD_PAIRS if a in runs and b in runs]
    if not pairs:
        return []
    lines = [
        "",
        "## AKD arms, paired by seed (negative = the first arm better; mean [95 % paired-t interval])",
        "",
        "| arm − base | Δ mean gap per seed | Δ mean gap | Δ worst gap per seed | Δ worst gap |",
        "|---|---|---|---|---|",
    ]
    for a, b in pairs:
        dm, dw = paired(results, a, b, "mean_gap"), paired(results, a, b, "worst_gap")
        im, iw = paired_interval(dm), paired_interval(dw)
        lines.append(
            f"| {a} − {b} | {_signed(dm)} | {interval_text(im)}, {im['verdict']} | {_signed(dw)} | "
            f"{interval_text(iw)}, {iw['verdict']} |"
        )
    return lines


def goal_lines(results: dict) -> list[str]:
    """The goal of a DDK factor (``stats.goal_check``): the upper ends it reads, and whether all hold."""
    rows = goal_check(results)
    if not rows:
        return []
    head = [f"{c['metric'].replace('_gap', '')} vs {c['baseline']}" for c in rows[0]["checks"]]
    lines = [
        "",
        f"## Goal: no worse than a fixed mix (upper end of every 95 % interval <= +{GOAL_MARGIN} nats)",
        "",
        "| arm | " + " | ".join(head) + " | met |",
        "|---|" + "---|" * (len(head) + 1),
    ]
    for r in rows:
        his = " | ".join("n/a" if c["hi"] is None else f"{c['hi']:+.4f}" for c in r["checks"])
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['arm']} | {his} | {met} |")
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
        "tokens; CE is measured on the **test** split (whole documents in their own files when the config "
        "names test_files: neither the teacher nor the tokenizer trained on them; DDK never sees them); "
        "gap = student − teacher test CE (nats/token; the plain teacher's, also for arms whose teacher "
        "sees prompts), mean gap weighted by test tokens, worst = largest.",
        "",
        *summary_lines(results),
        "",
        "Teacher test CE per domain: "
        + ", ".join(f"{d} {t:.3f}" for d, t in zip(domains, results["teacher_test_ce"]))
        + "; untrained student (the shared init) test gaps: "
        + "; ".join(
            f"seed {ref['seed']} mean {ref['mean_gap']:.4f} worst {ref['worst_gap']:.4f}"
            for ref in results.get("references", [])
        )
        + ".",
    ]
    lines += goal_lines(results)
    lines += grid_lines(results)
    lines += [
        "",
        "## Every seed",
        "",
        "| arm | seed | mean gap | worst gap | final weights | commit |",
        "|---|---|---|---|---|---|",
    ]
    for arm, per_seed in runs.items():
        for seed, r in sorted(per_seed.items()):
            w = r["weights"][-1][1:] if r["weights"] else []
            lines.append(
                f"| {arm} | {seed} | {r['mean_gap']:.4f} | {r['worst_gap']:.4f} | "
                f"{' '.join(f'{x:.2f}' for x in w)} | {r.get('commit', '')} |"
            )
    lines += oscillation_lines(results)
    lines += akd_lines(results)
    lines += onpolicy_lines(results)
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
