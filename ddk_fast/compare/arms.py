"""The arms of a comparison and the identity of a run: which config sections an arm changes, the
``[compare]`` table, quick runs, and the key under which a finished run is reused."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import asdict, dataclass, field, fields

from ..config import build_config
from ..config.onpolicy import OnPolicyConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: what it changes in the base config, and how it mixes the domains.

    ``sections``: config sections it sets (``[ddk]``, ``[loss]``); ``mix``: a fixed mix computed per seed by
    :func:`fixed_mix` (``size``, ``temperature``, ``gap_top1``, ``gap_top2``), None when ``sections`` (or
    DDK) decide; ``akd``: the ``[compare.akd]`` sections it adds; ``grid``: the arms ``best_fixed`` chooses
    among (on val); ``default``: in the default arm list (``[compare] arms`` unset); ``onpolicy``: the
    ``[onpolicy] fraction`` λ of an on-policy arm (its other keys come from ``[compare.onpolicy]``), 0 for
    off-policy; ``control``: the off-policy arm it is paired with (the same mix, λ = 0)."""

    doc: str
    sections: dict = field(default_factory=dict)
    mix: str | None = None
    akd: tuple[str, ...] = ()
    grid: tuple[str, ...] = ()
    default: bool = True
    onpolicy: float = 0.0
    control: str | None = None


# The `ddk` arm: the excess-loss factor with the config's other [ddk] keys (`--set ddk.alpha=...` sweeps it).
# The comparison configs set the val pilot's choice (`python -m ddk_fast.compare.pilot`,
# bench/results/compare/pilot/large-gap/, docs/ddk_factors.md): τ = 0.5, α = 0.8. The paper arms pin the
# paper's α = 0.5.
PILOT_CHOICE = {"factor": "excess_loss", "factor_temperature": 0.5, "alpha": 0.8}
_DDK = {"mixing": "ddk", "smoothing": True, "factor": "excess_loss"}
_PAPER = {"mixing": "ddk", "smoothing": True, "factor": "paper", "alpha": 0.5}
_UNIFORM = {"ddk": {"mixing": "uniform"}}
_FIXED = {"ddk": {"mixing": "static"}}
_AKD_ALL = ("hidden", "curriculum", "teacher_prompt")
# The declared grid of fixed mixes that `best_fixed` chooses among, on the val split, by worst val gap
BEST_FIXED_GRID = ("uniform", "static", "temperature", "gap_top1", "gap_top2")
GAP_TOP1_SHARE = (
    0.4  # gap_top1: the domain with the largest step-0 val gap gets this; the others share the rest
)
GAP_TOP2_SHARE = 0.3  # gap_top2: the two domains with the largest step-0 val gaps get this each

