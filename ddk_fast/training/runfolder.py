"""Pre-flight of a run, before any data or model is loaded: the run folder and what the run may do in it.

:func:`prepare_run_folder` checks, in order, and stops at the first problem with one clear error
(:class:`~ddk_fast.errors.ConfigError` / :class:`~ddk_fast.errors.RunError`, exit 2):

1. the model folders look loadable (config.json, weight files whose size matches their header) and the
   attention implementation can run here;
2. the run folder can be created and written;
3. no other run holds it (:class:`~ddk_fast.training.runlock.RunLock`, kept for the run's lifetime);
4. what is in it fits the request: a fresh run refuses a folder that holds checkpoints (``--resume``
   continues them, ``--overwrite`` deletes the run's files first); ``--resume`` takes the newest checkpoint
   that verifies, names those that do not, refuses when none does, and refuses a checkpoint written for
   another student (``[model]`` keys that change the trainable tensors).
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

from ..config import RunConfig
from ..errors import ConfigError, RunError
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
)
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

    def release(self) -> None:
        self.lock.release()


def prepare_run_folder(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Run every pre-flight check; returns the locked folder and the checkpoint to resume from (or None)."""
    if resume and overwrite:
        raise ConfigError("--overwrite", True, "either --resume or --overwrite, not both")
    check_models(cfg)
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
            check_resumable(folder.resume_from, cfg)
        else:
            existing = ckpt.list_checkpoints(root)
            if existing:
                raise RunError(
                    f"{run_dir} already holds {len(existing)} checkpoint(s) of an earlier run (newest: "
                    f"{existing[-1][1].name}); continue it with --resume, or start again with --overwrite "
                    "(deletes that run's files), or set another [output] dir"
                )
            stale = run_dir / "metrics.jsonl"
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


def check_resumable(path: Path, cfg: RunConfig) -> None:
    """ConfigError when the checkpoint was written for another student (a key of STUDENT_KEYS differs);
    other config changes are allowed and logged."""
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
    changed = [
        f"[{section}] {k}"
        for section, values in now.items()
        if isinstance(values, dict)
        for k, v in values.items()
        if section != "output"
        and section in saved
        and k in saved[section]
        and _norm(saved[section][k]) != _norm(v)
    ]
    if changed:
        log.warning("--resume: config differs from the checkpoint's in %s", ", ".join(changed))


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
    if m.teacher:
        check_model_folder(m.teacher, "model.teacher")
    if m.student:
        check_model_folder(m.student, "model.student")
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


def check_model_folder(path: str, key: str) -> None:
    """ConfigError when ``path`` is not a loadable Hugging Face model folder: no or a broken config.json,
    no weight files, a safetensors file shorter than its header says (truncated copy)."""
    root = Path(path)
    expected = "a Hugging Face model folder (config.json and weight files)"
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
