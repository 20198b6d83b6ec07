"""Teacher and student models: local Hugging Face folders, Hub ids or inline configs; QLoRA / LoRA / full
students.

- Teacher: frozen, eval mode, no grad; bfloat16 on GPU, float32 on CPU (``[model] dtype`` overrides).
- Student: ``qlora`` = bitsandbytes NF4 4-bit base with double quantisation + peft LoRA adapters (AKD item 1),
  ``lora`` = adapters on a full-precision base, ``full`` = every weight trains.
- ``student_from_teacher_layers`` builds the student from the teacher by keeping some decoder layers
  (DistilBERT's initialisation); it is written as a normal HF folder into the run directory and loaded back
  through the same ``from_pretrained`` path as any other student, so quantisation is the library's own.

Where a model comes from (a folder, or a Hub id through the Hugging Face cache) is :mod:`.hub`'s
:func:`~.hub.resolve_source`; every ``from_pretrained`` here goes through it (revision, cache-only when
``HF_HUB_OFFLINE=1``, ``trust_remote_code`` from the config, default off).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .hub import ModelSource, has_tokenizer_files, resolve_source, tokenizer_source

log = logging.getLogger("ddk_fast")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def load_tokenizer(cfg: ModelConfig):
    """The run's tokenizer (``[model] tokenizer``, else the teacher's). A folder or snapshot without
    tokenizer files is a ConfigError (transformers would build an empty tokenizer from it)."""
    from transformers import AutoTokenizer

    source = tokenizer_source(cfg)
    key = "model.tokenizer" if cfg.tokenizer else "model.teacher"
    if not has_tokenizer_files(source.folder):
        raise ConfigError(
            key,
            source.spec,
            "a folder or Hub id with tokenizer files (tokenizer.json, tokenizer.model or vocab.json)",
            f"{source.folder} has none; set [model] tokenizer to the folder or Hub id of its tokenizer",
        )
    try:
        tok = AutoTokenizer.from_pretrained(source.load_path, **source.kwargs(cfg.trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ConfigError(
            key, source.spec, "a folder with a tokenizer (tokenizer.json or tokenizer_config.json)", msg
        ) from None
    if tok.eos_token_id is None:
        raise ConfigError(key, source.spec, "a tokenizer with an eos token (used as document separator)")
    template = _student_chat_template(cfg)
    if template:  # chat data is rendered with the student's template (the vocabularies are checked equal)
        tok.chat_template = template
    return tok


def _student_chat_template(cfg: ModelConfig) -> str | None:
    """The chat template of a student folder / Hub model that ships a tokenizer (None otherwise)."""
    if not cfg.student:
        return None
    source = student_source(cfg)
    if not has_tokenizer_files(source.folder):
        return None
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(source.folder), local_files_only=True,
                                          trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    return getattr(other, "chat_template", None)


def model_from_config(config_dict: dict, key: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A randomly initialised causal LM (seeded) from an inline transformers config; ``key`` names the config
    key in errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config_dict)
    model_type = d.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}.model_type", model_type, f"a valid transformers config ({exc})") from None
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_pretrained(
    source: ModelSource, dtype: torch.dtype, attn: str, trust_remote_code: bool = False, **kw
) -> nn.Module:
    """``from_pretrained`` of a folder or a Hub id (through the cache); a model that does not load is a
    ConfigError naming its key (the pre-flight in runfolder.py catches most of them before; this catches
    what only loading shows)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source.load_path, dtype=dtype, attn_implementation=attn, **source.kwargs(trust_remote_code), **kw
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        msg = " ".join(str(exc).split())[:300]
        raise ConfigError(
            source.key,
            source.spec,
            "a loadable Hugging Face causal-LM folder or Hub id",
            hint=f"{type(exc).__name__}: {msg}",
        ) from None


def teacher_source(cfg: ModelConfig) -> ModelSource:
    return resolve_source(cfg.teacher, "model.teacher", cfg.teacher_revision)


def student_source(cfg: ModelConfig) -> ModelSource:
    return resolve_source(cfg.student, "model.student", cfg.student_revision)