ARM_TABLE: dict[str, Arm] = {
    "ddk": Arm(
        "DDK, excess-loss factor, [ddk] τ and α of the config (the val pilot's: 0.5, 0.8)", {"ddk": _DDK}
    ),
    "ddk_paper": Arm("DDK with the exact Eq. 1 / Eq. 2 (α = 0.5)", {"ddk": _PAPER}),
    "ddk_nosmooth": Arm(
        "Eq. 1 recomputed every interval, no smoothing (the paper's ablation)",
        {"ddk": {**_PAPER, "smoothing": False}},
    ),
    # factor variants (issue 20 item 5, docs/ddk_factors.md): not in the default list
    "ddk_nocap": Arm(
        "DDK, excess-loss factor at α = 1: no uniform floor capping the hard domains, min_weight only",
        {"ddk": {**_DDK, "alpha": 1.0}},
        default=False,
    ),
    "ddk_minimax": Arm(
        "DDK, minimax factor: the mix minimising the largest predicted gap, [ddk] τ and α of the config",
        {"ddk": {**_DDK, "factor": "minimax"}},
        default=False,
    ),
    "uniform": Arm("KD, equal domain weights", _UNIFORM),
    "static": Arm("KD, weights proportional to training tokens (a concatenated dataset)", _FIXED, "size"),
    "temperature": Arm(
        "KD, weights proportional to training tokens ^ e ([compare] temperature_exponent, 0.3 as "
        "multilingual LMs sample)",
        _FIXED,
        "temperature",
    ),
    "gap_top1": Arm(
        f"KD, fixed: {GAP_TOP1_SHARE} on the domain with the largest val gap at step 0, the rest equal",
        _FIXED,
        "gap_top1",
        default=False,
    ),
    "gap_top2": Arm(
        f"KD, fixed: {GAP_TOP2_SHARE} on each of the two domains with the largest val gaps at step 0",
        _FIXED,
        "gap_top2",
        default=False,
    ),
    "best_fixed": Arm(
        "the grid member with the lowest worst val gap (grid: " + ", ".join(BEST_FIXED_GRID) + "), scored on "
        "test; every member is trained (the grid's compute is reported)",
        grid=BEST_FIXED_GRID,
    ),
    "ce": Arm("no KD (kd_weight = 0), equal domain weights", {**_UNIFORM, "loss": {"kd_weight": 0.0}}),
    "akd_hidden": Arm(
        "AKD's hidden-state loss alone, equal weights", _UNIFORM, akd=("hidden",), default=False
    ),
    "akd_curriculum": Arm(
        "progressive distillation alone, equal weights", _UNIFORM, akd=("curriculum",), default=False
    ),
    "akd_prompts": Arm(
        "the searched teacher prompts alone, equal weights", _UNIFORM, akd=("teacher_prompt",), default=False
    ),
    "akd": Arm("all three AKD parts, equal weights", _UNIFORM, akd=_AKD_ALL, default=False),
    "akd_ddk": Arm(
        "all three AKD parts with DDK (as the ddk arm)", {"ddk": _DDK}, akd=_AKD_ALL, default=False
    ),
    # on-policy arms (issue 21): the mix of their control, a share λ of every step's sequences continued by
    # the student (KD only on its tokens); the loss is the setting's, so the pair differs in λ alone
    "onpolicy_ddk": Arm(
        "the ddk arm with λ = 0.5 on-policy ([compare.onpolicy])",
        {"ddk": _DDK},
        default=False,
        onpolicy=0.5,
        control="ddk",
    ),
    "onpolicy_uniform": Arm(
        "the uniform arm with λ = 0.5 on-policy", _UNIFORM, default=False, onpolicy=0.5, control="uniform"
    ),
    "onpolicy1_ddk": Arm(
        "the ddk arm, every sequence on-policy (λ = 1)",
        {"ddk": _DDK},
        default=False,
        onpolicy=1.0,
        control="ddk",
    ),
    "onpolicy1_uniform": Arm(
        "the uniform arm, every sequence on-policy (λ = 1)",
        _UNIFORM,
        default=False,
        onpolicy=1.0,
        control="uniform",
    ),
}
ARMS = tuple(a for a, spec in ARM_TABLE.items() if spec.default)
ONPOLICY_ARMS = tuple(a for a, spec in ARM_TABLE.items() if spec.onpolicy > 0)
AKD_ARMS = tuple(a for a, spec in ARM_TABLE.items() if spec.akd)
_UNUSED_DDK_KEYS = {
    "ddk": frozenset({"min_weight"}),  # read by excess_loss only: see _identity
    "fixed": frozenset({"factor", "factor_temperature", "max_weight", "alpha", "smoothing", "min_weight"}),
}
_COMPARE_KEYS = {"name", "arms", "seeds", "quick_steps", "akd", "temperature_exponent", "onpolicy"}
# [compare.onpolicy]: the [onpolicy] keys of the on-policy arms and of the on-policy measure (every arm's);
# the fraction is the arm's
ONPOLICY_KEYS = frozenset(f.name for f in fields(OnPolicyConfig)) - {"fraction"}
log = logging.getLogger("ddk_fast.compare")


