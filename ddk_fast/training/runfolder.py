"""Pre-flight of a run, before any data or model is loaded: the run folder and what the run may do in it.

:func:`prepare_run_folder` checks, in order, and stops at the first problem with one clear error
(:class:`~ddk_fast.errors.ConfigError` / :class:`~ddk_fast.errors.RunError`, exit 2):

1. the models resolve (a folder, or a Hub id through the Hugging Face cache) and look loadable (config.json,
   weight files whose size matches their header; a model that needs its own code only with
   ``trust_remote_code``), ``seq_len`` (plus the longest teacher prompt prefix) fits each model's
   ``max_position_embeddings``, the tokenizer has files and covers the models' vocabularies, and the
   attention implementation can run here;
2. the run folder can be created and written;
3. no other run holds it (:class:`~ddk_fast.training.runlock.RunLock`, kept for the run's lifetime);
4. what is in it fits the request: a fresh run refuses a folder that holds checkpoints (``--resume``
   continues them, ``--overwrite`` deletes the run's files first); ``--resume`` takes the newest checkpoint
   that verifies, names those that do not, refuses when none does, refuses a checkpoint written for
   another student (``[model]`` keys that change the trainable tensors), and refuses any changed key that
   is not one of :data:`~ddk_fast.config.RESUMABLE_KEYS`.

The run's record of its configuration (:func:`record_config`): ``config.toml`` is the resolved config in
effect from the step the latest start or resume began at, and ``config_history.jsonl`` holds one row per
start / resume (``from_step``, the keys changed, the resolved config), so no file states a value the run
did not use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..config import RESUMABLE_KEYS, RunConfig, dump_toml
from ..errors import ConfigError, RunError
from ..models.hub import (
    ModelSource,
    check_remote_code,
    check_tokenizer,
    inline_config,
    max_positions,
    read_config,
    vocab_rows,
)
from ..models.loading import load_tokenizer, student_source, teacher_source
from . import checkpoint as ckpt
from .runlock import RunLock

log = logging.getLogger("ddk_fast")

# [model] keys that define the student's trainable tensors: a checkpoint written with other values cannot
# be resumed (its tensors have other shapes, or belong to another base model)
STUDENT_KEYS = (
    "teacher",
    "teacher_config",
    "student",
    "student_from_teacher_layers",
    "student_config",
    "student_mode",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
)
# what --overwrite deletes: the files a run writes, nothing else
RUN_ARTIFACTS = (
    "checkpoints",
    "metrics.jsonl",
    "final",
    "final.tmp",
    "report.md",
    "domain_weights.png",
    "domain_losses.png",
    "tensorboard",
    "student_init",
    "student_init.tmp",
    "config.toml",
    "config_history.jsonl",
    "wandb",
    "wandb_id.txt",
)
HISTORY = "config_history.jsonl"
_WEIGHT_FILES = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass
class RunFolder:
    path: Path
    lock: RunLock
    resume_from: Path | None = None
    rejected: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    changes: dict = dataclasses.field(default_factory=dict)  # keys changed on --resume (allowed ones)

    def release(self) -> None:
        self.lock.release()


def prepare_run_folder(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Run every pre-flight check; returns the locked folder and the checkpoint to resume from (or None)."""
    if resume and overwrite:
        raise ConfigError("--overwrite", True, "either --resume or --overwrite, not both")
    check_models(cfg)
    check_trackers(cfg)
    run_dir = Path(cfg.output.dir)
    check_writable(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        folder = RunFolder(run_dir, lock)
        root = run_dir / "checkpoints"
        if overwrite:
            removed = clear_run_folder(run_dir)
            if removed:
                log.info("--overwrite: deleted %s from %s", ", ".join(removed), run_dir)
        elif resume:
            folder.resume_from, folder.rejected = _select_for_resume(root)
            folder.changes = check_resumable(folder.resume_from, cfg)
        else:
            existing = ckpt.list_checkpoints(root)
            if existing:
                raise RunError(
                    f"{run_dir} already holds {len(existing)} checkpoint(s) of an earlier run (newest: "
                    f"{existing[-1][1].name}); continue it with --resume, or start again with --overwrite "
                    "(deletes that run's files), or set another [output] dir"
                )
            for name in ("metrics.jsonl", HISTORY):
                stale = run_dir / name
                if stale.exists():  # rows of a run that stopped before its first checkpoint
                    stale.unlink()
                    log.info("fresh run: removed %s left by a run without checkpoints", stale)
        return folder
    except BaseException:
        lock.release()
        raise


def _select_for_resume(root: Path) -> tuple[Path, list[tuple[Path, str]]]:
    path, rejected = ckpt.select_checkpoint(root)
    for bad, reason in rejected:
        log.warning("--resume: skipping checkpoint %s: %s", bad, reason)
    if path is None:
        if rejected:
            named = "; ".join(f"{p.name}: {r}" for p, r in rejected)
            raise RunError(
                f"--resume: no valid checkpoint in {root} ({named}); start again with --overwrite, "
                "or restore a checkpoint"
            )
        raise RunError(f"--resume: no valid checkpoint in {root} (none was written); run without --resume")
    log.info("--resume: newest valid checkpoint is %s", path)
    return path, rejected


def check_resumable(path: Path, cfg: RunConfig) -> dict:
    """ConfigError when the checkpoint was written for another student (a key of STUDENT_KEYS differs) or
    when a changed key may not change on --resume (:data:`~ddk_fast.config.RESUMABLE_KEYS`). Returns the
    changes that are allowed, ``{"section.key": [old, new]}``."""
    manifest = ckpt.read_manifest(path)
    saved = manifest.get("config") or {}
    now = cfg.to_dict()
    for key in STUDENT_KEYS:
        old, new = saved.get("model", {}).get(key), now["model"][key]
        if old is not None and _norm(old) != _norm(new):
            raise ConfigError(
                f"model.{key}",
                new,
                f"{old!r} as in checkpoint {path} (it was written for another student: resume with the "
                "same [model] section, or start again with --overwrite)",
            )
    changes = config_changes(saved, now)
    refused = [k for k in changes if k not in RESUMABLE_KEYS]
    if refused:
        key = refused[0]
        old, new = changes[key]
        others = f"; also changed: {', '.join(refused[1:])}" if len(refused) > 1 else ""
        raise ConfigError(
            key,
            new,
            f"{old!r} as in checkpoint {path}",
            f"this key cannot change on --resume (the checkpoint's state was made with it; the keys that "
            f"can are listed in the README under 'Resuming'): resume with the checkpoint's value or start "
            f"again with --overwrite{others}",
        )
    if changes:
        log.info(
            "--resume: changed from the checkpoint, in effect from its step: %s",
            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()),
        )
    return changes


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """``{"section.key": [old, new]}`` for every key of ``now`` whose value differs from ``saved`` (keys the
    saved config does not have are skipped: an older checkpoint); list-of-table keys (``data.domains``) by
    entry, ``data.domains[1].weight``."""
    out: dict[str, list] = {}
    for section, values in now.items():
        if not isinstance(values, dict) or not isinstance(saved.get(section), dict):
            continue
        for k, v in values.items():
            if k not in saved[section]:
                continue
            old = saved[section][k]
            tables = isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
            if tables and isinstance(old, list) and len(old) == len(v):
                for i, (a, b) in enumerate(zip(old, v)):
                    for kk, bb in b.items():
                        if isinstance(a, dict) and kk in a and _norm(a[kk]) != _norm(bb):
                            out[f"{section}.{k}[{i}].{kk}"] = [a[kk], bb]
            elif _norm(old) != _norm(v):
                out[f"{section}.{k}"] = [old, v]
    return out


