"""End-of-run report: ``report.md``, ``domain_weights.png`` and ``domain_losses.png`` in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

from .trainer import TrainResult


def write_report(
    result: TrainResult, names: list[str], extra: dict | None = None, prompts: dict | None = None
) -> Path:
    """``prompts``: the prompts.json of ``[teacher_prompt] use`` (adds a "teacher prompts" table)."""
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
    test = bool(result.test_losses)
    lines += [
        "",
        "Cross-entropy in nats/token. *val* is the fixed per-domain validation split DDK measures to set "
        "the weights; *test* is a disjoint held-out split of whole documents, scored once after the last "
        "step, that never steers anything: judge the student by the test columns. gap = student - teacher; "
        "weight = the DDK sampling weight used last; tokens = training tokens drawn.",
        "",
        f"| domain | teacher val | student val @ {first['step']} | student val @ {last['step']} | "
        + ("teacher test | student test | test gap " if test else "val gap ")
        + "| final weight | tokens | share |",
        "|---|---|---|---|---|" + ("---|---|" if test else "") + "---|---|---|",
    ]
    for i, name in enumerate(names):
        t = result.teacher_losses[i]
        s0, s1 = first["student_loss"][i], last["student_loss"][i]
        w = f"{final_w[i]:.3f}" if final_w else "-"
        tok = result.tokens_per_domain[i] if result.tokens_per_domain else 0
        if test:
            tt, st = result.teacher_test_losses[i], result.test_losses[i]
            cols = f"{tt:.3f} | {st:.3f} | {st - tt:.3f}"
        else:
            cols = f"{s1 - t:.3f}"
        lines.append(
            f"| {name} | {t:.3f} | {s0:.3f} | {s1:.3f} | {cols} | {w} | {tok:,} | {tok / total_tok:.1%} |"
        )
    if test:
        gaps = [s - t for s, t in zip(result.test_losses, result.teacher_test_losses)]
        lines += ["", f"Test gap: mean {sum(gaps) / len(gaps):.3f}, worst {max(gaps):.3f} nats/token."]
    if result.collapsed_updates:
        lines += [
            "",
            f"**Warning:** {result.collapsed_updates} weight update(s) had a factor giving one domain more "
            'than 0.9 before the floor (the factor collapsed). With `[ddk] factor = "paper"` and large '
            'student-teacher gaps use `factor = "excess_loss"`; with the other factors a larger '
            "`factor_temperature`, a smaller `alpha` or `max_weight` < 1.",
        ]
    lines += _hidden_section(run / "metrics.jsonl", names)
    lines += _onpolicy_section(result.onpolicy, run / "metrics.jsonl", names)
    improved = [n for i, n in enumerate(names) if last["student_loss"][i] < first["student_loss"][i]]
    lines += ["", f"Domains whose student loss improved: {len(improved)}/{len(names)}."]
    if result.weight_history and len(result.weight_history[0]["weights"]) > 1:
        lines.append(_gap_following(_updates_over_active(result), names))
    if result.curriculum:
        lines += ["", *_curriculum_table(result.curriculum)]
    if prompts is not None:
        lines += _prompts_table(prompts, names)
    lines += ["", "![domain weights](domain_weights.png)", "", "![domain losses](domain_losses.png)", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _hidden_section(metrics: Path, names: list[str]) -> list[str]:
    """``[hidden]`` on: the hidden-state loss per domain, averaged over the first and the last tenth of the
    logged steps (one batch is noisy); nothing when the run logged none."""
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "domain_hidden" in r]
    if not rows:
        return []
    k = max(1, len(rows) // 10)

    def mean(part: list[dict], i: int | None) -> str:
        if i is None:
            return f"{sum(r['hidden'] for r in part) / len(part):.4f}"
        seen = [r["domain_hidden"][i] for r in part if r["domain_tokens"][i] > 0]
        return f"{sum(seen) / len(seen):.4f}" if seen else "-"

    head, tail = rows[:k], rows[-k:]
    span = f"steps {head[0]['step']}-{head[-1]['step']} / {tail[0]['step']}-{tail[-1]['step']}"
    lines = [
        "",
        f"Hidden-state loss ([hidden]; the unweighted per-token loss, mean over logged {span}):",
        "",
        "| domain | hidden loss, first | hidden loss, last |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {mean(head, i)} | {mean(tail, i)} |" for i, n in enumerate(names)]
    lines.append(f"| all | {mean(head, None)} | {mean(tail, None)} |")
    return lines


def _onpolicy_section(onpolicy: dict, metrics: Path, names: list[str]) -> list[str]:
    """``[onpolicy]`` on: per domain the tokens the student generated, the KD on them beside the KD on the
    off-policy tokens (means over the first and last tenth of the logged steps, where the domain had tokens),
    and the teacher's CE on the student's continuations of the test prompts."""
    if not onpolicy:
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "domain_onpolicy_kd" in r]
    k = max(1, len(rows) // 10)
    head, tail = rows[:k], rows[-k:]

    def mean(part: list[dict], key: str, count: str, i: int) -> str:
        seen = [r[key][i] for r in part if r[count][i] > 0]
        return f"{sum(seen) / len(seen):.4f}" if seen else "-"

    gen = onpolicy["generated_per_domain"]
    total = max(1, sum(gen))
    cont = onpolicy.get("test_continuation_teacher_ce")
    span = (
        f"steps {head[0]['step']}-{head[-1]['step']} / {tail[0]['step']}-{tail[-1]['step']}" if rows else ""
    )
    lines = [
        "",
        "## On-policy distillation",
        "",
        f"`[onpolicy]` fraction {onpolicy['fraction']:g}: the student continued prompts of "
        f"{onpolicy['prompt_tokens']} tokens with {onpolicy['max_new_tokens']} tokens (T "
        f"{onpolicy['temperature']:g}, top_p {onpolicy['top_p']:g}); those tokens were trained by the KD "
        f"term alone. Generation took {onpolicy['gen_seconds']:.1f} s of this process. KD = the "
        f"divergence per token (no weight, no T²), mean over logged {span}; continuation CE = the "
        "teacher's CE on the student's own continuations of the test prompts (lower: the student writes "
        "what the teacher would).",
        "",
        "| domain | generated tokens | share | KD generated, first | KD generated, last | KD data, first | "
        "KD data, last |" + (" continuation CE (test) |" if cont else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if cont else ""),
    ]
    for i, n in enumerate(names):
        cols = [
            f"{gen[i]:,}",
            f"{gen[i] / total:.1%}",
            mean(head, "domain_onpolicy_kd", "domain_onpolicy_tokens", i),
            mean(tail, "domain_onpolicy_kd", "domain_onpolicy_tokens", i),
            mean(head, "domain_kd", "domain_tokens", i),
            mean(tail, "domain_kd", "domain_tokens", i),
        ]
        if cont:
            cols.append(f"{cont[i]:.3f}")
        lines.append(f"| {n} | " + " | ".join(cols) + " |")
    return lines


def _prompts_table(prompts: dict, names: list[str]) -> list[str]:
    """The teacher prompts of the run: the teacher val/test CE above are measured with these prefixes."""
    lines = [
        "",
        "## Teacher prompts",
        "",
        "The teacher saw these prefixes (`[teacher_prompt] use`); its val and test CE above are measured "
        "with them. Dev CE: the prompt search's dev slice (end of the train split), with and without.",
        "",
        "| domain | prefix | tokens | dev CE with | dev CE without |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        e = prompts["domains"].get(name)
        if e is None:
            lines.append(f"| {name} | (none: not in the file) | 0 | - | - |")
            continue
        text = json.dumps(e.get("prefix", ""))[1:-1].replace("|", "\\|")
        text = f"`{text[:40]}{'...' if len(text) > 40 else ''}`" if e["prefix_ids"] else "(none)"
        dev = e.get("dev_ce")
        base = e.get("no_prefix_ce")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {text} | {len(e['prefix_ids'])} | {fmt(dev)} | {fmt(base)} |")
    return lines


def _gap_following(history: list[dict], names: list[str]) -> str:
    """Did each update give the most weight to the domain with the largest gap (student - teacher CE)?"""
    hits = 0
    for h in history:
        gaps = [s - t for s, t in zip(h["student_loss"], h["teacher_loss"])]
        widest = max(range(len(gaps)), key=gaps.__getitem__)
        hits += widest == max(range(len(gaps)), key=h["weights"].__getitem__)
    return (
        f"Weight updates that gave the largest weight to the domain with the largest gap: "
        f"{hits}/{len(history)} (with smoothing, Eq. 2 carries history, so a domain that just closed "
        "its gap can keep weight for a while)."
    )


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
    for s in result.curriculum[1:]:  # stage boundaries
        ax.axvline(s["start"], color="gray", ls=":", lw=1)
        ax.text(
            s["start"], 1.0, f" stage {s['stage']}", fontsize=7, va="top", transform=ax.get_xaxis_transform()
        )
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    ax.set_title("DDK domain weights")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(result: TrainResult, names: list[str], path: Path) -> None:
    """Left: student (solid) and teacher (dashed) validation CE per domain. Right: the gap student - teacher,
    which is what DDK's factor reacts to (ℓ_S/ℓ_T = exp(gap)); domains at very different loss levels are
    hard to compare on the left alone."""
    plt = _plt()
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in result.eval_history]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        student = [h["student_loss"][i] for h in result.eval_history]
        ax.plot(steps, student, "-o", ms=3, color=c, label=f"{name} student")
        ax.axhline(result.teacher_losses[i], color=c, ls="--", lw=1, label=f"{name} teacher")
        gx.plot(steps, [s - result.teacher_losses[i] for s in student], "-o", ms=3, color=c, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation CE (nats/token)")
    ax.set_title("student (solid) vs teacher (dashed)")
    ax.legend(fontsize=7, ncol=2)
    gx.set_xlabel("step")
    gx.set_ylabel("student - teacher CE (nats/token)")
    gx.set_title("gap per domain")
    gx.axhline(0, color="black", lw=0.8)
    gx.legend(fontsize=7)
    for a in (ax, gx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- [curriculum]
def _curriculum_table(stages: list[dict]) -> list[str]:
    lines = [
        "Curriculum ([curriculum]): each stage adds domains (the earlier ones stay, with at least the replay "
        "share of the mix); steps are metrics.jsonl rows.",
        "",
        "| stage | steps | domains active | T | kd_weight |",
        "|---|---|---|---|---|",
    ]
    for s in stages:
        t2 = " (T² scaled)" if s["scale_by_t2"] else ""
        lines.append(
            f"| {s['stage']} | {s['start'] + 1}-{s['end']} | {', '.join(s['active'] or [])} | "
            f"{s['temperature']:.3g}{t2} | {s['kd_weight']:.3g} |"
        )
    return lines


def _updates_over_active(result: TrainResult) -> list[dict]:
    """The weight updates, with a curriculum's inactive domains (weight 0) out of the largest-gap question:
    their gaps read as -inf (an update could not weight them)."""
    if not result.curriculum:
        return result.weight_history
    return [
        dict(h, student_loss=[s if w > 0 else float("-inf") for s, w in zip(h["student_loss"], h["weights"])])
        for h in result.weight_history
    ]
