"""Does DDK help? ``python -m ddk_fast.compare --config examples/compare.toml [--seeds 0,1,2] [--quick]
[--out DIR] [--arms ddk,uniform] [--set section.key=value ...]``.

Trains several *arms* from one shared student initialisation per seed, at an equal token budget, each arm a
normal run of the library's own loop (:class:`~ddk_fast.trainer.Trainer`), and scores every student on the
``test`` split, which no arm ever steers on. Arms (a config override each):

=================  ==========================================================================================
``ddk``            DDK with the library's default factor (``[ddk] factor`` as ``DDKConfig`` defines it)
``ddk_paper``      DDK with the exact Eq. 1 / Eq. 2 (``factor = "paper"``)
``ddk_nosmooth``   Eq. 1 recomputed every interval, no smoothing (the paper's ablation)
``uniform``        KD, equal domain weights
``static``         KD, weights proportional to each domain's training tokens (a plain concatenated dataset)
``ce``             no KD (``kd_weight = 0``), equal domain weights
``akd_hidden``     AKD's hidden-state loss alone (``[compare.akd.hidden]``), equal domain weights
``akd_curriculum`` progressive distillation alone (``[compare.akd.curriculum]``), equal domain weights
``akd_prompts``    the searched teacher prompts alone (``[compare.akd.teacher_prompt]``), equal weights
``akd``            all three, equal domain weights
``akd_ddk``        all three with DDK (default factor)
=================  ==========================================================================================

The config file is a normal ``run.toml`` plus a ``[compare]`` table (``name``, ``arms``, ``seeds``,
``quick_steps``, and ``akd``: the AKD sections the ``akd*`` arms add). Outputs in ``--out``:
``results.json`` (schema in :func:`summarise`), ``report.md`` and two plots (small files, to commit).
The runs themselves (checkpoints, reports, the shared inits) go to ``--work`` (default
``runs/compare-<name>``). A finished run (``<work>/runs/<arm>-s<seed>/run_result.json`` with the same
settings hash) is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("ddk", "ddk_paper", "ddk_nosmooth", "uniform", "static", "ce")
# AKD arms (opt-in: list them in [compare] arms): the sections of the [compare.akd] table, alone and together
AKD_ARMS = ("akd_hidden", "akd_curriculum", "akd_prompts", "akd", "akd_ddk")
_AKD_SECTIONS = {
    "akd_hidden": ("hidden",),
    "akd_curriculum": ("curriculum",),
    "akd_prompts": ("teacher_prompt",),
    "akd": ("hidden", "curriculum", "teacher_prompt"),
    "akd_ddk": ("hidden", "curriculum", "teacher_prompt"),
}
_UNUSED_DDK_KEYS = {
    "ddk": frozenset(),
    "fixed": frozenset({"factor", "factor_temperature", "max_weight", "alpha", "smoothing"}),
}
_COMPARE_KEYS = {"name", "arms", "seeds", "quick_steps", "akd"}
log = logging.getLogger("ddk_fast.compare")


def arm_overrides(arm: str, akd: dict | None = None) -> dict[str, dict]:
    """The config sections an arm changes (on top of the comparison's base config). ``akd``: the
    ``[compare.akd]`` table (``hidden``, ``curriculum``, ``teacher_prompt`` sections) the AKD arms add;
    they mix domains uniformly, ``akd_ddk`` with DDK."""
    from .config import DDKConfig
    from .errors import ConfigError

    if arm in AKD_ARMS:
        akd = akd or {}
        over = {"ddk": {"mixing": "ddk", "factor": DDKConfig().factor, "smoothing": True}}
        if arm != "akd_ddk":
            over = {"ddk": {"mixing": "uniform"}}
        for section in _AKD_SECTIONS[arm]:
            if section not in akd:
                raise ConfigError(
                    "compare.akd", sorted(akd), f"a [compare.akd.{section}] table for the {arm} arm"
                )
            over[section] = dict(akd[section])
        return over

    table = {
        "ddk": {"ddk": {"mixing": "ddk", "factor": DDKConfig().factor, "smoothing": True}},
        "ddk_paper": {"ddk": {"mixing": "ddk", "factor": "paper", "smoothing": True}},
        "ddk_nosmooth": {"ddk": {"mixing": "ddk", "factor": "paper", "smoothing": False}},
        "uniform": {"ddk": {"mixing": "uniform"}},
        "static": {"ddk": {"mixing": "static"}},
        "ce": {"ddk": {"mixing": "uniform"}, "loss": {"kd_weight": 0.0}},
    }
    if arm not in table:
        raise ConfigError("compare.arms", arm, f"one of {', '.join(ARMS + AKD_ARMS)}")
    return table[arm]


def _merge(raw: dict, over: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def split_compare_table(raw: dict) -> tuple[dict, dict]:
    """(run config without ``[compare]``, the ``[compare]`` table validated)."""
    from .errors import ConfigError

    raw = dict(raw)
    comp = dict(raw.pop("compare", {}))
    for key in comp:
        if key not in _COMPARE_KEYS:
            raise ConfigError(
                f"compare.{key}", comp[key], f"no such key (known keys: {sorted(_COMPARE_KEYS)})"
            )
    comp.setdefault("name", "comparison")
    comp.setdefault("arms", list(ARMS))
    comp.setdefault("seeds", [0, 1, 2])
    comp.setdefault("quick_steps", 40)
    comp.setdefault("akd", {})
    known = {sec for secs in _AKD_SECTIONS.values() for sec in secs}
    if not isinstance(comp["akd"], dict) or any(k not in known for k in comp["akd"]):
        raise ConfigError("compare.akd", comp["akd"], f"a table of the sections {sorted(known)}")
    for arm in comp["arms"]:
        arm_overrides(arm, comp["akd"])
    if not comp["seeds"] or not all(isinstance(s, int) and s >= 0 for s in comp["seeds"]):
        raise ConfigError("compare.seeds", comp["seeds"], "a non-empty list of integers >= 0")
    if not isinstance(comp["quick_steps"], int) or comp["quick_steps"] < 2:
        raise ConfigError("compare.quick_steps", comp["quick_steps"], "an integer >= 2")
    return raw, comp


def quick_overrides(raw: dict, steps: int) -> dict:
    """Few steps, the DDK interval scaled so that a quick run still sees ~4 weight updates."""
    train, ddk = dict(raw.get("train", {})), dict(raw.get("ddk", {}))
    full = train.get("max_steps", 1000)
    train["max_steps"] = steps
    train["warmup_steps"] = min(train.get("warmup_steps", 50), max(0, steps // 10))
    ddk["interval"] = max(1, min(ddk.get("interval", 1000), steps // 4))
    ck = dict(raw.get("checkpoint", {}))
    ck["every"] = max(steps, min(ck.get("every", 500), full))
    return {**raw, "train": train, "ddk": ddk, "checkpoint": ck}


def _git_commit() -> str:
    """Short commit of the working tree, with ``-dirty`` when code or configs have uncommitted changes
    (result files under bench/results, which a comparison itself rewrites, do not count)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if head and dirty else "")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_key(raw: dict) -> str:
    """Identity of one run: the *resolved* config (defaults filled in, so a changed default is a new run)
    without the output folder."""
    from .config import build_config

    return _hash(_identity(build_config(raw, check_paths=False).to_dict()))


