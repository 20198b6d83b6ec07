"""The arms of a comparison and the identity of a run: which config sections an arm changes, the
``[compare]`` table, quick runs, and the key under which a finished run is reused."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess

from ..config import DDKConfig, build_config
from ..errors import ConfigError

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


def merge_sections(raw: dict, over: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


def split_compare_table(raw: dict) -> tuple[dict, dict]:
    """(run config without ``[compare]``, the ``[compare]`` table validated)."""

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


def git_commit() -> str:
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


def short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_key(raw: dict) -> str:
    """Identity of one run: the *resolved* config (defaults filled in, so a changed default is a new run)
    without the output folder."""

    return short_hash(_identity(build_config(raw, check_paths=False).to_dict()))


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
