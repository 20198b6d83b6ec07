"""Checkpoints that resume exactly, are never half-written, and are verified before they are trusted.

Layout of ``<run>/checkpoints/step_<N>/``:
  ``trainable.safetensors``  every parameter with requires_grad (LoRA adapters, or all weights in full mode)
  ``adapter/``               the adapters in peft's own format (``save_pretrained``), loadable by peft
  ``state.pt``               optimizer, scheduler, RNG states, sampler, DDK mixer, trainer counters
  ``dcp/``                   under FSDP, instead of the first two: every rank's shard of the trainable
                             weights and of the optimizer state (torch.distributed.checkpoint)
  ``manifest.json``          written last: step, the resolved config and its hash, and per file its size
                             and (files up to ``CHECKSUM_MAX_BYTES``) its sha256

A checkpoint is written to ``step_<N>.tmp`` and renamed when complete; ``latest`` is a small text file
replaced atomically (``os.replace``) after the rename, for people and tools. Resuming does not trust it:
:func:`select_checkpoint` takes the newest checkpoint *by step* whose manifest verifies (sizes and
checksums), and names every newer one that does not. Pruning (:func:`prune`) runs only after the new
checkpoint is complete, orders by step, and never removes the new checkpoint or the newest valid one.
Weights that are not finite are never written (:class:`~ddk_fast.errors.NonFiniteError`); a write that
fails (disk full, read-only folder) removes its temporary folder and raises
:class:`~ddk_fast.errors.CheckpointWriteError` saying which checkpoint is kept.

Full disks: before writing, the free space of the folder is compared with the checkpoint's size (its
tensors, counted); after a failure, whatever the writer raised (``torch.save``'s zip writer raises a
``RuntimeError`` such as ``unexpected pos``, not an ``OSError``), a disk with less than
``FULL_DISK_BYTES`` left, or an ``ENOSPC`` / ``EDQUOT`` anywhere in the exception's chain, is reported as a
full disk.

Safe loading: ``state.pt`` is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, plus the numpy array reconstruction older checkpoints need for their RNG state
(``_STATE_ALLOWED``). Anything else in the pickle is refused (RunError, exit 2) before it runs. New
checkpoints hold no numpy object at all (the numpy RNG state is stored as a tensor).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointWriteError, NonFiniteError, RunError

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKSUM_MAX_BYTES = 64 << 20  # larger files (full-mode weights) are checked by size only
_STEP_DIR = re.compile(r"^step_(\d+)$")
SHARDED = "dcp"  # the folder of a sharded (FSDP) checkpoint's weights and optimizer state
FULL_DISK_BYTES = 1 << 20  # after a failed write, less than this left on the disk means it is full
# what a weights_only load of state.pt may construct beyond torch's defaults: numpy arrays (the numpy RNG
# state of checkpoints written before it was stored as a tensor)
_STATE_ALLOWED = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def rng_state() -> dict:
    """Python, numpy and torch RNG states with no numpy object in them (a weights_only load reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ listing
def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint folders ``step_<N>`` as (N, path), ascending by step (``.tmp`` ones excluded)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entries(folder: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            entry: dict = {"size": size}
            if size <= CHECKSUM_MAX_BYTES:
                entry["sha256"] = _sha256(p)
            files[p.relative_to(folder).as_posix()] = entry
    return files


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint folder; raises RunError when it is missing or unreadable."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: no {MANIFEST} (an incomplete checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise RunError(f"{path}: {MANIFEST} is not a version-{MANIFEST_VERSION} manifest")
    return manifest


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not (one short phrase)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except RunError as exc:
        return str(exc).split(": ", 1)[1]
    m = _STEP_DIR.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"manifest step {manifest.get('step')!r} does not match the folder name"
    files = manifest.get("files")
    weights = ("trainable.safetensors", f"{SHARDED}/.metadata")  # single file, or sharded (DCP)
    if not isinstance(files, dict) or "state.pt" not in files or not any(w in files for w in weights):
        return "manifest lists no state.pt / trainable.safetensors"
    for rel, entry in files.items():
        p = path / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, the manifest says {entry.get('size')} (truncated?)"
        if "sha256" in entry and _sha256(p) != entry["sha256"]:
            return f"{rel} does not match its checksum (corrupt)"
    return None


def select_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint (by step) that verifies, and the (path, reason) of every newer one that does
    not. ``(None, rejected)`` when none verifies."""
    rejected = []
    for _, path in reversed(list_checkpoints(ckpt_root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path, rejected
        rejected.append((path, reason))
    return None, rejected


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest valid checkpoint, or None."""
    return select_checkpoint(ckpt_root)[0]


# ------------------------------------------------------------------------------------------------ saving
def check_finite_weights(model: nn.Module, step: int, all_reduce_min=None) -> None:
    """Raise NonFiniteError when a trainable parameter holds NaN/inf (one device reduction, one sync).

    Sharded (FSDP) parameters are checked shard by shard; ``all_reduce_min`` (a collective, in place) then
    combines the ranks' flags, so every rank raises or none does.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return
    local = [getattr(p, "to_local", None) for _, p in params]
    flags = torch.stack(
        [torch.isfinite(f() if f else p.detach()).all() for f, (_, p) in zip(local, params)]
    ).to(torch.float32)
    if all_reduce_min is not None:
        all_reduce_min(flags)
    if bool(flags.all()):
        return
    bad = [n for (n, _), ok in zip(params, flags.tolist()) if not ok]
    raise NonFiniteError(
        f"step {step}: {len(bad)} trainable parameter(s) are not finite (first: {bad[0]}); refusing to save "
        "them as a checkpoint"
    )


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    state: dict,
    keep_last: int,
    *,
    config: dict | None = None,
) -> Path:
    """Write ``step_<step>`` (weights, state, manifest last), point ``latest`` at it, then prune.

    Raises NonFiniteError before writing anything when a trainable weight is not finite, and
    CheckpointWriteError (also an OSError) when the disk refuses the write; either way the previous
    checkpoints are untouched.
    """
    ckpt_root = Path(ckpt_root)
    check_finite_weights(model, step)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    adapters = hasattr(model, "peft_config")
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        # weights (twice with peft: the adapter folder too), the state's tensors (optimizer moments)
        check_free_space(ckpt_root, step, _nbytes(trainable) * (2 if adapters else 1) + _nbytes(state))
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if adapters:
            model.save_pretrained(tmp / "adapter")
        torch.save(state, tmp / "state.pt")
        _publish(ckpt_root, step, tmp, final, config)
    except CheckpointWriteError:
        raise
    except Exception as exc:  # torch.save's zip writer raises RuntimeError on a full disk, not OSError
        full = disk_full(ckpt_root, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full and not isinstance(exc, OSError):
            raise
        raise _write_error(ckpt_root, step, exc, full) from exc
    prune(ckpt_root, keep_last, protect=final)
    return final


def _nbytes(obj) -> int:
    """Bytes of every tensor in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _free_bytes(folder: Path) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(ckpt_root: Path, step: int, need: int) -> None:
    """CheckpointWriteError (disk full) before anything is written when the folder's disk has less free
    space than ``need`` bytes (the checkpoint's tensors) plus 2 % and 64 KiB for headers and small files."""
    free = _free_bytes(ckpt_root)
    need = int(need * 1.02) + (64 << 10)
    if free is not None and free < need:
        exc = OSError(errno.ENOSPC, f"{free:,} bytes free, the checkpoint needs about {need:,}")
        raise _write_error(ckpt_root, step, exc, full=True)


def disk_full(folder: Path, exc: BaseException) -> bool:
    """Whether a failed write failed because the disk is full, whatever was raised: ENOSPC / EDQUOT in the
    exception's chain, or less than ``FULL_DISK_BYTES`` left on the disk (measured now, with the partial
    write still there)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    free = _free_bytes(folder)
    return free is not None and free < FULL_DISK_BYTES


def _publish(ckpt_root: Path, step: int, tmp: Path, final: Path, config: dict | None) -> None:
    """Write the manifest of the complete ``tmp`` folder, rename it to ``final``, point ``latest`` at it."""
    manifest = {
        "version": MANIFEST_VERSION,
        "step": step,
        "config_hash": config_hash(config or {}),
        "config": config or {},
        "files": _file_entries(tmp),
    }
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    old = ckpt_root / f"step_{step:08d}.old"
    if final.exists():  # the same step again (a resumed run): keep it until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _write_latest(ckpt_root, final.name)


def config_hash(config: dict) -> str:
    """sha256 of the resolved config (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _write_error(ckpt_root: Path, step: int, exc: BaseException, full: bool | None = None):
    if full is None:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    what = "disk full" if full else "write failed"
    kept = latest_checkpoint(ckpt_root)
    kept_text = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
    fix = "free space and run again with --resume" if full else "fix the folder and run again with --resume"
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return CheckpointWriteError(
        f"{what} while writing checkpoint step_{step:08d} in {ckpt_root} ({cause}); {kept_text}; {fix}"
    )


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def prune(ckpt_root: Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Remove old checkpoints, keeping the ``keep_last`` newest valid ones by step (``protect``, the one
    just written, always counts as one of them) and every checkpoint newer than ``protect`` (written by
    something else: never deleted silently). Stray ``.tmp`` folders of older steps go too. Returns what
    was removed."""
    ckpts = list_checkpoints(ckpt_root)
    limit = max((s for s, p in ckpts if protect is not None and p == protect), default=None)
    kept: list[Path] = [protect] if protect is not None else []
    removed = []
    for s, path in reversed(ckpts):
        if path == protect or (limit is not None and s > limit):
            continue
        if len(kept) < keep_last and verify_checkpoint(path) is None:
            kept.append(path)
            continue
        if not kept:  # nothing valid kept yet: never remove the newest valid checkpoint's candidates
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for p in Path(ckpt_root).glob("step_*.tmp"):
        m = re.match(r"^step_(\d+)\.tmp$", p.name)
        if m and (limit is None or int(m.group(1)) < limit):
            shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------------ loading
def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Load trainable weights into ``model`` (in place) and return the saved state dict.

    Every tensor's name and shape is checked against the model before anything is copied; a mismatch
    (another ``[model]`` section, e.g. a changed ``lora_r``) raises RunError naming the tensor.
    """
    path = Path(path)
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise RunError(f"checkpoint {path}: unreadable trainable.safetensors ({exc})") from None
    hint = (
        "it was written by a run with another [model] section (lora_r, layers, student); resume with that "
        "section, or start again with --overwrite"
    )
    missing = [n for n in shapes if n not in params]
    if missing:
        raise RunError(
            f"checkpoint {path} does not match the model: unknown parameters {missing[:3]}; {hint}"
        )
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise RunError(
                f"checkpoint {path} does not match the model: {name} has shape {list(shape)} in the "
                f"checkpoint but {list(params[name].shape)} here; {hint}"
            )
    tensors = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    return _load_state(path)


def _load_state(path: Path) -> dict:
    """``state.pt`` read with ``weights_only=True`` (module doc): an object outside the allow-list is
    refused, never constructed."""
    try:
        with torch.serialization.safe_globals(_STATE_ALLOWED):
            return torch.load(path / "state.pt", weights_only=True)
    except Exception as exc:  # a pickle that does not load, or one that asks for more than plain data
        msg = " ".join(str(exc).split())
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in msg:
            what = msg.split(" Check the documentation")[0]
            sep = "WeightsUnpickler error: " if "WeightsUnpickler error: " in what else "trusted source. "
            what = what.split(sep)[-1].split(" was not an allowed")[0].split(". Please")[0][:160]
            raise RunError(
                f"checkpoint {path}: state.pt holds objects other than tensors, numbers, strings and "
                f"containers ({what}); refused without running it (weights_only "
                "loading): use a checkpoint written by ddk_fast"
            ) from None
        what = f"{type(exc).__name__}: {msg[:200]}"
        raise RunError(f"checkpoint {path}: unreadable state.pt ({what})") from None


# ------------------------------------------------------------------------------------------ sharded (FSDP2)
# Under FSDP every rank holds a shard of the trainable weights and of the optimizer state. They are written
# with torch.distributed.checkpoint (DCP) into ``step_<N>.tmp/dcp/`` by all ranks together; rank 0 then
# writes ``state.pt`` (everything but weights and optimizer) and the manifest, and renames the folder, exactly
# as above (the same verification, finiteness check and pruning). DCP records each tensor's global shape, so
# the checkpoint loads under another world size (it reshards), and also into an unsharded model in a single
# process.


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # adapters only for lora/qlora; all weights for full
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded_checkpoint(
    ckpt_root: Path, step: int, model: nn.Module, optimizer, state: dict, keep_last: int, ctx, *, config=None
) -> Path:
    """Collective: every rank calls it. ``ctx`` is the :class:`~ddk_fast.distributed.ParallelContext`
    (its collectives; rank 0 writes the small files). Raises like :func:`save_checkpoint`, on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_root = Path(ckpt_root)
    check_finite_weights(model, step, ctx.all_reduce_min)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"

    def on_disk(fn):  # rank 0's part of the write: a failure removes tmp and names the kept checkpoint
        def run():
            try:
                fn()
            except Exception as exc:  # a full disk whatever the writer raised (see save_checkpoint)
                full = disk_full(ckpt_root, exc)
                shutil.rmtree(tmp, ignore_errors=True)
                if not full and not isinstance(exc, OSError):
                    raise
                raise _write_error(ckpt_root, step, exc, full) from exc

        ctx.main_only(run)

    def start():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finish():
        torch.save(state, tmp / "state.pt")
        _publish(ckpt_root, step, tmp, final, config)

    on_disk(start)
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
    except Exception as exc:  # DCP gathers every rank's failure and raises on all of them
        os_error = _os_error(exc)
        full = disk_full(ckpt_root, exc)
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if os_error is None and not full:
            raise
        raise _write_error(ckpt_root, step, os_error or exc, full or None) from exc
    on_disk(finish)
    ctx.main_only(lambda: prune(ckpt_root, keep_last, protect=final))
    return final


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (DCP wraps each rank's failure in a CheckpointException), or None."""
    if isinstance(exc, OSError):
        return exc
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, OSError):
            return inner
    return None


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Collective under FSDP. Loads weights and optimizer state in place; returns ``state.pt``'s dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path / SHARDED))
    # not strict: the checkpoint holds only the trainable tensors (ignore_frozen_params), so a strict load
    # would report every frozen base weight of a lora/qlora student as missing. The keys loaded are exactly
    # those get_state_dict listed above, i.e. every trainable tensor, so nothing trainable can be skipped.
    set_state_dict(
        model,
        optimizer,
        model_state_dict=sd["model"],
        optim_state_dict=sd["optim"],
        options=_dcp_options(strict=False),
    )
    return _load_state(path)
