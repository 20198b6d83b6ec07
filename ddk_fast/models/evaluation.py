"""Per-domain validation cross-entropy: DDK's measurement step (§3, step 1).

The validation batches are fixed (seeded, packed once), so every interval scores the same tokens. Logits are
formed a chunk of tokens at a time from the final hidden states and the lm_head weight, so evaluation never
holds a [tokens x vocab] tensor for a whole batch either.

Across ranks (:func:`domain_ce_sums`): the validation batches of each domain (``batch_size`` sequences each,
the same batches whatever the world size) are dealt round-robin to the ranks; each rank writes its batches'
(sum of token CE, token count) into its slots of a float64 ``[batches]`` vector, the vectors are all-reduced
(each slot has one non-zero contribution, so the sum is exact) and every rank adds the slots up in batch
order. The per-domain means are therefore bit-identical on every rank and equal to the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loading import final_hidden, head_spec

_CHUNK_TOKENS = 1024

# (input_ids [b, L], labels [b, L]) -> (float64 sum of token CE, number of counted tokens), device tensors
ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _full(t):
    full = getattr(t, "full_tensor", None)  # an FSDP2-sharded head is gathered
    return full() if callable(full) else t


def hidden_ce_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE (float64 scalar) over non-ignored labels, and their count; no host sync. The
    logits are ``softcap * tanh(logit_scale * (h W^T + b) / softcap)`` (softcap 0: no cap), as the loss's."""
    w = _full(weight)[:vocab_size]
    b = None if bias is None else _full(bias)[:vocab_size]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], _CHUNK_TOKENS):
        logits = (h[i : i + _CHUNK_TOKENS] @ w.T).float()  # fp32 softmax whatever the compute dtype
        if b is not None:
            logits = logits + b.float()
        if logit_scale != 1.0:
            logits = logits * logit_scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        total += F.cross_entropy(
            logits, y[i : i + _CHUNK_TOKENS], ignore_index=ignore_index, reduction="sum"
        ).double()
    return total, (y != ignore_index).sum()


def head_ce_sum(hidden: torch.Tensor, head, labels: torch.Tensor, vocab_size: int, ignore_index: int = -100):
    """:func:`hidden_ce_sum` through a head (``head_spec``'s dict, or anything with ``weight``, ``bias``,
    ``logit_scale`` and ``softcap`` attributes)."""
    get = head.get if isinstance(head, dict) else lambda k: getattr(head, k)
    return hidden_ce_sum(
        hidden, get("weight"), labels, vocab_size, ignore_index,
        bias=get("bias"), logit_scale=get("logit_scale"), softcap=get("softcap"),
    )  # fmt: skip


@torch.no_grad()
def sequence_ce_sum(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int = -100
) -> tuple[float, int]:
    """Sum of next-token CE (nats) over non-ignored labels of one batch, and the number of such tokens."""
    total, n = head_ce_sum(final_hidden(model, input_ids), head_spec(model), labels, vocab_size, ignore_index)
    return float(total), int(n)


def model_score_fn(model: nn.Module, vocab_size: int, ignore_index: int = -100) -> ScoreFn:
    """Score batches with a causal LM's final hidden states and lm_head."""
    head = head_spec(model)

    def score(ids, labels):
        return head_ce_sum(final_hidden(model, ids), head, labels, vocab_size, ignore_index)

    return score


def domain_score_fn(hidden_fn, head, vocab_size: int, ignore_index: int = -100) -> ScoreFn:
    """Score batches of one domain with final hidden states that depend on the domain (``hidden_fn(ids,
    domain)``, e.g. a teacher after that domain's prompt): called with the domain index as a third
    argument (``by_domain``)."""

    def score(ids, labels, domain):
        return head_ce_sum(hidden_fn(ids, domain), head, labels, vocab_size, ignore_index)

    score.by_domain = True
    return score


@torch.no_grad()
def domain_ce_sums(
    score: ScoreFn,
    val_sets: Sequence[dict],
    device: torch.device,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> list[tuple[float, int]]:
    """Per domain (sum of token CE, token count) over its validation set, shared over ranks (module doc).

    ``all_reduce`` sums a tensor over ranks in place (None in a single process). ``lockstep``: every rank
    runs the same number of forward passes (a rank without a batch left scores batch 0 and discards it), as
    FSDP needs: its forward passes are collectives. A ``score`` with ``by_domain = True`` also gets the
    domain index (the prefixed teacher of ``[teacher_prompt]``).
    """
    n_batches = [-(-len(vs["input_ids"]) // batch_size) for vs in val_sets]
    starts = np.concatenate([[0], np.cumsum(n_batches)])
    sums = torch.zeros(int(starts[-1]), 2, dtype=torch.float64, device=device)
    mine = range(rank, int(starts[-1]), world_size)
    rounds = -(-int(starts[-1]) // world_size) if lockstep else len(mine)
    for r in range(rounds):
        slot = rank + r * world_size
        real = slot < starts[-1]
        d = int(np.searchsorted(starts, slot if real else 0, side="right")) - 1
        i = ((slot if real else 0) - int(starts[d])) * batch_size
        vs = val_sets[d]
        ids = torch.as_tensor(np.asarray(vs["input_ids"][i : i + batch_size]), device=device)
        lab = torch.as_tensor(np.asarray(vs["labels"][i : i + batch_size]), device=device)
        s, k = score(ids, lab, d) if getattr(score, "by_domain", False) else score(ids, lab)
        if real:
            sums[slot, 0] = s
            sums[slot, 1] = k.double()
    if all_reduce is not None:
        all_reduce(sums)
    flat = sums.cpu().tolist()  # the one host sync of an evaluation
    out = []
    for d in range(len(val_sets)):
        ce, n = 0.0, 0
        for s, k in flat[int(starts[d]) : int(starts[d + 1])]:
            ce, n = ce + s, n + int(k)  # batch order: the same sum on every rank and world size
        out.append((ce, n))
    return out


def sharded_domain_losses(
    score: ScoreFn,
    val_sets: Sequence[dict],
    device: torch.device,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
) -> list[float]:
    """Mean CE per domain from :func:`domain_ce_sums` (same arguments): identical on every rank."""
    sums = domain_ce_sums(score, val_sets, device, batch_size, rank, world_size, all_reduce, lockstep)
    return [ce / max(n, 1) for ce, n in sums]


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
    try:
        sums = domain_ce_sums(model_score_fn(model, vocab_size, ignore_index), val_sets, device, batch_size)
    finally:
        model.train(was_training)
    return [ce / max(n, 1) for ce, n in sums]