def record_config(run_dir: Path, cfg: RunConfig, step: int, changes: dict | None = None) -> None:
    """Record the config a (re)start trains with from ``step`` (module doc): rows of the history from this
    step on (a later start that wrote no checkpoint) are replaced; ``config.toml`` is rewritten."""
    run_dir = Path(run_dir)
    history = run_dir / HISTORY
    rows = []
    if step > 0 and history.exists():
        for line in history.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and int(row.get("from_step", 0)) < step:
                rows.append(row)
    rows.append({"from_step": step, "changed": changes or {}, "config": _norm(cfg.to_dict())})
    tmp = history.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, history)
    head = f"# the resolved config of this run, in effect from step {step}"
    if step > 0:
        head += f" (a resume; earlier steps: {HISTORY})"
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(head + "\n" + dump_toml(cfg))
    os.replace(tmp, run_dir / "config.toml")


def _norm(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def truncate_metrics(path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` with ``step <= step`` (a resumed run writes the later ones
    again) and drop a torn last line; returns the number of rows dropped. Written atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", 0)) <= step
        except (ValueError, TypeError):
            ok = False  # a line torn by a crash mid-write
        if ok:
            keep.append(line + "\n")
        elif line.strip():
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return dropped


def clear_run_folder(run_dir: Path) -> list[str]:
    """Delete what a run writes into ``run_dir`` (never other files); returns the names removed."""
    removed = []
    for name in RUN_ARTIFACTS:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_writable(run_dir: Path) -> None:
    """ConfigError naming ``[output] dir`` when the folder cannot be created or written."""
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            "output.dir", str(run_dir), "a folder this user can create and write", hint=f"{exc.strerror}"
        ) from None


# ------------------------------------------------------------------------------------------------ models
def check_models(cfg: RunConfig) -> None:
    m = cfg.model
    teacher = teacher_source(m) if m.teacher else None
    student = student_source(m) if m.student else None
    for source in (teacher, student):
        if source is not None:
            check_model_folder(source, source.key)
            check_remote_code(source, m.trust_remote_code)
    if m.attn_implementation in ("flash_attention_2", "flash_attention_3"):
        package = "flash_attn" if m.attn_implementation == "flash_attention_2" else "flash_attn_interface"
        import torch

        dev = cfg.train.device
        cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
        if importlib.util.find_spec(package) is None or not cuda:
            raise ConfigError(
                "model.attn_implementation",
                m.attn_implementation,
                "sdpa or eager here",
                hint=f"{m.attn_implementation} needs a CUDA device and the {package} package "
                "(pip install -e .[gpu])",
            )
    check_shapes(cfg, teacher, student)


def check_trackers(cfg: RunConfig) -> None:
    """``[output] report_to`` names only trackers that are installed (tensorboard is optional anyway)."""
    if "wandb" in cfg.output.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "output.report_to",
            cfg.output.report_to,
            "trackers that are installed",
            "wandb is not: pip install 'ddk_fast[wandb]' (or leave it out of report_to)",
        )


def _prefix_tokens(cfg: RunConfig) -> int:
    """The longest teacher prompt prefix of ``[teacher_prompt] use`` (0 without one; a file that does not
    read is left to the prompts check, which names it)."""
    use = cfg.teacher_prompt.use
    if not use:
        return 0
    try:
        domains = json.loads(Path(use).read_text()).get("domains", {})
        return max((len(e.get("prefix_ids", [])) for e in domains.values()), default=0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def check_shapes(cfg: RunConfig, teacher: ModelSource | None, student: ModelSource | None) -> None:
    """From config.json and the tokenizer files only (no weights): ``seq_len`` (+ the teacher's prompt
    prefix) fits each model's ``max_position_embeddings``, and the tokenizer covers both vocabularies."""
    m = cfg.model
    t_conf = (
        read_config(teacher, m.trust_remote_code)
        if teacher
        else inline_config(m.teacher_config, "model.teacher_config")
    )
    if student is not None:
        s_conf, s_name = read_config(student, m.trust_remote_code), f"the student ({m.student})"
    elif m.student_config:
        s_conf, s_name = inline_config(m.student_config, "model.student_config"), "the inline student"
    else:
        s_conf, s_name = t_conf, "the student (cut from the teacher)"
    t_name = f"the teacher ({m.teacher or 'inline'})"
    seq_len, prefix = cfg.data.seq_len, _prefix_tokens(cfg)
    for conf, name, extra in ((t_conf, t_name, prefix), (s_conf, s_name, 0)):
        limit = max_positions(conf)
        if limit is not None and seq_len + extra > limit:
            with_prefix = f" minus the longest teacher prompt prefix ({extra} tokens)" if extra else ""
            raise ConfigError(
                "data.seq_len",
                seq_len,
                f"at most {limit - extra}: {name} has max_position_embeddings = {limit}{with_prefix}",
                "longer sequences index past its position table (GPT-2) or run beyond its trained context",
            )
    tokenizer = load_tokenizer(m)  # files only: checked for tokenizer files, loaded
    tok_key = "model.tokenizer" if m.tokenizer else "model.teacher"
    tok_spec = m.tokenizer or m.teacher
    check_tokenizer(tokenizer, tok_key, tok_spec, vocab_rows(t_conf), t_name)
    check_tokenizer(tokenizer, tok_key, tok_spec, vocab_rows(s_conf), s_name)


def check_model_folder(source: ModelSource | str, key: str) -> None:
    """ConfigError when ``source`` is not a loadable Hugging Face model folder: no or a broken config.json,
    no weight files, a safetensors file shorter than its header says (truncated copy). A Hub id online is
    checked for its config only (its weights are downloaded by ``from_pretrained`` later)."""
    if isinstance(source, str):
        source = ModelSource(source, key, Path(source))
    root, path = source.folder, source.spec
    expected = "a Hugging Face model folder (config.json and weight files)"
    if source.is_hub:
        expected = f"a Hub model with config.json and weight files (snapshot {root})"
    if not root.is_dir():
        raise ConfigError(key, path, expected, hint="not a folder")
    names = sorted(p.name for p in root.iterdir())
    if not names:
        raise ConfigError(key, path, expected, hint="the folder is empty")
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(key, path, expected, hint=f"no config.json; it holds {names[:6]}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(key, path, expected, hint=f"config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(key, path, expected, hint="config.json has no model_type")
    if not source.weights_local:
        return
    weights = sorted({p for pattern in _WEIGHT_FILES for p in root.glob(pattern)})
    if not weights:
        raise ConfigError(key, path, expected, hint=f"no weight files (*.safetensors, *.bin) in {names[:6]}")
    for p in weights:
        if p.name.endswith(".index.json"):
            try:
                shards = set(json.loads(p.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(
                    key, path, expected, hint=f"{p.name} is not a valid index ({exc})"
                ) from None
            missing = sorted(s for s in shards if not (root / s).is_file())
            if missing:
                raise ConfigError(key, path, expected, hint=f"{p.name} names missing files {missing[:3]}")
        elif p.suffix == ".safetensors":
            problem = _safetensors_problem(p)
            if problem:
                raise ConfigError(key, path, expected, hint=f"{p.name}: {problem}")


def _safetensors_problem(p: Path) -> str | None:
    """Why a .safetensors file is unusable (bad header, shorter than its header says), or None."""
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                return "corrupt header (truncated or not a safetensors file)"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        return f"corrupt header ({type(exc).__name__})"
    if 8 + n + end > size:
        return f"{size} bytes, its header needs {8 + n + end} (a truncated copy)"
    return None
