"""Choose a DDK setting on val, never on test: ``python -m ddk_fast.compare.pilot --config
examples/compare_large_gap.toml [--seeds 100,101] [--candidates tau0.25,tau0.5,...] [--out DIR]``.

Trains each candidate setting of the ``ddk`` arm (and ``uniform``, the reference) on *pilot seeds* that no
reported comparison uses (default 100 and 101: other student initialisations and sampler streams), and reads
the gaps on the **val** split at the end of each run. The test split is never read here.

Rule (declared before the pilot ran): among the candidates whose mean val gap (unweighted over domains, mean
over pilot seeds) is at most uniform's + 0.01 nats, the one with the lowest worst val gap (mean over pilot
seeds) wins; ties go to the earlier candidate in ``CANDIDATES``. Writes ``pilot.json`` and ``pilot.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from ..config import apply_overrides, build_config, tomllib
from ..errors import ConfigError
from .arms import merge_sections, split_compare_table
from .runs import run_arm, shared_student_init, val_gaps

# label -> (arm, the [ddk] keys it sets on top of the arm); the default factor: excess_loss, τ 0.5, α 0.5
CANDIDATES: dict[str, tuple[str, dict]] = {
    "tau0.25": ("ddk", {"factor_temperature": 0.25}),
    "tau0.5": ("ddk", {"factor_temperature": 0.5}),
    "tau1.0": ("ddk", {"factor_temperature": 1.0}),
    "tau0.5-alpha0.8": ("ddk", {"factor_temperature": 0.5, "alpha": 0.8}),
    "paper": ("ddk_paper", {}),
    # factor variants (issue 20 item 5), added after the first pilot, under the same rule
    "tau0.5-alpha1.0": ("ddk", {"factor_temperature": 0.5, "alpha": 1.0}),
    "minimax-alpha0.8": ("ddk_minimax", {"factor_temperature": 0.5, "alpha": 0.8}),
}
MEAN_MARGIN = 0.01  # nats: a candidate's mean val gap may exceed uniform's by at most this


def choose(table: dict[str, dict]) -> str:
    """The rule of the module docstring over ``table[label] = {"mean_val_gap", "worst_val_gap"}`` (which
    holds ``uniform`` and the candidates, in order)."""
    ref = table["uniform"]["mean_val_gap"]
    ok = [c for c in table if c != "uniform" and table[c]["mean_val_gap"] <= ref + MEAN_MARGIN]
    if not ok:
        ok = [c for c in table if c != "uniform"]
    return min(ok, key=lambda c: table[c]["worst_val_gap"])


def pilot(raw: dict, comp: dict, seeds: list[int], labels: list[str], work: Path) -> dict:
    per: dict[str, list[list[float]]] = {lab: [] for lab in ["uniform", *labels]}
    for seed in seeds:
        seeded = shared_student_init(raw, seed, work)
        for lab in per:
            arm, keys = ("uniform", {}) if lab == "uniform" else CANDIDATES[lab]
            row = run_arm(merge_sections(seeded, {"ddk": keys}), arm, seed, work, comp["akd"])
            per[lab].append(val_gaps(row))
            g = per[lab][-1]
            print(f"pilot seed {seed} {lab:>16}: mean val gap {sum(g) / len(g):.4f}, worst {max(g):.4f}")
    table = {
        lab: {
            "mean_val_gap": statistics.mean(sum(g) / len(g) for g in gaps),
            "worst_val_gap": statistics.mean(max(g) for g in gaps),
            "per_seed": gaps,
        }
        for lab, gaps in per.items()
    }
    rule = __doc__.split("Rule ")[1].split(" Writes")[0]
    candidates = {k: CANDIDATES[k] for k in labels}
    return {
        "setting": comp["name"],
        "seeds": seeds,
        "candidates": candidates,
        "rule": rule,
        "table": table,
        "chosen": choose(table),
    }


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# DDK pilot on val: setting `{result['setting']}`, pilot seeds {result['seeds']}",
        "",
        "| candidate | mean val gap | worst val gap |",
        "|---|---|---|",
    ]
    for lab, r in result["table"].items():
        lines.append(f"| {lab} | {r['mean_val_gap']:.4f} | {r['worst_val_gap']:.4f} |")
    lines += ["", f"Rule {result['rule']}", "", f"**Chosen: {result['chosen']}**", ""]
    (out / "pilot.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m ddk_fast.compare.pilot", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/compare_large_gap.toml")
    p.add_argument("--seeds", default="100,101", help="pilot seeds (never the reported ones)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"of {','.join(CANDIDATES)}")
    p.add_argument("--out", help="folder for pilot.json / pilot.md (default: the work folder)")
    p.add_argument("--work", help="folder for the runs (default: runs/pilot-<name>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        raw, comp = split_compare_table(
            apply_overrides(tomllib.loads(Path(args.config).read_text()), args.set)
        )
        build_config(raw)
        labels = args.candidates.split(",")
        for lab in labels:
            if lab not in CANDIDATES:
                raise ConfigError("--candidates", lab, f"one of {', '.join(CANDIDATES)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        reported = set(comp["seeds"])
        if reported & set(seeds):
            raise ConfigError(
                "--seeds", seeds, f"pilot seeds disjoint from the reported seeds {sorted(reported)}"
            )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work or f"runs/pilot-{comp['name']}")
    write(pilot(raw, comp, seeds, labels, work), Path(args.out) if args.out else work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
