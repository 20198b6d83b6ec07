"""Does DDK help? ``python -m ddk_fast.compare --config examples/compare.toml [--seeds 0,1,2] [--quick]
[--out DIR] [--arms ddk,uniform] [--set section.key=value ...]``.

Trains several *arms* from one shared student initialisation per seed, at an equal token budget, each arm a
normal run of the library's own loop (:class:`~ddk_fast.training.trainer.Trainer`), and scores every
student on the ``test`` split, which no arm ever steers on or is chosen on. The arms are the rows of
``ARM_TABLE`` (``arms.py``): ``ddk``, ``ddk_paper``, ``ddk_nosmooth``, ``uniform``, ``static`` (∝ size),
``temperature`` (∝ size^e), ``best_fixed`` (the best of a declared grid of fixed mixes, chosen on val), ``ce``
(no KD), and the opt-in ``gap_top1``, ``gap_top2``, ``akd*`` and on-policy arms (``onpolicy_ddk``,
``onpolicy_uniform`` at λ = 0.5, ``onpolicy1_*`` at λ = 1: with one, every arm also gets the on-policy
measure of ``onpolicy.py`` and each on-policy arm is paired with its off-policy control). ``stats.py``
pairs every treatment with every baseline by seed, with 95 % paired-t intervals; the same table is
printed and written.

The config file is a normal ``run.toml`` plus a ``[compare]`` table (``name``, ``arms``, ``seeds``,
``quick_steps``, ``temperature_exponent``, ``akd``: the AKD sections the ``akd*`` arms add, and
``onpolicy``: the ``[onpolicy]`` keys, λ apart, of the on-policy arms and of the measure). Outputs
in ``--out``: ``results.json`` (schema in :func:`summarise`), ``report.md`` and two plots (small files, to
commit).
The runs themselves (checkpoints, reports, the shared inits) go to ``--work`` (default
``runs/compare-<name>``). A finished run (``<work>/runs/<arm>-s<seed>/run_result.json`` with the same
settings hash) is reused, so an interrupted comparison continues where it stopped. ``--reuse
results.json`` (repeatable) takes the runs of an earlier comparison whose settings hash (the resolved config;
the shared initialisation's path is part of it, so use the same ``--work``) matches the run's instead of
training them: a new arm joins a finished comparison, even on a new machine, at the cost of its own runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..config import apply_overrides, build_config, tomllib
from ..errors import ConfigError
from .arms import ARM_TABLE, arm_overrides, quick_overrides, split_compare_table
from .runs import compare


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m ddk_fast.compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/compare.toml", help="run.toml with a [compare] table")
    p.add_argument("--seeds", help="comma-separated seeds (default: [compare] seeds)")
    p.add_argument(
        "--arms",
        help=f"comma-separated arms (default: [compare] arms; known: {','.join(ARM_TABLE)})",
    )
    p.add_argument("--quick", action="store_true", help="one seed, [compare] quick_steps steps (a smoke run)")
    p.add_argument("--out", help="results folder (default: the work folder)")
    p.add_argument("--work", help="folder for the runs (default: runs/compare-<name>[-quick])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="take matching runs (same arm, seed, settings hash) from an earlier results.json of this config",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError("--config", str(path), "an existing TOML file")
        raw, comp = split_compare_table(apply_overrides(tomllib.loads(path.read_text()), args.set))
        build_config(raw)  # every config error before any training
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(comp["seeds"])
        arms = args.arms.split(",") if args.arms else list(comp["arms"])
        for arm in arms:
            arm_overrides(arm, comp["akd"])
        if args.quick:
            seeds = seeds[:1]
            raw = quick_overrides(raw, comp["quick_steps"])
        work = Path(args.work or f"runs/compare-{comp['name']}{'-quick' if args.quick else ''}")
        out = Path(args.out) if args.out else work
        cmd = "python -m ddk_fast.compare " + " ".join(argv if argv is not None else sys.argv[1:])
        return compare(
            raw,
            comp,
            seeds,
            arms,
            work,
            out,
            quick=args.quick,
            command=cmd,
            reuse=[Path(r) for r in args.reuse],
        )
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
