"""The one place that chooses compute backends.

Two choices live here:
- the KD loss: ``triton`` (fused kernels in ``ddk_fast/kernels``) or ``torch``
  (``ddk_fast/ops/reference.py``);
- the domain sampler: ``cpp`` (the optional ``ddk_fast._sampler_ext`` pybind11 extension) or ``numpy``.

Rules (nanochat's pattern): an environment variable or an explicit argument overrides; ``auto`` picks the
fastest backend that can run and records *why* when it falls back; an explicit choice that cannot run raises
:class:`~ddk_fast.errors.BackendUnavailableError` with the fix. Nothing here imports triton or the C++
extension at ``import ddk_fast`` time.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

from .errors import BackendUnavailableError

LOSS_BACKENDS = ("auto", "triton", "torch")
SAMPLER_BACKENDS = ("auto", "cpp", "numpy")
LOSS_ENV = "DDK_FAST_LOSS_BACKEND"
SAMPLER_ENV = "DDK_FAST_SAMPLER_BACKEND"


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, else the reason (cached: importing triton is slow)."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        name = exc.__class__.__name__
        return f"triton is not importable ({name}: {exc}); install it with `pip install triton`"
    return None


def resolve_loss_backend(requested: str, on_cuda: bool) -> BackendChoice:
    """Choose the KD-loss backend for tensors on CUDA (``on_cuda``) or on the CPU.

    ``auto``: triton for CUDA tensors when triton imports, else torch. Interpreted triton on CPU is
    40-3000x slower than torch, so ``auto`` never picks it; ``triton`` on CPU tensors runs only with
    ``TRITON_INTERPRET=1`` (that is how the CPU test suite exercises the kernels).
    """
    requested = os.environ.get(LOSS_ENV, requested) or "auto"
    if requested not in LOSS_BACKENDS:
        raise ValueError(f"loss backend: expected one of {LOSS_BACKENDS}, got {requested!r}")
    if requested == "torch":
        return BackendChoice("torch", "requested")
    if requested == "auto" and not on_cuda:  # decided without importing triton (~1 s, ~30 modules)
        return BackendChoice("torch", "tensors are on the CPU: the chunked torch path is fastest there")
    err = triton_import_error()
    if requested == "triton":
        if err is not None:
            raise BackendUnavailableError(f"backend='triton' was requested but {err}")
        if not on_cuda and not triton_interpreter_enabled():
            raise BackendUnavailableError(
                "backend='triton' was requested for CPU tensors; triton runs on CPU only under its "
                "interpreter: set TRITON_INTERPRET=1 before importing triton, move the tensors to CUDA, "
                "or use backend='torch'"
            )
        return BackendChoice("triton", "requested")
    if err is not None:
        return BackendChoice("torch", err)
    return BackendChoice("triton", "CUDA tensors and triton available")


SAMPLER_EXT = "ddk_fast._sampler_ext"
BUILD_HINT = "build it with `pip install -e .` (needs a C++ compiler and pybind11) or `make ext`"


@functools.cache
def sampler_ext_import_error() -> str | None:
    try:
        importlib.import_module(SAMPLER_EXT)
    except Exception as exc:
        return f"the C++ sampler extension is not built ({exc.__class__.__name__}: {exc}); {BUILD_HINT}"
    return None


def resolve_sampler_backend(requested: str) -> BackendChoice:
    """Choose the DomainSampler backend: ``cpp`` when the extension is built, else ``numpy``."""
    requested = os.environ.get(SAMPLER_ENV, requested) or "auto"
    if requested not in SAMPLER_BACKENDS:
        raise ValueError(f"sampler backend: expected one of {SAMPLER_BACKENDS}, got {requested!r}")
    if requested == "numpy":
        return BackendChoice("numpy", "requested")
    err = sampler_ext_import_error()
    if requested == "cpp":
        if err is not None:
            raise BackendUnavailableError(f"sampler backend 'cpp' was requested but {err}")
        return BackendChoice("cpp", "requested")
    if err is not None:
        return BackendChoice("numpy", err)
    return BackendChoice("cpp", "C++ extension built")
