"""Typed, validated run configuration.

``run.toml`` is a thin format over the dataclasses below, one per component (torchtitan's pattern). Every
field carries its documentation and its constraint, so validation messages and the README's config reference
come from one place (``python -m ddk_fast.config`` prints the reference as Markdown).

Validation happens in :func:`load_config` / :func:`build_config`, before any model or data is touched:
unknown keys, wrong types and out-of-range values raise :class:`~ddk_fast.errors.ConfigError` naming the key
path, the value and what was expected (``[train] lr: expected a number > 0, got -1``).

Relative paths are resolved against the current working directory (as ``python -m ddk_fast.train`` users run
from their project root).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .config_akd import CurriculumConfig, HiddenConfig, TeacherPromptConfig, akd_checks, akd_path_checks
from .config_fields import TEMPERATURE_RANGE, _nonneg, _nonneg_int, _opt, _pos, _pos_int, _unit


@dataclass
class DomainConfig:
    """One training domain: local files (jsonl / json / parquet / txt) and the field holding the text."""

    name: str = _opt(
        "",
        "domain name (unique; used in logs, plots and the report)",
        lambda v: bool(v.strip()),
        "a non-empty name",
    )
    files: list[str] = _opt(
        [],
        "local data files of this domain (.jsonl, .json, .parquet, .txt)",
        lambda v: len(v) > 0,
        "a non-empty list of file paths",
    )
    text_field: str = _opt("text", "field holding the document text (ignored for .txt files)")
    weight: float = _opt(1.0, 'static mixing proportion (used when [ddk] mixing = "static")', *_nonneg)


@dataclass
class ModelConfig:
    teacher: str = _opt("", "local path of the teacher (a Hugging Face causal-LM folder)")
    teacher_config: dict = _opt(
        {},
        "inline transformers config for a randomly initialised teacher (tests); "
        "used when `teacher` is empty; needs model_type",
    )
    student: str = _opt("", "local path of the student; empty = build it from the teacher (see next key)")
    student_from_teacher_layers: list[int] = _opt(
        [], "build the student from the teacher keeping these decoder layers (DistilBERT-style init)"
    )
    student_config: dict = _opt({}, "inline transformers config for a randomly initialised student (tests)")
    tokenizer: str = _opt("", "tokenizer path; empty = the teacher's folder")
    student_mode: Literal["qlora", "lora", "full"] = _opt(
        "qlora", "qlora: NF4 4-bit frozen base + LoRA; lora: LoRA on a full-precision base; full: all weights"
    )
    lora_r: int = _opt(16, "LoRA rank", *_pos_int)
    lora_alpha: float = _opt(32.0, "LoRA alpha (scaling = alpha / r)", *_pos)
    lora_dropout: float = _opt(0.05, "LoRA dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    lora_target_modules: list[str] = _opt(
        ["all-linear"], 'modules that get adapters; ["all-linear"] = every linear layer but the lm_head'
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _opt(
        "auto", "compute dtype: auto = bfloat16 on GPU, float32 on CPU"
    )
    attn_implementation: Literal[
        "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = _opt("sdpa", "transformers attention implementation (flash_attention_* need the gpu extra and CUDA)")
    gradient_checkpointing: bool = _opt(False, "recompute student activations in backward to save memory")
    shard_teacher: bool = _opt(
        False, "under torchrun: shard the frozen teacher's decoder with FSDP2 (default: a replica per rank)"
    )
    teacher_cache: str = _opt(
        "",
        "folder written by `python -m ddk_fast.teacher_cache`: train from the teacher's cached top-k "
        "(sparse-teacher loss) and never run the teacher; empty = run the teacher online",
    )


@dataclass
class DataConfig:
    domains: list[DomainConfig] = _opt(
        [],
        "the domains, as [[data.domains]] tables",
        lambda v: len(v) >= 1,
        "at least one [[data.domains]] table",
    )
    seq_len: int = _opt(256, "tokens per training sequence", *_pos_int)
    batch_size: int = _opt(
        8, "sequences per global micro-batch (split evenly over torchrun ranks)", *_pos_int
    )
    val_sequences: int = _opt(
        16, "validation sequences per domain (fixed, seeded; DDK steers on them)", *_pos_int
    )
    test_sequences: int = _opt(
        0,
        "test sequences per domain (whole documents disjoint from train and val; reported at the end, "
        "never steers anything); 0 = as many as val_sequences",
        *_nonneg_int,
    )
    split_seed: int = _opt(
        0,
        "seed of the val/test document selection (kept apart from train.seed: fixed held-out sets)",
        *_nonneg_int,
    )
    cache_dir: str = _opt(".cache/ddk_fast/shards", "where tokenised domain shards are cached")
    sampler_backend: Literal["auto", "cpp", "numpy"] = _opt(
        "auto", "domain sampler backend: auto = C++ extension when built, else numpy"
    )
    prefetch: int = _opt(2, "batches assembled ahead in a background thread (0 = off)", *_nonneg_int)
    max_bad_records: float = _opt(
        0.0,
        "fraction of a file's records that may be bad (no text field, empty, undecodable) and are skipped; "
        "above it the run stops before training, naming file:line of the first",
        *_unit,
    )

    @property
    def num_test_sequences(self) -> int:
        """``test_sequences``, with 0 meaning as many as ``val_sequences``."""
        return self.test_sequences or self.val_sequences


@dataclass
class DDKConfig:
    mixing: Literal["ddk", "uniform", "static"] = _opt(
        "ddk", "ddk: DDK factor; uniform: equal domain weights; static: [[data.domains]] weight proportions"
    )
    interval: int = _opt(1000, "K: steps between student re-evaluations / weight updates (DDK §3)", *_pos_int)
    alpha: float = _opt(0.5, "factor smooth-updating coefficient α of Eq. 2", *_unit)
    smoothing: bool = _opt(True, "false = recompute r from Eq. 1 every interval (the paper's ablation)")
    factor: Literal["paper", "excess_loss"] = _opt(
        "excess_loss",
        "paper: Eq. 1/2 exactly, softmax of perplexity ratios exp(CE_S - CE_T); excess_loss: softmax of the "
        "gap (CE_S - CE_T) / factor_temperature with the (1 - alpha)/N floor from r_0 on (robust to gaps of "
        "several nats, where the paper's factor turns one-hot)",
    )
    factor_temperature: float = _opt(
        0.5,
        "τ of the excess_loss factor, in nats (larger = flatter)",
        lambda v: v >= 0.01,
        "a number >= 0.01",
    )
    max_weight: float = _opt(
        1.0,
        "cap on any one domain's weight (1 = no cap; at least 1/N)",
        lambda v: 0 < v <= 1,
        "a number in (0, 1]",
    )
    eval_batch_size: int = _opt(8, "sequences per validation forward pass", *_pos_int)


@dataclass
class LossConfig:
    divergence: Literal[
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "total_variation"
    ] = _opt(
        "forward_kl",
        "D(p_teacher, p_student): forward KL (DDK), reverse KL (MiniLLM), generalised JSD (GKD), "
        "skew forward / reverse KL (DistiLLM) or total variation",
    )
    beta: float = _opt(0.5, "JSD β (TRL convention: 0 = forward KL, 1 = reverse KL)", *_unit)
    skew_lambda: float = _opt(
        0.1,
        "λ of the skew KLs (DistiLLM uses 0.1)",
        lambda v: 0 <= v < 1,
        "a number in [0, 1) (at 1 the skewed mixture is the distribution itself and the divergence is 0)",
    )
    temperature: float = _opt(
        1.0,
        "softmax temperature T of the KD term",
        lambda v: TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
        f"a number in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}] (below, both softmaxes are one-hot "
        "and T² scales the KD term to ~0; above, both are uniform and KD carries no information)",
    )
    kd_weight: float = _opt(0.2, "γ: weight of the KD term (DDK Eq. 3)", *_nonneg)
    ce_weight: float = _opt(1.0, "weight of the next-token cross-entropy term", *_nonneg)
    scale_by_t2: bool = _opt(True, "multiply the KD term by T² (Hinton)")
    backend: Literal["auto", "triton", "torch"] = _opt("auto", "KD loss backend: auto = triton on CUDA")


@dataclass
class TrainConfig:
    max_steps: int = _opt(1000, "optimizer steps", *_pos_int)
    lr: float = _opt(2e-4, "peak learning rate (AdamW)", *_pos)
    min_lr_ratio: float = _opt(0.1, "cosine floor as a fraction of lr", *_unit)
    warmup_steps: int = _opt(50, "linear warm-up steps", *_nonneg_int)
    weight_decay: float = _opt(0.0, "AdamW weight decay", *_nonneg)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", *_pos_int)
    max_grad_norm: float = _opt(
        1.0,
        "gradient clipping norm (0 = off)",
        lambda v: v == 0 or v >= 1e-3,
        "0 (off) or a number >= 0.001 (below, Adam's eps outweighs the clipped gradient: no update)",
    )
    max_bad_steps: int = _opt(5, "consecutive non-finite losses that stop the run", *_pos_int)
    seed: int = _opt(0, "seed for models and sampler", *_nonneg_int)
    device: str = _opt(
        "auto",
        "auto, cpu, cuda or cuda:N",
        lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
        "auto, cpu, cuda or cuda:N",
    )
    log_every: int = _opt(1, "steps between metrics.jsonl rows", *_pos_int)
    parallel: Literal["auto", "ddp", "fsdp"] = _opt(
        "auto",
        "under torchrun: ddp (replicated student) or fsdp (FSDP2-sharded student); auto = ddp when world > 1",
    )


@dataclass
class CheckpointConfig:
    every: int = _opt(500, "steps between checkpoints (one is always written at the end)", *_pos_int)
    keep_last: int = _opt(2, "checkpoints kept on disk", *_pos_int)


@dataclass
class OutputConfig:
    dir: str = _opt("runs/ddk", "run directory: resolved config, metrics.jsonl, checkpoints, report")
    tensorboard: bool = _opt(True, "also write tensorboard events when tensorboard is installed")
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddk: DDKConfig = field(default_factory=DDKConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    teacher_prompt: TeacherPromptConfig = field(default_factory=TeacherPromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of ({_type_name(inner)})"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a table",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, path: str):
    """Check ``value`` against type ``tp``; return it (ints widen to float). Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, value, _type_name(tp))
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, value, _type_name(tp))
        return [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, value, "a table")
        return _build(tp, value, path)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if not ok:
        raise ConfigError(path, value, _type_name(tp))
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
    return value


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{prefix}.{key}" if prefix else key,
                raw[key],
                f"no such key (known keys: {known})" if prefix else f"a section ({known})",
            )
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            continue
        value = _coerce(hints[name], raw[name], path)
        check, expected = f.metadata.get("check"), f.metadata.get("expected")
        if check is not None and not check(value):
            raise ConfigError(path, raw[name], expected)
        kwargs[name] = value
    return cls(**kwargs)


