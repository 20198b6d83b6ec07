"""One comparison: a shared student initialisation per seed, each arm trained by the library's own loop (or
its finished result reused), the untrained reference, and the summary that ``results.json`` holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..config import build_config
from ..data import prepare_config_domains
from ..distributed import resolve_device
from ..errors import ConfigError
from ..models.loading import (
    ensure_student_init,
    load_teacher,
    load_tokenizer,
    resolve_dtype,
    student_init_key,
    teacher_identity,
)
from ..prompts.run import run_search
from ..training.report import write_report
from ..training.trainer import Trainer
from .arms import (
    ARM_TABLE,
    BEST_FIXED_GRID,
    arm_overrides,
    fixed_mix,
    git_commit,
    merge_sections,
    run_key,
    short_hash,
)
from .onpolicy import measure_run, measure_untrained
from .report import write_compare_report
from .stats import onpolicy_intervals, paired_intervals, summary_lines

log = logging.getLogger("ddk_fast.compare")


def shared_student_init(raw: dict, seed: int, out: Path) -> dict:
    """Build the seed's student initialisation once (``out/inits/seed<k>-<key>``, the key of
    :func:`~ddk_fast.models.loading.student_init_key`: the same cache the trainer uses for
    ``<run>/student_init``) and point the config at it."""
    m = raw.get("model", {})
    if m.get("student"):
        return raw  # a given student folder is shared already
    cfg = build_config(merge_sections(raw, {"train": {"seed": seed}}))
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model, device)
    folder = out / "inits" / f"seed{seed}-{student_init_key(cfg.model, dtype, seed)}"
    ensure_student_init(cfg.model, folder, dtype, seed, lambda: load_teacher(cfg.model, device, dtype, seed))
    model = {k: v for k, v in m.items() if k not in ("student_from_teacher_layers", "student_config")}
    return {**raw, "model": {**model, "student": str(folder)}}


def domain_sizes(raw: dict) -> list[int]:
    """Training tokens per domain (prepares the shards; the run reuses them)."""
    cfg = build_config(raw)
    return [int(p.train.num_tokens) for p in prepare_config_domains(cfg.data, load_tokenizer(cfg.model))]


def with_weights(raw: dict, weights: list[float]) -> dict:
    """``raw`` with ``[[data.domains]] weight`` set (the mix of a ``mixing = "static"`` run)."""
    data = json.loads(json.dumps(raw["data"]))
    for dom, w in zip(data["domains"], weights):
        dom["weight"] = float(w)
    return {**raw, "data": data}


def step0_gap(row: dict) -> list[float]:
    """Student − teacher val CE per domain at step 0 (the shared initialisation's: any arm's row of the
    seed)."""
    return [s - t for s, t in zip(row["val_ce_initial"], row["teacher_val_ce"])]


def val_gaps(row: dict) -> list[float]:
    """Student − teacher val CE per domain at the end of the run (what best_fixed chooses on)."""
    return [s - t for s, t in zip(row["val_ce"], row["teacher_val_ce"])]


def best_fixed_row(members: dict[str, dict], grid: tuple[str, ...]) -> dict:
    """The grid member with the lowest worst val gap (ties: lowest mean val gap), as the ``best_fixed`` row;
    ``grid`` lists every member's val gaps and ``grid_tokens`` the tokens all members trained on."""
    table = []
    for name in grid:
        g = val_gaps(members[name])
        table.append({"arm": name, "val_worst_gap": max(g), "val_mean_gap": sum(g) / len(g)})
    chosen = min(table, key=lambda r: (r["val_worst_gap"], r["val_mean_gap"]))["arm"]
    row = {k: v for k, v in members[chosen].items()}
    row.update(
        arm="best_fixed",
        chosen=chosen,
        grid=table,
        grid_tokens=int(sum(members[m]["tokens"] for m in grid)),
    )
    return row