def load_teacher(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    if cfg.teacher:
        teacher = _load_pretrained(teacher_source(cfg), dtype, cfg.attn_implementation, cfg.trust_remote_code)
    else:
        teacher = model_from_config(cfg.teacher_config, "model.teacher_config", dtype, seed)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the decoder layers ``layers`` (DistilBERT-style initialisation)."""
    decoder = teacher.get_decoder()
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise ConfigError(
            "model.student_from_teacher_layers",
            layers,
            f"a teacher whose decoder has a `layers` list ({type(decoder).__name__} has none)",
        )
    if max(layers) >= len(blocks):
        raise ConfigError(
            "model.student_from_teacher_layers",
            layers,
            f"layer indices < {len(blocks)} (the teacher's number of layers)",
        )
    student = copy.deepcopy(teacher)
    student.get_decoder().layers = nn.ModuleList(student.get_decoder().layers[i] for i in layers)
    for new_idx, block in enumerate(student.get_decoder().layers):
        if hasattr(block, "self_attn") and hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = new_idx  # KV-cache slot
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_idx
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    student.requires_grad_(True)
    return student


def disable_bnb_cpu_repack(model: nn.Module) -> int:
    """Work around a bitsandbytes CPU bug (see shared/ENV.md): on avx512_bf16 CPUs an eval/no-grad forward
    repacks NF4 weights into an inference-only layout and later training silently loses the gradient through
    the frozen layers. Turning the repack off keeps gradients exact. Returns the number of layers patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


STUDENT_INIT = "student_init"
INIT_KEY_FILE = "ddk_fast_init.json"


def teacher_identity(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> dict:
    """What identifies the teacher without reading its weights: a folder's resolved path, its config.json
    bytes and the name, size and mtime of every weight file; an inline config, the seed and dtype."""
    if not cfg.teacher:
        return {"config": cfg.teacher_config, "seed": seed, "dtype": str(dtype)}
    root = teacher_source(cfg).folder
    cfg_file = root / "config.json"
    files = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json"):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(cfg_file.read_bytes()).hexdigest() if cfg_file.is_file() else None
    return {"path": str(root), "config_sha256": digest, "files": files, "dtype": str(dtype)}


def student_init_key(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> str:
    """Hash of everything that defines ``<run>/student_init``: the student-defining keys and, for a
    student cut from the teacher, the teacher's identity."""
    if cfg.student_from_teacher_layers:
        payload = {
            "layers": cfg.student_from_teacher_layers,
            "teacher": teacher_identity(cfg, dtype, seed),
        }
    else:
        payload = {"student_config": cfg.student_config, "seed": seed, "dtype": str(dtype)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _init_key(path: Path) -> str | None:
    """The key recorded in a student init folder (None when there is none or it is unreadable)."""
    try:
        return json.loads((path / INIT_KEY_FILE).read_text()).get("key")
    except (OSError, ValueError):
        return None


def student_init_current(cfg: ModelConfig, folder: Path, dtype: torch.dtype, seed: int) -> bool:
    """``folder`` holds the student initialisation of this config and teacher: :func:`ensure_student_init`
    reuses it (and so does not need the teacher)."""
    return _init_key(Path(folder)) == student_init_key(cfg, dtype, seed)


def ensure_student_init(
    cfg: ModelConfig, folder: Path, dtype: torch.dtype, seed: int, teacher: Callable[[], nn.Module]
) -> Path:
    """The one student-initialisation cache: ``folder`` is (re)built unless its recorded key is this
    config's (:func:`student_init_key`); ``teacher()`` is called only when the student is cut from the
    teacher's layers and must be built. Used by the trainer (``<run>/student_init``) and the comparison
    (one shared folder per seed)."""

    def build() -> nn.Module:
        if cfg.student_from_teacher_layers:
            return student_from_teacher(teacher(), cfg.student_from_teacher_layers)
        return model_from_config(cfg.student_config, "model.student_config", dtype, seed)

    _cached_init(Path(folder), student_init_key(cfg, dtype, seed), build)
    return Path(folder)


def _cached_init(path: Path, key: str, build) -> None:
    """Reuse ``path`` only when its recorded key is ``key``; otherwise (re)build it, then record the key.
    Built under a temporary name and renamed, so an interrupted build is never reused."""
    if _init_key(path) == key:
        log.info("student init: reusing %s (key %s)", path, key)
        return
    if path.exists():
        log.warning(
            "student init: %s was built from another teacher or [model] config (key %s expected); "
            "rebuilding it",
            path,
            key,
        )
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = build()
    model.save_pretrained(tmp)
    del model
    (tmp / INIT_KEY_FILE).write_text(json.dumps({"key": key}) + "\n")
    tmp.rename(path)


def load_student(
    cfg: ModelConfig,
    teacher: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    run_dir: Path,
    seed: int,
    shard: bool = False,
) -> nn.Module:
    """Build or load the student, quantise it (qlora) and attach adapters (qlora/lora).

    ``teacher``: returns the teacher model; called only when the student is cut from its layers and
    ``<run>/student_init`` must be (re)built. ``shard``: the student will be sharded with FSDP2; a qlora base
    then stores its 4-bit weights in the compute dtype (``bnb_4bit_quant_storage``) so FSDP can shard them
    like any other tensor.
    """
    path = base_source(cfg, run_dir, dtype, seed, teacher)

    if cfg.student_mode == "qlora":
        student = load_nf4(path, dtype, device, cfg.attn_implementation, cfg.trust_remote_code, shard)
    elif path is not None:
        student = _load_pretrained(path, dtype, cfg.attn_implementation, cfg.trust_remote_code).to(device)
    else:
        student = model_from_config(cfg.student_config, "model.student_config", dtype, seed).to(device)

    if cfg.student_mode in ("qlora", "lora"):
        # the adapters from the seed alone: the same student whatever ran before (an online teacher's or a
        # just-built student init's random numbers, or none when both are cached)
        torch.manual_seed(seed)
        student = _attach_lora(student, cfg)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(student, "enable_input_require_grads"):
            student.enable_input_require_grads()
    student.train()
    return student


def _init_source(folder: Path) -> ModelSource:
    return ModelSource(str(folder), "model.student", Path(folder).resolve())


def base_source(
    cfg: ModelConfig, run_dir: Path, dtype, seed: int, teacher=None, build: bool = True
) -> ModelSource | None:
    """The student's base model: ``[model] student`` (a folder or Hub id), the student initialisation in
    ``<run>/student_init`` (cut from the teacher's layers, or an inline config in qlora mode: (re)built
    here unless ``build`` is False; ``teacher()`` is called only to cut layers), or None for an inline
    config in full / lora mode (built in memory)."""
    if cfg.student:
        return student_source(cfg)
    if cfg.student_from_teacher_layers or cfg.student_mode == "qlora":
        # an inline config in qlora mode is materialised too: quantisation goes through from_pretrained
        folder = Path(run_dir) / STUDENT_INIT
        if build:
            ensure_student_init(cfg, folder, dtype, seed, teacher)
        return _init_source(folder)
    return None


def base_model_record(cfg: ModelConfig, run_dir: Path) -> dict:
    """What ``final/`` records as the student's base model: its Hub id (and revision) or the absolute path
    of its folder (``<run>/student_init`` for a student cut from the teacher or built from an inline
    config), so ``final/`` loads from any working directory."""
    src = base_source(cfg, run_dir, None, 0, build=False)
    if src is None:
        return {"base_model": None, "revision": None}
    return {"base_model": src.record, "revision": src.revision}


def load_nf4(
    source: ModelSource,
    dtype,
    device,
    attn: str = "sdpa",
    trust_remote_code: bool = False,
    shard: bool = False,
) -> nn.Module:
    """A QLoRA base: NF4 4-bit weights with double quantisation, computing in ``dtype`` (the CPU repack
    bug worked around)."""
    from transformers import BitsAndBytesConfig

    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **({"bnb_4bit_quant_storage": dtype} if shard else {}),
    )
    model = _load_pretrained(
        source, dtype, attn, trust_remote_code, quantization_config=bnb_cfg, device_map={"": device}
    )
    n = disable_bnb_cpu_repack(model)
    log.info("student: NF4 4-bit base (%d quantised linear layers, CPU repack disabled)", n)
    return model


def load_model(spec: str, key: str, dtype, device, *, revision: str = "", trust_remote_code: bool = False,
               adapter: str | None = None) -> nn.Module:  # fmt: skip
    """Any causal LM to score or export: a folder or Hub id, optionally with peft adapters (a ``final/``
    folder). The base of a ``final/`` written by a qlora run (its ``ddk_fast_final.json``) is loaded in NF4
    as it was trained, so the adapters see the weights they were trained on."""
    source = resolve_source(spec, key, revision)
    info = final_info(adapter) if adapter else {}
    if info.get("student_mode") == "qlora":
        model = load_nf4(source, dtype, device, trust_remote_code=trust_remote_code)
    else:
        model = _load_pretrained(source, dtype, "sdpa", trust_remote_code).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    return model.eval()


FINAL_INFO = "ddk_fast_final.json"  # in final/: student mode, base model (Hub id / absolute path), dtype


def final_info(folder) -> dict:
    """``ddk_fast_final.json`` of a ``final/`` folder (student mode, base model, revision, dtype), or {}."""
    try:
        return json.loads((Path(folder) / FINAL_INFO).read_text())
    except (OSError, ValueError):
        return {}


def _attach_lora(student: nn.Module, cfg: ModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    target = "all-linear" if targets == ["all-linear"] else list(targets)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        student = get_peft_model(student, lcfg)
    except ValueError as exc:
        raise ConfigError(
            "model.lora_target_modules", targets, f"module names present in the student ({exc})"
        ) from None
    return student


def check_vocab(teacher_rows: int, student: nn.Module, tokenizer) -> int:
    """Student and teacher must share the tokenizer. A teacher head padded with extra rows (Qwen2.5: 152064
    vs 151936) is fine: rows >= the student's are ignored by the loss. ``teacher_rows``: the teacher head's
    rows. Returns the student's vocab size."""
    v_t = int(teacher_rows)
    v_s = student.get_output_embeddings().weight.shape[0]
    n_tok = len(tokenizer)
    if v_s < n_tok:
        raise ConfigError(
            "model.student", v_s, f"a student vocabulary of at least the tokenizer's {n_tok} tokens"
        )
    if v_t < v_s:
        raise ConfigError(
            "model.teacher",
            v_t,
            f"a teacher vocabulary of at least the student's {v_s} rows "
            "(teacher and student must share a tokenizer)",
        )
    return v_s


def check_student_tokenizer(cfg: ModelConfig, tokenizer) -> None:
    """A student folder that ships its own tokenizer must ship the teacher's: compare vocabularies."""
    if not cfg.student:
        return
    source = student_source(cfg)
    if not has_tokenizer_files(source.folder):
        return
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(source.folder), local_files_only=True,
                                          trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            "model.student",
            cfg.student,
            "a student with the teacher's tokenizer "
            f"(vocabularies differ: {len(other)} vs {len(tokenizer)} tokens)",
        )


def head_weight(model: nn.Module) -> torch.Tensor:
    """The lm_head weight [V, H] (never quantised: transformers keeps the output head in full precision)."""
    return model.get_output_embeddings().weight


def _where(model: nn.Module) -> str:
    return type(model).__name__


def head_spec(model: nn.Module) -> dict:
    """``{"weight", "bias", "logit_scale", "softcap"}`` of a causal LM's output head, from the model and its
    config. ValueError naming the attribute when the head cannot be found or is not a plain linear layer."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"{_where(model)}: could not find the output head: `get_output_embeddings()` is missing or "
            "returned None (a causal LM with an lm_head is needed)"
        )
    if hasattr(head, "base_layer"):
        raise ValueError(
            f"{_where(model)}: the lm_head carries adapters (`lm_head.base_layer`); the fused loss reads "
            "the head weight directly: leave lm_head out of the LoRA target_modules"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{_where(model)}: the output head's `weight` is not a floating-point [V, H] matrix "
            f"({type(head).__name__}; a quantised lm_head is not supported)"
        )
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{_where(model)}: no `config` attribute to read the logit scale / soft-cap from")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None) or 0.0
    scale = getattr(text, "logit_scale", None) or 1.0
    scaling = getattr(text, "logits_scaling", None)
    if scaling:
        scale = scale / scaling
    return {"weight": weight, "bias": getattr(head, "bias", None), "logit_scale": float(scale),
            "softcap": float(softcap)}  # fmt: skip


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, L, H] after the last norm, without computing any logits."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