def build_config(raw: dict, check_paths: bool = True) -> RunConfig:
    """Validate a raw dict (parsed TOML) into a :class:`RunConfig`. Raises ConfigError."""
    cfg = _build(RunConfig, raw, "")
    _cross_checks(cfg, check_paths)
    return cfg


def _exists(path: str, key: str, want_dir: bool = False) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            key, path, "an existing " + ("folder" if want_dir else "file"), f"resolved to {p.resolve()}"
        )


def _cross_checks(cfg: RunConfig, check_paths: bool) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    if not m.teacher and not m.teacher_config:
        raise ConfigError("model.teacher", m.teacher, "a teacher path (or an inline [model.teacher_config])")
    if m.teacher_config and "model_type" not in m.teacher_config:
        raise ConfigError("model.teacher_config.model_type", None, 'a transformers model type, e.g. "llama"')
    if m.student_config and "model_type" not in m.student_config:
        raise ConfigError("model.student_config.model_type", None, 'a transformers model type, e.g. "llama"')
    n_student_src = bool(m.student) + bool(m.student_from_teacher_layers) + bool(m.student_config)
    if n_student_src != 1:
        raise ConfigError(
            "model.student", m.student, "exactly one of student, student_from_teacher_layers, student_config"
        )
    layers = m.student_from_teacher_layers
    if layers and (min(layers) < 0 or len(set(layers)) != len(layers) or layers != sorted(layers)):
        raise ConfigError(
            "model.student_from_teacher_layers", layers, "distinct, increasing layer indices >= 0"
        )
    if m.tokenizer == "" and not m.teacher:
        raise ConfigError("model.tokenizer", m.tokenizer, "a tokenizer path when the teacher is inline")
    names = [dom.name for dom in d.domains]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"data.domains[{i}].name", name, "a name not used by another domain")
    if cfg.ddk.mixing == "static" and sum(dom.weight for dom in d.domains) <= 0:
        raise ConfigError(
            "data.domains[0].weight",
            d.domains[0].weight,
            "static mixing needs at least one domain weight > 0",
        )
    if cfg.ddk.max_weight * len(d.domains) < 1.0:
        raise ConfigError(
            "ddk.max_weight",
            cfg.ddk.max_weight,
            f"at least 1/N = {1 / len(d.domains):.4f} for {len(d.domains)} domains (weights sum to 1)",
        )
    if cfg.loss.kd_weight == 0 and cfg.loss.ce_weight == 0:
        raise ConfigError("loss.kd_weight", 0.0, "kd_weight or ce_weight > 0 (with both 0 the loss is 0)")
    if t.warmup_steps > t.max_steps:
        raise ConfigError("train.warmup_steps", t.warmup_steps, f"at most train.max_steps ({t.max_steps})")
    if m.teacher_cache and cfg.loss.divergence not in ("forward_kl", "total_variation"):
        raise ConfigError(
            "loss.divergence",
            cfg.loss.divergence,
            "forward_kl or total_variation with [model] teacher_cache (the sparse-teacher loss)",
        )
    akd_checks(cfg)
    if not check_paths:
        return
    if m.teacher_cache:
        _exists(m.teacher_cache, "model.teacher_cache", want_dir=True)
    if m.teacher:
        _exists(m.teacher, "model.teacher", want_dir=True)
    if m.student:
        _exists(m.student, "model.student", want_dir=True)
    if m.tokenizer:
        _exists(m.tokenizer, "model.tokenizer", want_dir=True)
    for i, dom in enumerate(d.domains):
        for j, f in enumerate(dom.files):
            _exists(f, f"data.domains[{i}].files[{j}]")
            if Path(f).suffix not in (".jsonl", ".json", ".parquet", ".txt"):
                raise ConfigError(
                    f"data.domains[{i}].files[{j}]", f, "a .jsonl, .json, .parquet or .txt file"
                )
    akd_path_checks(cfg)


