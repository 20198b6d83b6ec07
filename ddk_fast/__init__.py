"""ddk_fast: kernel-accelerated, domain-aware knowledge distillation for LLMs (DDK + AKD).

``import ddk_fast`` needs only torch: triton, the C++ sampler extension, transformers and datasets are
imported when first used, and nothing touches CUDA at import.
"""

from __future__ import annotations

import importlib

from .ddk import domain_discrepancy, smooth_domain_weights
from .losses import (
    FusedLinearKDLoss,
    FusedLinearKDTopkLoss,
    KDLoss,
    KDOutput,
    KDParams,
    fused_linear_kd_loss,
    fused_linear_kd_loss_topk,
    kd_loss,
)

__version__ = "0.1.0"

_LAZY = {
    "DomainSampler": "ddk_fast.data",
    "TokenShard": "ddk_fast.data",
    "prepare_domains": "ddk_fast.data",
    "RunConfig": "ddk_fast.config",
    "load_config": "ddk_fast.config",
    "ConfigError": "ddk_fast.errors",
}

__all__ = [
    "domain_discrepancy",
    "smooth_domain_weights",
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "kd_loss",
    "KDLoss",
    "KDOutput",
    "KDParams",
    "fused_linear_kd_loss_topk",
    "FusedLinearKDTopkLoss",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddk_fast' has no attribute {name!r}")
