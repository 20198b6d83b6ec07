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