# ----------------------------------------------------------------------------------------------- overrides
_OVERRIDE_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_OVERRIDE_EXPECTED = "section.key=value (e.g. loss.temperature=2 or data.domains[0].weight=3)"


def parse_override(spec: str) -> tuple[list[str | int], Any]:
    """``"loss.temperature=2"`` -> (["loss", "temperature"], 2.0); ``data.domains[1].weight=3``."""
    if "=" not in spec:
        raise ConfigError("--set", spec, _OVERRIDE_EXPECTED)
    key, text = spec.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings need no quotes: --set output.dir=runs/x
    path: list[str | int] = []
    for part in key.strip().split("."):
        m = _OVERRIDE_PART.match(part.strip())
        if m is None:
            raise ConfigError("--set", spec, _OVERRIDE_EXPECTED, f"{part!r} is not a key or key[index]")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    if len(path) < 2:
        raise ConfigError("--set", spec, _OVERRIDE_EXPECTED, "a key inside a section")
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for spec in overrides:
        path, value = parse_override(spec)
        node: Any = raw
        for depth, k in enumerate(path):
            last = depth == len(path) - 1
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[: depth + 1])[1:]
            if isinstance(k, int):
                if not isinstance(node, list) or not 0 <= k < len(node):
                    raise ConfigError(
                        "--set", spec, "an index of an existing list entry", f"{where} is not one"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(
                    "--set", spec, "a path through tables", f"{where}: the part before it is not a table"
                )
            if last:
                node[k] = value
            elif isinstance(k, int):
                node = node[k]
            else:
                node = node.setdefault(k, {})
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing TOML file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"valid TOML ({exc})") from None
    return build_config(apply_overrides(raw, overrides or []), check_paths=check_paths)