def _identity(resolved: dict) -> dict:
    """The resolved config less what cannot change the run: the output folder, and DDK keys an arm with
    fixed weights (or the paper factor) never reads, so a sweep over them (``--set
    ddk.factor_temperature=...``) reuses the finished baseline runs instead of training them again."""
    resolved = json.loads(json.dumps(resolved))
    resolved["output"].pop("dir", None)
    for section in _unused_sections(resolved):
        resolved.pop(section, None)
    ddk = resolved["ddk"]
    unused = _UNUSED_DDK_KEYS["ddk" if ddk["mixing"] == "ddk" else "fixed"]
    if ddk["mixing"] == "ddk" and ddk["factor"] == "paper":
        unused = unused | {"factor_temperature"}
    resolved["ddk"] = {k: v for k, v in ddk.items() if k not in unused}
    return resolved


def _unused_sections(resolved: dict) -> list[str]:
    """AKD sections that are off in this run (every key unread): not part of its identity, so a new AKD key
    does not invalidate finished runs that never used AKD."""
    unused = []
    if resolved.get("hidden", {}).get("weight", 0) == 0:
        unused.append("hidden")
    if not resolved.get("teacher_prompt", {}).get("use"):
        unused.append("teacher_prompt")
    c = resolved.get("curriculum", {})
    if c.get("preset", "none") == "none" and not c.get("stages") and not c.get("num_stages", 0):
        unused.append("curriculum")
    return unused


