"""End-of-run report: ``report.md``, ``domain_weights.png`` and ``domain_losses.png`` in the run directory."""

from __future__ import annotations

from pathlib import Path

from .trainer import TrainResult


def write_report(result: TrainResult, names: list[str], extra: dict | None = None) -> Path:
    run = result.run_dir
    _plot_weights(result, names, run / "domain_weights.png")
    _plot_losses(result, names, run / "domain_losses.png")
    first, last = result.eval_history[0], result.eval_history[-1]
    final_w = result.weight_history[-1]["weights"] if result.weight_history else []
    total_tok = max(1, sum(result.tokens_per_domain))
    lines = [
        f"# ddk_fast run report: `{run}`",
        "",
        f"- steps: {result.step}; wall time {result.wall_seconds:.1f} s; "
        f"throughput {result.tokens_per_second:,.0f} training tokens/s",
        f"- skipped non-finite steps: {result.bad_steps}",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [
        "",
        "Validation cross-entropy (nats/token) on the fixed per-domain validation split; gap = student - teacher "
        "at the end; weights are the DDK sampling weights used last; tokens are training tokens drawn.",
        "",
        f"| domain | teacher | student @ step {first['step']} | student @ step {last['step']} | change | gap "
        "| final weight | tokens | share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, name in enumerate(names):
        t = result.teacher_losses[i]
        s0, s1 = first["student_loss"][i], last["student_loss"][i]
        w = f"{final_w[i]:.3f}" if final_w else "-"
        tok = result.tokens_per_domain[i] if result.tokens_per_domain else 0
        lines.append(f"| {name} | {t:.3f} | {s0:.3f} | {s1:.3f} | {s1 - s0:+.3f} | {s1 - t:.3f} | {w} | "
                     f"{tok:,} | {tok / total_tok:.1%} |")
    improved = [n for i, n in enumerate(names) if last["student_loss"][i] < first["student_loss"][i]]
    lines += ["", f"Domains whose student loss improved: {len(improved)}/{len(names)}.", "",
              "![domain weights](domain_weights.png)", "", "![domain losses](domain_losses.png)", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_weights(result: TrainResult, names: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    hist = result.weight_history
    if hist:
        steps = [h["step"] for h in hist] + [result.step]
        for i, name in enumerate(names):
            ws = [h["weights"][i] for h in hist]
            ax.step(steps, ws + ws[-1:], where="post", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    ax.set_title("DDK domain weights")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(result: TrainResult, names: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in result.eval_history]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        ax.plot(steps, [h["student_loss"][i] for h in result.eval_history], "-o", ms=3, color=c,
                label=f"{name} student")
        ax.axhline(result.teacher_losses[i], color=c, ls="--", lw=1, label=f"{name} teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title("Per-domain validation loss: student (solid) vs teacher (dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
