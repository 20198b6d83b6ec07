"""The run configuration's sections: one dataclass per component (torchtitan's pattern), and the checks
across sections.

Every field carries its documentation and its constraint (:func:`~ddk_fast.config.fields._opt`), so
validation messages and the README's config reference come from one place. Parsing, ``--set`` and the
reference are in ``parse.py``; the AKD sections in ``akd.py``. Relative paths are resolved against the current
working directory (as ``python -m ddk_fast.train`` users run from their project root).
"""

from __future__ import annotations

import dataclasses
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from .akd import HiddenConfig, TeacherPromptConfig, akd_checks
from .curriculum import CurriculumConfig
from .fields import TEMPERATURE_RANGE, _nonneg, _nonneg_int, _opt, _pos, _pos_int, _unit
from .onpolicy import OnPolicyConfig, onpolicy_checks


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
        "local data files of this domain (.jsonl, .json, .parquet, .txt); globs such as "
        '"data/code/*.jsonl" are expanded, sorted (a glob that matches nothing is an error)',
        lambda v: len(v) > 0,
        "a non-empty list of file paths",
    )
    val_files: list[str] = _opt(
        [],
        "files holding this domain's validation documents (what DDK steers on), kept apart from `files`; "
        "empty = val is drawn from `files` (seeded by data.split_seed). Set together with test_files",
    )
    test_files: list[str] = _opt(
        [],
        "files holding this domain's test documents (reported only); empty = drawn from `files`. Give both "
        "when the teacher or tokenizer trained on `files`: then nothing they saw is scored",
    )
    text_field: str = _opt("text", "field holding the document text (ignored for .txt files)")
    weight: float = _opt(1.0, 'static mixing proportion (used when [ddk] mixing = "static")', *_nonneg)
    format: Literal["auto", "text", "chat", "prompt_completion"] = _opt(
        "auto",
        "record format: text (the text_field), chat (`messages`: a list of {role, content}, rendered with "
        "the student tokenizer's chat template), prompt_completion (`prompt` + `completion` strings); auto = "
        "from the first record of each file (a file mixing formats is an error naming file:line)",
    )
    text_unit: Literal["file", "paragraph", "line"] = _opt(
        "file",
        ".txt files only: one document per file, per paragraph (blocks separated by blank lines) or per "
        "non-blank line",
    )