def dump_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (written into the run directory)."""
    out: list[str] = []
    d = cfg.to_dict()
    for section, values in d.items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        arrays = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        out.append(f"[{section}]")
        for k, v in values.items():
            if k not in tables and k not in arrays:
                out.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            out.append(f"\n[{section}.{k}]")
            out.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, items in arrays.items():
            for item in items:
                out.append(f"\n[[{section}.{k}]]")
                out.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in item.items())
        out.append("")
    return "\n".join(out)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def reference_markdown() -> str:
    """Every key with its type, default and meaning, for the README."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(RunConfig)
    for section, cls in hints.items():
        sect_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = sect_hints[f.name]
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                inner = typing.get_args(tp)[0]
                inner_hints = typing.get_type_hints(inner)
                for g in dataclasses.fields(inner):
                    lines.append(_ref_row(f"[[{section}.{f.name}]] {g.name}", inner_hints[g.name], g))
                continue
            lines.append(_ref_row(f"[{section}] {f.name}", tp, f))
    return "\n".join(lines)


def _ref_row(key: str, tp, f) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    doc = f.metadata.get("doc", "")
    if f.metadata.get("expected"):
        doc += f" ({f.metadata['expected']})"
    return f"| `{key}` | {_type_name(tp)} | `{_toml_value(default)}` | {doc} |"


if __name__ == "__main__":
    print(reference_markdown())
