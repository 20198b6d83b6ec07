"""The one optimizer, learning-rate schedule and progress bar of every training loop in ddk_fast: the
distillation loop (:mod:`ddk_fast.training.trainer`) and the demo teacher's pre-training
(:mod:`ddk_fast.demo.teacher`).

Schedule (DDK §4): linear warm-up 0 -> 1 over ``warmup`` steps, then a cosine from 1 to ``min_ratio`` at
``total`` steps, as a multiplier of the peak learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate multiplier at ``step`` (warm-up, then cosine to ``min_ratio``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_1d: bool = True,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its warm-up + cosine schedule.

    ``decay_1d=False`` exempts 1-D tensors (norm weights, biases) from weight decay (GPT-style pre-training);
    the distillation loop decays every trainable tensor alike (its default weight decay is 0)."""
    params = [p for p in params if p.requires_grad]
    if decay_1d:
        groups: list = params
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup_steps, max_steps, min_lr_ratio)
    )
    return opt, sched


def progress_bar(total: int, *, enabled: bool = True, initial: int = 0, unit: str = "step", desc=None):
    """The tqdm bar every loop shows (``set_postfix_str`` carries loss and tokens/s)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)