def searched_prompts(raw: dict, out: Path) -> Path:
    """The teacher prompts of a comparison (``python -m ddk_fast.prompts`` once, shared by every arm and
    seed: the teacher and the dev slices do not depend on the seed), keyed by what defines the search."""
    m = {k: v for k, v in raw.get("model", {}).items() if not k.startswith("student")}
    cfg = build_config(raw)
    seed = cfg.train.seed if not m.get("teacher") else None  # an inline teacher is defined by its seed
    teacher = teacher_identity(
        cfg.model, resolve_dtype(cfg.model, resolve_device(cfg.train.device)), seed or 0
    )
    key = short_hash([m, raw["data"], raw["teacher_prompt"], teacher, seed])
    path = out / "prompts" / key / "prompts.json"
    if not path.exists():
        cfg = build_config(merge_sections(raw, {"output": {"progress": False}}))
        run_search(cfg, path)
    return path


def arm_run_config(
    raw: dict,
    arm: str,
    seed: int,
    out: Path,
    akd: dict | None = None,
    gap0: list[float] | None = None,
    exponent: float = 0.3,
    onpolicy: dict | None = None,
) -> tuple[dict, str, Path]:
    """(the run's config, its settings hash, its run folder) for one arm and seed (arguments of
    :func:`run_arm`); trains nothing (a teacher-prompt arm runs the shared prompt search once)."""
    raw = merge_sections(raw, arm_overrides(arm, akd, onpolicy))
    raw = merge_sections(raw, {"train": {"seed": seed}, "output": {"progress": False}})
    if ARM_TABLE[arm].mix is not None:
        raw = with_weights(raw, fixed_mix(arm, domain_sizes(raw), gap0, exponent))
    if "teacher_prompt" in arm_overrides(arm, akd) and not raw["teacher_prompt"].get("use"):
        raw = merge_sections(raw, {"teacher_prompt": {"use": str(searched_prompts(raw, out))}})
    key = run_key(raw)  # the run folder is named by it: sweep variants of one arm live side by side
    run_dir = out / "runs" / f"{arm}-s{seed}-{key[:8]}"
    return merge_sections(raw, {"output": {"dir": str(run_dir)}}), key, run_dir


def run_arm(
    raw: dict,
    arm: str,
    seed: int,
    out: Path,
    akd: dict | None = None,
    gap0: list[float] | None = None,
    exponent: float = 0.3,
    onpolicy: dict | None = None,
    prior: dict | None = None,
) -> dict:
    """Train one arm for one seed (or reuse its finished result); returns its result row. ``akd``: the
    ``[compare.akd]`` table (AKD arms); ``gap0``: the seed's step-0 val gaps (``gap_top*`` arms);
    ``exponent``: of the ``temperature`` arm; ``onpolicy``: the ``[compare.onpolicy]`` table (on-policy
    arms); ``prior``: this arm and seed's row of an earlier ``results.json`` (``--reuse``), taken when its
    settings hash is this run's. The row's ``run_dir`` and ``raw`` (the run's config) are for the caller,
    not results.json."""

    raw, key, run_dir = arm_run_config(raw, arm, seed, out, akd, gap0, exponent, onpolicy)
    if prior is not None and prior.get("settings_hash") == key:
        return {**prior, "run_dir": "", "raw": raw}
    done = run_dir / "run_result.json"
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("settings_hash") == key:
            return {**row, "run_dir": str(run_dir), "raw": raw}
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial or stale run: start it again
    cfg = build_config(raw)
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.fit()
    write_report(result, trainer.names)
    test_tokens = [int((vs["labels"] != -100).sum()) for vs in trainer.test_sets]
    evals = result.eval_history
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
        # val (steered on, chosen on; never reported as the result): at step 0 and at the end
        "val_ce_initial": evals[0]["student_loss"] if evals and evals[0]["step"] == 0 else None,
        "val_ce": evals[-1]["student_loss"] if evals else None,
        "teacher_val_ce": result.teacher_losses,
        "commit": git_commit(),  # the code that trained this run
        "config": cfg.to_dict(),  # its full resolved config (AKD sections included)
    }
    if result.onpolicy:
        row["onpolicy"] = {k: v for k, v in result.onpolicy.items() if k != "test_continuation_teacher_ce"}
    done.write_text(json.dumps(row) + "\n")
    return {**row, "run_dir": str(run_dir), "raw": raw}