# ------------------------------------------------------------------------------------------- one run
def _teacher_identity(path: str) -> list:
    """(name, size, mtime) of the teacher folder's files: a retrained teacher gives a new init key."""
    if not path or not Path(path).is_dir():
        return []
    return sorted(
        [p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in Path(path).iterdir() if p.is_file()
    )


def shared_student_init(raw: dict, seed: int, out: Path) -> dict:
    """Build the seed's student initialisation once (``out/inits/seed<k>``) and point the config at it."""
    from .config import build_config
    from .models import _from_config, load_teacher, resolve_dtype, student_from_teacher
    from .trainer import resolve_device

    m = raw.get("model", {})
    if m.get("student"):
        return raw  # a given student folder is shared already
    # keyed by what defines the init (the [model] table and the teacher's files): never reuse a stale one
    teacher_id = _teacher_identity(m.get("teacher", ""))
    folder = out / "inits" / f"seed{seed}-{_hash([m, teacher_id])}"
    if not (folder / "config.json").exists():
        cfg = build_config(raw)
        device = resolve_device(cfg.train.device)
        dtype = resolve_dtype(cfg.model, device)
        if cfg.model.student_from_teacher_layers:
            teacher = load_teacher(cfg.model, device, dtype, seed)
            init = student_from_teacher(teacher, cfg.model.student_from_teacher_layers)
        else:
            init = _from_config(cfg.model.student_config, "model.student_config", dtype, seed)
        tmp = folder.with_name(folder.name + ".tmp")
        init.save_pretrained(tmp)
        os.replace(tmp, folder)
    model = {k: v for k, v in m.items() if k not in ("student_from_teacher_layers", "student_config")}
    return {**raw, "model": {**model, "student": str(folder)}}


def static_weights(raw: dict) -> dict:
    """Domain weights proportional to training tokens (prepares the shards; the run reuses them)."""
    from .config import build_config
    from .data import prepare_config_domains
    from .models import load_tokenizer

    cfg = build_config(raw)
    prepared = prepare_config_domains(cfg.data, load_tokenizer(cfg.model))
    data = json.loads(json.dumps(raw["data"]))
    for dom, p in zip(data["domains"], prepared):
        dom["weight"] = float(p.train.num_tokens)
    return {**raw, "data": data}


def searched_prompts(raw: dict, out: Path) -> Path:
    """The teacher prompts of a comparison (``python -m ddk_fast.prompts`` once, shared by every arm and
    seed: the teacher and the dev slices do not depend on the seed), keyed by what defines the search."""
    from .config import build_config
    from .prompts.__main__ import run_search

    m = {k: v for k, v in raw.get("model", {}).items() if not k.startswith("student")}
    inline_seed = raw.get("train", {}).get("seed", 0) if not m.get("teacher") else None
    key = _hash([m, raw["data"], raw["teacher_prompt"], _teacher_identity(m.get("teacher", "")), inline_seed])
    path = out / "prompts" / key / "prompts.json"
    if not path.exists():
        cfg = build_config(_merge(raw, {"output": {"progress": False}}))
        run_search(cfg, path)
    return path


def run_arm(raw: dict, arm: str, seed: int, out: Path, akd: dict | None = None) -> dict:
    """Train one arm for one seed (or reuse its finished result); returns its result row. ``akd``: the
    ``[compare.akd]`` table (AKD arms)."""
    from .config import build_config
    from .report import write_report
    from .trainer import Trainer

    raw = _merge(raw, arm_overrides(arm, akd))
    raw = _merge(raw, {"train": {"seed": seed}, "output": {"progress": False}})
    if arm == "static":
        raw = static_weights(raw)
    if "teacher_prompt" in arm_overrides(arm, akd) and not raw["teacher_prompt"].get("use"):
        raw = _merge(raw, {"teacher_prompt": {"use": str(searched_prompts(raw, out))}})
    key = run_key(raw)  # the run folder is named by it: sweep variants of one arm live side by side
    run_dir = out / "runs" / f"{arm}-s{seed}-{key[:8]}"
    raw = _merge(raw, {"output": {"dir": str(run_dir)}})
    done = run_dir / "run_result.json"
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("settings_hash") == key:
            return row
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a partial or stale run: start it again
    cfg = build_config(raw)
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.fit()
    write_report(result, trainer.names)
    test_tokens = [int((vs["labels"] != -100).sum()) for vs in trainer.test_sets]
    row = {
        "arm": arm,
        "seed": seed,
        "tokens": int(sum(result.tokens_per_domain)),
        "tokens_per_domain": [int(t) for t in result.tokens_per_domain],
        "test_ce": result.test_losses,
        "teacher_test_ce": result.teacher_test_losses,
        "test_tokens": test_tokens,
        "weights": [[h["step"], *h["weights"]] for h in result.weight_history],
        "wall_seconds": round(result.wall_seconds, 1),
        "settings_hash": key,
        "teacher_prompts": cfg.teacher_prompt.use,  # its teacher CE is the prefixed teacher's
    }
    done.write_text(json.dumps(row) + "\n")
    return row


def untrained_row(raw: dict, seed: int, out: Path) -> dict:
    """Test CE of the shared initialisation itself (the 'untrained student' reference row)."""
    from .config import build_config
    from .trainer import Trainer

    cfg = build_config(
        _merge(raw, {"train": {"seed": seed}, "output": {"dir": str(out / "runs" / f"init-s{seed}")}})
    )
    trainer = Trainer(cfg)
    trainer.setup()
    student, teacher = trainer.evaluate_test()
    return {"arm": "untrained", "seed": seed, "test_ce": student, "teacher_test_ce": teacher}


# ------------------------------------------------------------------------------------------- summary
def weight_oscillation(weights: list[list[float]]) -> float:
    """Mean over consecutive weight updates of the mean |Δw| over domains (0 for a fixed mix)."""
    if len(weights) < 2:
        return 0.0
    diffs = [
        sum(abs(a - b) for a, b in zip(w1[1:], w0[1:])) / (len(w0) - 1)
        for w0, w1 in zip(weights, weights[1:])
    ]
    return sum(diffs) / len(diffs)


def score(row: dict, teacher: list[float]) -> dict:
    """Add gap (student − teacher test CE per domain), mean_gap (token-weighted), worst_gap, oscillation."""
    gap = [s - t for s, t in zip(row["test_ce"], teacher)]
    n = row.get("test_tokens") or [1] * len(gap)
    row = dict(row)
    row["gap"] = gap
    row["mean_gap"] = sum(g * k for g, k in zip(gap, n)) / sum(n)
    row["worst_gap"] = max(gap)
    if "weights" in row:
        row["weight_oscillation"] = weight_oscillation(row["weights"])
    return row


def summarise(
    setting: dict, seeds: list[int], domains: list[str], rows: list[dict], refs: list[dict]
) -> dict:
    """The results.json object::

    {"setting": {...}, "seeds": [...], "domains": [...], "teacher_test_ce": [per domain],
     "runs": [{"arm", "seed", "tokens", "test_ce", "gap", "mean_gap", "worst_gap", "weights",
               "weight_oscillation", ...}], "references": [{"arm": "untrained", ...}]}
    """
    # every gap is taken against the plain teacher (arms with teacher prompts measure a prefixed one)
    plain = [r for r in rows if not r.get("teacher_prompts")] + refs
    teacher = plain[0]["teacher_test_ce"]
    return {
        "setting": setting,
        "seeds": seeds,
        "domains": domains,
        "teacher_test_ce": teacher,
        "runs": [score(r, teacher) for r in rows],
        "references": [score(r, teacher) for r in refs],
    }


# ------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m ddk_fast.compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/compare.toml", help="run.toml with a [compare] table")
    p.add_argument("--seeds", help="comma-separated seeds (default: [compare] seeds)")
    p.add_argument(
        "--arms",
        help=f"comma-separated arms (default: [compare] arms; known: {','.join(ARMS + AKD_ARMS)})",
    )
    p.add_argument("--quick", action="store_true", help="one seed, [compare] quick_steps steps (a smoke run)")
    p.add_argument("--out", help="results folder (default: the work folder)")
    p.add_argument("--work", help="folder for the runs (default: runs/compare-<name>[-quick])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from .config import apply_overrides, build_config, tomllib
    from .errors import ConfigError

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
        return compare(raw, comp, seeds, arms, work, out, quick=args.quick, command=cmd)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def compare(
    raw: dict, comp: dict, seeds: list[int], arms: list[str], work: Path, out: Path, quick=False, command=""
) -> int:
    from tqdm.auto import tqdm

    from .compare_report import write_compare_report

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar over runs, not one per model load
    quiet = logging.getLogger("ddk_fast")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per run here; each run keeps its own report.md
    rows, refs = [], []
    t0 = time.perf_counter()
    bar = tqdm(total=len(seeds) * (len(arms) + 1), unit="run", desc=f"compare {comp['name']}")
    try:
        for seed in seeds:
            seeded = shared_student_init(raw, seed, work)
            bar.set_postfix_str(f"seed {seed} untrained")
            refs.append(untrained_row(seeded, seed, work))
            bar.update(1)
            for arm in arms:
                bar.set_postfix_str(f"seed {seed} {arm}")
                row = run_arm(seeded, arm, seed, work, comp["akd"])
                rows.append(row)
                bar.update(1)
                gaps = [s - t for s, t in zip(row["test_ce"], row["teacher_test_ce"])]
                bar.write(
                    f"seed {seed} {arm:>13}: mean test gap {sum(gaps) / len(gaps):.4f}, worst {max(gaps):.4f}"
                )
    finally:
        bar.close()
        quiet.setLevel(level)
    cfg_dump = json.loads(json.dumps(raw))
    setting = {
        "name": comp["name"],
        "quick": quick,
        "arms": arms,
        "config": cfg_dump,
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "command": command,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    domains = [d["name"] for d in raw["data"]["domains"]]
    results = summarise(setting, seeds, domains, rows, refs)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = write_compare_report(results, out)
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