@dataclass
class ModelConfig:
    teacher: str = _opt(
        "",
        'the teacher: a local Hugging Face causal-LM folder or a Hub id ("Qwen/Qwen2.5-7B-Instruct"), '
        "loaded through the Hugging Face cache (HF_HUB_OFFLINE=1: the cache only)",
    )
    teacher_config: dict = _opt(
        {},
        "inline transformers config for a randomly initialised teacher (tests); "
        "used when `teacher` is empty; needs model_type",
    )
    student: str = _opt(
        "", "the student: a local folder or a Hub id; empty = build it from the teacher (see next key)"
    )
    student_from_teacher_layers: list[int] = _opt(
        [], "build the student from the teacher keeping these decoder layers (DistilBERT-style init)"
    )
    student_config: dict = _opt({}, "inline transformers config for a randomly initialised student (tests)")
    tokenizer: str = _opt("", "tokenizer folder or Hub id; empty = the teacher's")
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
        "folder written by `python -m ddk_fast.teacher_cache`: train from the teacher's cached signal and "
        "never run the teacher (the kind is read from the cache: topk = the sparse-teacher loss, forward_kl "
        "or total_variation; hidden = the dense loss, exact); empty = run the teacher online",
    )
    teacher_revision: str = _opt(
        "", "branch, tag or commit of a Hub teacher (and of its tokenizer); empty = main"
    )
    student_revision: str = _opt("", "branch, tag or commit of a Hub student; empty = main")
    trust_remote_code: bool = _opt(
        False,
        "let transformers run Python code shipped with a model or tokenizer (config.json `auto_map`); "
        "off: such a model is refused before it loads",
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

    loss_on: Literal["completion", "all"] = _opt(
        "completion",
        "which tokens the CE and KD terms (and DDK's val/test CE) count in chat and prompt_completion "
        "domains: completion = the assistant turns / the completion only; all = every token (text domains "
        "always count every token)",
    )
    chat_template: str = _opt(
        "",
        "a Jinja chat-template file used for chat domains instead of the student tokenizer's own; "
        "empty = the tokenizer's (a tokenizer without one is an error when a domain is chat)",
    )
    long_examples: Literal["truncate", "drop"] = _opt(
        "truncate",
        "a conversation or prompt/completion longer than seq_len - 1 tokens (it is never split over two "
        "sequences): truncate = keep its first seq_len - 1 tokens (dropped when no completion token is "
        "left); drop = leave it out; counted per file and logged",
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
    factor: Literal["paper", "excess_loss", "minimax"] = _opt(
        "excess_loss",
        "paper: Eq. 1/2 exactly, softmax of perplexity ratios exp(CE_S - CE_T); excess_loss: softmax of the "
        "gap (CE_S - CE_T) / factor_temperature with the (1 - alpha)/N floor from r_0 on (robust to gaps of "
        "several nats, where the paper's factor turns one-hot); minimax: excess_loss at r_0, then the mix "
        "minimising the largest gap predicted from the gap fall per unit of weight fitted on the run's "
        "updates (a variant, docs/ddk_factors.md)",
    )
    factor_temperature: float = _opt(
        0.5,
        "τ of the excess_loss factor (and of minimax's r_0), in nats (larger = flatter)",
        lambda v: v >= 0.01,
        "a number >= 0.01",
    )
    max_weight: float = _opt(
        1.0,
        "cap on any one domain's weight (1 = no cap; at least 1/N)",
        lambda v: 0 < v <= 1,
        "a number in (0, 1]",
    )
    min_weight: float = _opt(
        1e-3,
        "excess_loss and minimax: every domain keeps at least this weight (w <- (1 - N*m) w + m), so a "
        "domain pushed down can recover (at alpha = 1 there is no other floor); 0 = none; the paper "
        "factor ignores it (exact)",
        lambda v: 0 <= v < 0.1,
        "a number in [0, 0.1)",
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
    tensorboard: bool = _opt(True, 'false = leave "tensorboard" out of report_to (the key older configs use)')
    progress: bool = _opt(True, "show a progress bar")
    report_to: list[Literal["tensorboard", "wandb"]] = _opt(
        ["tensorboard"],
        "trackers that get the metrics.jsonl scalars (per-domain ones included): tensorboard (when "
        "installed), wandb (pip install 'ddk_fast[wandb]'; WANDB_MODE=offline writes a local run)",
    )
    wandb_project: str = _opt("ddk_fast", "wandb project of the run (the run is named after [output] dir)")

    @property
    def trackers(self) -> list[str]:
        """``report_to`` without tensorboard when ``tensorboard = false``."""
        return [t for t in dict.fromkeys(self.report_to) if t != "tensorboard" or self.tensorboard]


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
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that may change on --resume: they take effect from the resumed step and the run records them with
# that step (<run>/config_history.jsonl). Any other changed key is refused (exit 2), so a run's record never
# states a value it did not use. The README lists them (a test keeps the list in sync).
RESUMABLE_KEYS = (
    "train.max_steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.weight_decay",
    "train.max_grad_norm", "train.max_bad_steps", "train.log_every", "train.device",
    "checkpoint.every", "checkpoint.keep_last",
    "ddk.interval", "ddk.eval_batch_size",
    "data.prefetch", "data.sampler_backend", "data.cache_dir",
    "model.attn_implementation", "model.gradient_checkpointing",
    "output.dir", "output.progress", "output.tensorboard", "output.report_to", "output.wandb_project",
)  # fmt: skip

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def looks_like_hub_id(spec: str) -> bool:
    """``spec`` is not an existing path and has the form of a Hub repository id (``name`` or ``org/name``)."""
    return bool(spec) and not Path(spec).exists() and bool(_HUB_ID.match(spec)) and ".." not in spec


def expand_data_files(files: list[str]) -> list[tuple[str, list[str]]]:
    """Each entry of a domain's ``files`` with the paths it stands for: a glob (``*``, ``?``, ``[``) expands
    to its matches, sorted (recursive ``**`` allowed); a plain path stands for itself."""
    out = []
    for f in files:
        if _GLOB_CHARS.search(f):
            out.append((f, sorted(glob.glob(f, recursive=True))))
        else:
            out.append((f, [f]))
    return out


def _exists(path: str, key: str, want_dir: bool = False, hub: bool = False) -> None:
    p = Path(path)
    if hub and looks_like_hub_id(path):
        return  # a Hub id: the pre-flight resolves it through the Hugging Face cache
    if not p.exists():
        what = (
            "an existing " + ("folder" if want_dir else "file") + (" or a Hub id (org/name)" if hub else "")
        )
        raise ConfigError(key, path, what, f"resolved to {p.resolve()}{_stale_assets_hint(p)}")


def _stale_assets_hint(missing: Path) -> str:
    """A missing file under a folder written by ``python -m ddk_fast.demo`` (it holds a ``.stamp.json``) means
    assets built by an older version: say how to rebuild them."""
    for folder in missing.resolve().parents:
        if (folder / ".stamp.json").is_file():
            root = folder.parent
            return (
                f"; {folder} was built by an older `python -m ddk_fast.demo` (before val/ and test/ were "
                f"held out): rebuild it with `python -m ddk_fast.demo --out {root}` (or `make demo`)"
            )
    return ""


def cross_checks(cfg: RunConfig, check_paths: bool) -> None:
    """Checks across keys and sections (and, with ``check_paths``, that input paths exist)."""
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
    if m.student_revision and not m.student:
        raise ConfigError("model.student_revision", m.student_revision, "empty unless [model] student is set")
    if m.tokenizer == "" and not m.teacher:
        raise ConfigError("model.tokenizer", m.tokenizer, "a tokenizer path when the teacher is inline")
    names = [dom.name for dom in d.domains]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"data.domains[{i}].name", name, "a name not used by another domain")
    for i, dom in enumerate(d.domains):
        if bool(dom.val_files) != bool(dom.test_files):
            key = "test_files" if dom.val_files else "val_files"
            raise ConfigError(
                f"data.domains[{i}].{key}", getattr(dom, key), "set together with val_files / test_files",
                hint="held-out files replace the seeded split of `files`: give both, or neither",
            )  # fmt: skip
    if cfg.ddk.mixing == "static" and sum(dom.weight for dom in d.domains) <= 0:
        raise ConfigError(
            "data.domains[0].weight",
            d.domains[0].weight,
            "static mixing needs at least one domain weight > 0",
        )
    if cfg.ddk.min_weight * len(d.domains) >= 1.0:
        raise ConfigError(
            "ddk.min_weight", cfg.ddk.min_weight, f"less than 1/N = {1.0 / len(d.domains):.4f} (N domains)"
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
    akd_checks(cfg)
    onpolicy_checks(cfg)
    if not check_paths:
        return
    if m.teacher_cache:
        _exists(m.teacher_cache, "model.teacher_cache", want_dir=True)
    if m.teacher:
        _exists(m.teacher, "model.teacher", want_dir=True, hub=True)
    if m.student:
        _exists(m.student, "model.student", want_dir=True, hub=True)
    if m.tokenizer:
        _exists(m.tokenizer, "model.tokenizer", want_dir=True, hub=True)
    if d.chat_template:
        _exists(d.chat_template, "data.chat_template")
    for i, dom in enumerate(d.domains):
        for key in ("files", "val_files", "test_files"):
            for j, (spec, paths) in enumerate(expand_data_files(getattr(dom, key))):
                if not paths:
                    raise ConfigError(
                        f"data.domains[{i}].{key}[{j}]", spec, "a glob that matches at least one file",
                        f"it matches nothing from {Path.cwd()}{_stale_assets_hint(Path(spec))}",
                    )  # fmt: skip
                for f in paths:
                    _exists(f, f"data.domains[{i}].{key}[{j}]")
                    if Path(f).suffix not in (".jsonl", ".json", ".parquet", ".txt"):
                        raise ConfigError(
                            f"data.domains[{i}].{key}[{j}]", f, "a .jsonl, .json, .parquet or .txt file"
                        )