_SCORED = ("gap", "mean_gap", "worst_gap", "weight_oscillation")


def load_prior(paths: list[Path]) -> dict[tuple[str, int], dict]:
    """The runs of earlier ``results.json`` files (``--reuse``), by (arm, seed). A row is reused only when its
    settings hash equals the run's (:func:`run_arm`: the resolved config, so a changed default, arm or
    section trains again); a ``best_fixed`` row whole, when the grid is the same and its chosen member's
    settings hash is the run's (:func:`reused_best_fixed`)."""
    prior: dict[tuple[str, int], dict] = {}
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
            runs, grid = results["runs"], results["setting"].get("best_fixed_grid")
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                "--reuse", str(path), f"a readable results.json of a comparison ({exc})"
            ) from exc
        for row in runs:
            if row["arm"] == "best_fixed" and grid != list(BEST_FIXED_GRID):
                continue
            clean = {k: v for k, v in row.items() if k not in _SCORED}
            prior.setdefault((row["arm"], int(row["seed"])), {**clean, "reused_from": str(path)})
    return prior


def reused_best_fixed(row: dict, seeded: dict, seed: int, work: Path, trained: dict, exponent: float):
    """``row`` (an earlier best_fixed row) when its chosen member would be trained with the same settings
    now, else None (then the grid is trained). ``trained``: the seed's runs so far (``uniform``'s gives the
    step-0 gaps of the gap mixes)."""
    chosen = row.get("chosen")
    if chosen not in BEST_FIXED_GRID:
        return None
    gap0 = None
    if ARM_TABLE[chosen].mix in _GAP_MIXES:
        if "uniform" not in trained:
            return None
        gap0 = step0_gap(trained["uniform"])
    _, key, _ = arm_run_config(seeded, chosen, seed, work, None, gap0, exponent)
    return row if row.get("settings_hash") == key else None


def untrained_row(raw: dict, seed: int, out: Path) -> dict:
    """Test CE of the shared initialisation itself (the 'untrained student' reference row)."""

    cfg = build_config(
        merge_sections(raw, {"train": {"seed": seed}, "output": {"dir": str(out / "runs" / f"init-s{seed}")}})
    )
    trainer = Trainer(cfg)
    trainer.setup()
    student, teacher = trainer.evaluate_test()
    return {"arm": "untrained", "seed": seed, "test_ce": student, "teacher_test_ce": teacher}


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