def arm_overrides(arm: str, akd: dict | None = None, onpolicy: dict | None = None) -> dict[str, dict]:
    """The config sections an arm changes (on top of the comparison's base config). ``akd``: the
    ``[compare.akd]`` table (``hidden``, ``curriculum``, ``teacher_prompt`` sections) the AKD arms add;
    ``onpolicy``: the ``[compare.onpolicy]`` table, the ``[onpolicy]`` section of an on-policy arm with its
    λ. ``best_fixed`` changes nothing itself (it is one of its grid members)."""
    if arm not in ARM_TABLE:
        raise ConfigError("compare.arms", arm, f"one of {', '.join(ARM_TABLE)}")
    spec = ARM_TABLE[arm]
    over = json.loads(json.dumps(spec.sections))
    akd = akd or {}
    for section in spec.akd:
        if section not in akd:
            raise ConfigError(
                "compare.akd", sorted(akd), f"a [compare.akd.{section}] table for the {arm} arm"
            )
        over[section] = dict(akd[section])
    if spec.onpolicy > 0:
        over["onpolicy"] = {**(onpolicy or {}), "fraction": spec.onpolicy}
    return over


def fixed_mix(arm: str, sizes: list[float], gap0: list[float] | None = None, exponent: float = 0.3):
    """The domain weights of a fixed-mix arm (None for an arm without one).

    ``sizes``: training tokens per domain; ``gap0``: the student − teacher val CE per domain at step 0 (the
    shared initialisation's, measured once per seed), needed by ``gap_top1`` / ``gap_top2``; ``exponent``: of
    the ``temperature`` arm, p ∝ size^exponent."""
    mix = ARM_TABLE[arm].mix
    n = len(sizes)
    if mix is None:
        return None
    if mix in ("size", "temperature"):
        e = 1.0 if mix == "size" else exponent
        w = [float(x) ** e for x in sizes]
        return [x / sum(w) for x in w]
    if gap0 is None or len(gap0) != n:
        raise ValueError(f"{arm}: needs the step-0 val gap of each of the {n} domains, got {gap0}")
    order = sorted(range(n), key=lambda i: -gap0[i])
    top, share = (order[:1], GAP_TOP1_SHARE) if mix == "gap_top1" else (order[:2], GAP_TOP2_SHARE)
    rest = (1.0 - share * len(top)) / (n - len(top)) if n > len(top) else 0.0
    w = [share if i in top else rest for i in range(n)]
    return [x / sum(w) for x in w]


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
    comp.setdefault("temperature_exponent", 0.3)
    comp.setdefault("onpolicy", {})
    op = comp["onpolicy"]
    if not isinstance(op, dict) or any(k not in ONPOLICY_KEYS for k in op):
        raise ConfigError(
            "compare.onpolicy", op, f"a table of the [onpolicy] keys {sorted(ONPOLICY_KEYS)} (λ is the arm's)"
        )
    e = comp["temperature_exponent"]
    if not isinstance(e, (int, float)) or not 0 <= e <= 1:
        raise ConfigError("compare.temperature_exponent", e, "a number in [0, 1] (p ∝ size^e)")
    known = set(_AKD_ALL)
    if not isinstance(comp["akd"], dict) or any(k not in known for k in comp["akd"]):
        raise ConfigError("compare.akd", comp["akd"], f"a table of the sections {sorted(known)}")
    for arm in comp["arms"]:
        arm_overrides(arm, comp["akd"], op)
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
    if resolved.get("onpolicy", {}).get("fraction", 0) == 0:  # off: its keys are unread (the defaults stand
        resolved["onpolicy"] = asdict(OnPolicyConfig())  # in, so runs keyed before they existed stay reused)
    for section in _unused_sections(resolved):
        resolved.pop(section, None)
    ddk = resolved["ddk"]
    unused = _UNUSED_DDK_KEYS["ddk" if ddk["mixing"] == "ddk" else "fixed"]
    if ddk["mixing"] == "ddk" and ddk["factor"] == "paper":
        unused = unused | {"factor_temperature"}
    elif ddk["mixing"] == "ddk":
        unused = unused - {"min_weight"}
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
