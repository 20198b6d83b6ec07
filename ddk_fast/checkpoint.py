"""Checkpoints that resume exactly and are never half-written.

Layout of ``<run>/checkpoints/step_<N>/``:
  ``trainable.safetensors``  every parameter with requires_grad (LoRA adapters, or all weights in full mode)
  ``adapter/``               the adapters in peft's own format (``save_pretrained``), loadable by peft
  ``state.pt``               optimizer, scheduler, RNG states, sampler, DDK mixer, trainer counters

A checkpoint is written to ``step_<N>.tmp`` and renamed when complete; ``latest`` is a small text file
replaced atomically (``os.replace``) after the rename. A crash mid-write therefore leaves the previous
checkpoint as the latest, and a stray ``.tmp`` folder is ignored (and removed) on the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, state: dict, keep_last: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    if hasattr(model, "peft_config"):
        model.save_pretrained(tmp / "adapter")
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(ckpt_root, final.name)
    _prune(ckpt_root, keep_last)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
    )
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / LATEST
    if not marker.exists():
        return None
    path = ckpt_root / marker.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: Path, model: nn.Module) -> dict:
    """Load trainable weights into ``model`` (in place) and return the saved state dict."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: unknown parameters {missing[:3]}; "
            "was it written by a run with another [model] section?"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    return torch.load(path / "state.pt", weights_only=False)


# ------------------------------------------------------------------------------------------ sharded (FSDP2)
# Under FSDP every rank holds a shard of the trainable weights and of the optimizer state. They are written
# with torch.distributed.checkpoint (DCP) into ``step_<N>.tmp/dcp/`` by all ranks together; rank 0 then
# writes ``state.pt`` (everything but weights and optimizer) and renames the folder, exactly as above. DCP
# records each tensor's global shape, so the checkpoint loads under another world size (it reshards), and
# also into an unsharded model in a single process.
SHARDED = "dcp"


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)  # adapters only for lora/qlora; all weights for full


def save_sharded_checkpoint(
    ckpt_root: Path, step: int, model: nn.Module, optimizer, state: dict, keep_last: int, rank: int, barrier
) -> Path:
    """Collective: every rank calls it. ``barrier`` synchronises the ranks (a no-argument callable)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f"step_{step:08d}.tmp"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
    barrier()
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(ckpt_root, final.name)
        _prune(ckpt_root, keep_last)
    barrier()
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Collective under FSDP. Loads weights and optimizer state in place; returns ``state.pt``'s dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_dcp_options())
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path / SHARDED))
    set_state_dict(
        model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=_dcp_options()
    )
    return torch.load(path / "state.pt", weights_only=False)
