"""Per-domain validation cross-entropy: DDK's measurement step (§3, step 1).

The validation batches are fixed (seeded, packed once), so every interval scores the same tokens. Logits are
formed a chunk of tokens at a time from the final hidden states and the lm_head weight, so evaluation never
holds a [tokens x vocab] tensor for a whole batch either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import final_hidden, head_weight

_CHUNK_TOKENS = 1024


@torch.no_grad()
def sequence_ce_sum(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int = -100
) -> tuple[float, int]:
    """Sum of next-token CE (nats) over non-ignored labels of one batch, and the number of such tokens."""
    hidden = final_hidden(model, input_ids)
    h = hidden.reshape(-1, hidden.shape[-1])
    w = head_weight(model)[:vocab_size]
    y = labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], _CHUNK_TOKENS):
        logits = (h[i : i + _CHUNK_TOKENS] @ w.T).float()  # fp32 softmax whatever the compute dtype
        total += F.cross_entropy(
            logits, y[i : i + _CHUNK_TOKENS], ignore_index=ignore_index, reduction="sum"
        ).double()
    return float(total), int((y != ignore_index).sum())


def domain_losses(
    model: nn.Module,
    val_sets: Sequence[dict],
    device: torch.device,
    vocab_size: int,
    batch_size: int,
    ignore_index: int = -100,
) -> list[float]:
    """Mean validation CE per domain. ``val_sets[i]`` holds ``input_ids``/``labels`` arrays [n_i, L]."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for vs in val_sets:
            ce, n = 0.0, 0
            for i in range(0, len(vs["input_ids"]), batch_size):
                ids = torch.as_tensor(np.asarray(vs["input_ids"][i : i + batch_size]), device=device)
                lab = torch.as_tensor(np.asarray(vs["labels"][i : i + batch_size]), device=device)
                s, k = sequence_ce_sum(model, ids, lab, vocab_size, ignore_index)
                ce, n = ce + s, n + k
            out.append(ce / max(n, 1))
    finally:
        model.train(was_training)
    return out
