"""The non-finite policy's checks, kept out of the loop so every loop (single process, DDP, FSDP) calls the
same ones.

* :func:`step_is_finite`: a step is applied only when its loss **and** its gradient norm are finite. Both
  are reduced to one flag on the device (and over the ranks with MIN, so every rank takes the same
  decision); reading it is the step's one host sync, never one per micro-batch.
* :class:`TeacherGuard`: the frozen teacher must produce finite outputs. It is checked at its first forward
  on each domain (a host read only until every domain has been seen), on its validation losses, and, when
  a step is not finite, from per-domain counts accumulated on the device during the step, so a teacher
  fault gets its own error naming the step and the domain instead of being blamed on the student.
* Weights are verified before a checkpoint is written (:func:`.checkpoint.check_finite_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import NonFiniteTeacherError


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, all_reduce_min=None) -> bool:
    """True when both the loss and the gradient norm are finite (one host read). ``all_reduce_min`` (a
    collective, in place) makes it True only when they are finite on every rank."""
    return step_flags(loss, grad_norm, all_reduce_min)[0]


def step_flags(
    loss: torch.Tensor, grad_norm: torch.Tensor, all_reduce_min=None, stop_requested: bool = False
) -> tuple[bool, bool]:
    """(finite, stop): the step's loss and gradient norm are finite on every rank, and some rank was asked
    to stop (SIGINT / SIGTERM, :mod:`.signals`). Both flags travel in one vector, reduced with MIN over the
    ranks, so reading them is still the step's one host sync and every rank takes both decisions alike."""
    finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).all().to(torch.float32).reshape(1)
    go = torch.full((1,), 0.0 if stop_requested else 1.0, dtype=torch.float32, device=finite.device)
    flags = torch.cat([finite, go])
    if all_reduce_min is not None:
        all_reduce_min(flags)
    f, g = flags.tolist()
    return f == 1.0, g == 0.0


class TeacherGuard:
    """Detects a teacher whose final hidden states are NaN/inf, and names the step and the domain."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.seen = np.zeros(len(self.names), dtype=bool)
        self._bad: torch.Tensor | None = None  # non-finite teacher tokens per domain, this step (device)

    def start_step(self) -> None:
        self._bad = None

    def observe(self, step: int, hidden: torch.Tensor, domain_ids: np.ndarray, dom: torch.Tensor) -> None:
        """Record one teacher forward: ``hidden`` [..., H], ``domain_ids`` the batch's ids on the host and
        ``dom`` the same ids on the device (flattened)."""
        bad_tokens = (~torch.isfinite(hidden).all(dim=-1)).reshape(-1).to(torch.float32)
        counts = torch.zeros(len(self.names), dtype=torch.float32, device=hidden.device)
        counts.index_add_(0, dom.reshape(-1), bad_tokens)
        self._bad = counts if self._bad is None else self._bad + counts
        present = np.unique(np.asarray(domain_ids))
        if not self.seen[present].all():  # the teacher's first forward on a domain: check it now
            self.seen[present] = True
            self.check(step, "at its first forward on the domain")

    def check(
        self, step: int, when: str = "in a step whose loss was not finite", all_reduce_sum=None
    ) -> None:
        """Raise NonFiniteTeacherError when this step's teacher outputs held NaN/inf (one host read).

        ``all_reduce_sum`` (a collective: every rank must call ``check`` then) sums the counts over the ranks,
        so all of them raise together, each naming every rank's bad domains.
        """
        if all_reduce_sum is not None:
            if self._bad is None:
                self._bad = torch.zeros(len(self.names), dtype=torch.float32)
            all_reduce_sum(self._bad)
        if self._bad is None:
            return
        counts = self._bad.cpu().tolist()
        bad = [(n, int(c)) for n, c in zip(self.names, counts) if c > 0]
        if bad:
            where = ", ".join(f"{n} ({c} tokens)" for n, c in bad)
            raise NonFiniteTeacherError(
                f"step {step}: the teacher's hidden states are not finite {when}, on domain {where}; the "
                "fault is in the teacher (its weights, or an overflow in its dtype: try [model] dtype = "
                '"float32"), not the student'
            )

    def check_losses(self, step: int, losses: Sequence[float]) -> None:
        """The teacher's per-domain validation losses must be finite."""
        bad = [n for n, x in zip(self.names, losses) if not math.isfinite(x)]
        if bad:
            raise NonFiniteTeacherError(
                f"step {step}: the teacher's validation loss is not finite on domain {', '.join(bad)}; the "
                "fault is in the teacher (its weights, or an overflow in its dtype), not the student"
            )