def compare(
    raw: dict,
    comp: dict,
    seeds: list[int],
    arms: list[str],
    work: Path,
    out: Path,
    quick=False,
    command="",
    reuse: list[Path] | None = None,
) -> int:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch  # noqa: F401 (version in the results)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar over runs, not one per model load
    quiet = logging.getLogger("ddk_fast")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per run here; each run keeps its own report.md
    rows, refs = [], []
    t0 = time.perf_counter()
    order = training_order(arms)
    op = comp.get("onpolicy", {})
    measure = any(ARM_TABLE[a].onpolicy > 0 for a in arms)  # every arm is measured when one is on-policy
    exponent = comp.get("temperature_exponent", 0.3)
    if reuse and measure:
        raise ConfigError(
            "--reuse",
            [str(p) for p in reuse],
            "no --reuse with on-policy arms (every arm is measured from its run folder)",
        )
    prior = load_prior(list(reuse or []))
    bar = tqdm(total=len(seeds) * (len(order) + 1), unit="run", desc=f"compare {comp['name']}")
    try:
        for seed in seeds:
            seeded = shared_student_init(raw, seed, work)
            bar.set_postfix_str(f"seed {seed} untrained")
            refs.append(untrained_row(seeded, seed, work))
            bar.update(1)
            if measure:  # the on-policy measure's reference points
                refs[-1]["onpolicy_measure"] = measure_untrained(seeded, work / "runs" / f"init-s{seed}", op)
            trained: dict[str, dict] = {}
            if any(ARM_TABLE[a].grid and (a, seed) in prior for a in arms) and ("uniform", seed) in prior:
                trained["uniform"] = run_arm(seeded, "uniform", seed, work, prior=prior[("uniform", seed)])
            whole = {}  # grid arms reused with their choice: their members are not trained
            for a in arms:
                if ARM_TABLE[a].grid and (a, seed) in prior:
                    row = reused_best_fixed(prior[(a, seed)], seeded, seed, work, trained, exponent)
                    if row is not None:
                        whole[a] = row
            for arm in training_order([a for a in arms if a not in whole]):
                bar.set_postfix_str(f"seed {seed} {arm}")
                gap0 = step0_gap(trained["uniform"]) if ARM_TABLE[arm].mix in _GAP_MIXES else None
                trained[arm] = run_arm(
                    seeded, arm, seed, work, comp["akd"], gap0, exponent, op, prior.get((arm, seed))
                )
                if measure:
                    m = measure_run(trained[arm]["raw"], Path(trained[arm]["run_dir"]), op)
                    trained[arm].update(cont_ce=m["cont_ce"], cont_ce_mean=m["cont_ce_mean"])
                bar.update(1)
                gaps = [s - t for s, t in zip(trained[arm]["test_ce"], trained[arm]["teacher_test_ce"])]
                bar.write(
                    f"seed {seed} {arm:>13}: mean test gap {sum(gaps) / len(gaps):.4f}, worst {max(gaps):.4f}"
                )
            for arm in arms:
                grid = ARM_TABLE[arm].grid
                if arm in whole:
                    rows.append(whole[arm])
                else:
                    rows.append(best_fixed_row(trained, grid) if grid else trained[arm])
    finally:
        bar.close()
        quiet.setLevel(level)
    cfg_dump = json.loads(json.dumps(raw))
    arm_configs = {}
    for r in rows:  # each arm's full resolved config (its first seed's; the seeds differ in train.seed only)
        arm_configs.setdefault(r["arm"], r.get("config"))
    setting = {
        "name": comp["name"],
        "quick": quick,
        "arms": arms,
        "arm_table": {a: ARM_TABLE[a].doc for a in arms},
        "onpolicy_fraction": {a: ARM_TABLE[a].onpolicy for a in arms},
        "best_fixed_grid": list(BEST_FIXED_GRID),
        "temperature_exponent": exponent,
        "config": cfg_dump,
        "arm_configs": arm_configs,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "command": command,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "reused_from": [str(p) for p in reuse or []],
        "reused_runs": sum(1 for r in rows if r.get("reused_from")),
    }
    domains = [d["name"] for d in raw["data"]["domains"]]
    drop = ("config", "raw", "run_dir")  # the config: in setting.arm_configs
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    results = summarise(setting, seeds, domains, rows, refs)
    results["intervals"] = paired_intervals(results)
    if measure:
        setting["onpolicy_measure"] = op
        results["onpolicy_intervals"] = onpolicy_intervals(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = write_compare_report(results, out)
    print("\n".join(summary_lines(results)))
    print(f"results: {out / 'results.json'}\nreport:  {report}")
    return 0


_GAP_MIXES = ("gap_top1", "gap_top2")


def training_order(arms: list[str]) -> list[str]:
    """The runs a seed needs, in order: the arms, ``best_fixed`` replaced by its grid members, each once, and
    ``uniform`` first when a ``gap_top*`` mix needs its step-0 val gaps."""
    order: list[str] = []
    for arm in arms:
        for a in ARM_TABLE[arm].grid or (arm,):
            if a not in order:
                order.append(a)
    if any(ARM_TABLE[a].mix in _GAP_MIXES for a in order):
        order = ["uniform"] + [a for a in order if a != "uniform"]
    return order
