"""The distillation objective as one module: student forward + fused KD loss (DDK Eq. 3) in ``forward``.

Keeping the whole student computation, lm_head included, inside one ``nn.Module.forward`` is what DDP and
FSDP2 need: DDP prepares its gradient reduction in ``forward``, and FSDP2 all-gathers the root's parameters
(embeddings, final norm, lm_head) only for the duration of the root's ``forward``. The teacher's hidden
states and head weight come in as arguments (it is frozen and runs under ``no_grad``).

Training from a teacher cache (``[model] teacher_cache``), the teacher comes in as its cached top-k rows
(``teacher_topk``: ids, log-probabilities, tail log-mass) and the loss is the sparse-teacher
:func:`~ddk_fast.losses.fused_linear_kd_loss_topk`.

With ``[hidden] weight > 0`` the objective also holds a :class:`~ddk_fast.hidden.HiddenStateLoss`
(its projections train with the adapters): the mapped student layers are captured during the same forward,
the teacher's come in as ``teacher_layers``, and the loss is ``KD loss + weight * hidden loss``. The hidden
loss of the latest forward (detached, and its per-domain token sums) is kept in ``last_hidden`` for logging.

``forward(input_ids, labels)`` without teacher inputs scores the validation set instead: it returns the
float64 sum of token CE and the token count (used by :mod:`ddk_fast.evaluation`), through the same module
so a sharded student is gathered the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LossConfig
from .evaluation import hidden_ce_sum
from .hidden import HiddenStateLoss, capture_layers
from .losses import fused_linear_kd_loss, fused_linear_kd_loss_topk
from .models import final_hidden, head_weight


class DistillObjective(nn.Module):
    def __init__(
        self,
        student: nn.Module,
        loss: LossConfig,
        num_domains: int,
        vocab_size: int,
        backend: str,
        autocast,
        hidden: HiddenStateLoss | None = None,
    ):
        super().__init__()
        self.student = student
        self.hidden = hidden  # None: [hidden] off (no hooks, no parameters)
        self.last_hidden: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss_cfg = loss
        self.num_domains = num_domains
        self.vocab_size = vocab_size
        self.backend = backend
        self.autocast = autocast  # (device_type, dtype) for the student forward, or None

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return final_hidden(self.student, input_ids)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return final_hidden(self.student, input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        domain_ids: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        teacher_layers: list[torch.Tensor] | None = None,
    ):
        if teacher_hidden is None and teacher_topk is None:  # validation scoring (no autocast, as teacher)
            hidden = final_hidden(self.student, input_ids)
            return hidden_ce_sum(hidden, head_weight(self.student), labels, self.vocab_size)
        if self.hidden is not None and teacher_layers is not None:
            with capture_layers(self.student, self.hidden.student_layers) as student_layers:
                s_hidden = self._hidden(input_ids)
        else:
            s_hidden = self._hidden(input_ids)
        if teacher_topk is not None:  # training from a teacher cache
            return self._sparse_teacher_loss(s_hidden, labels, domain_ids, *teacher_topk)
        out = self._kd_loss(s_hidden, labels, domain_ids, teacher_hidden, teacher_weight)
        if self.hidden is None or teacher_layers is None:
            return out
        h, domain_sums = self.hidden(student_layers, teacher_layers, labels, domain_ids, self.num_domains)
        self.last_hidden = (h.detach(), domain_sums)
        return out._replace(loss=out.loss + self.hidden.weight * h.to(out.loss.dtype))

    def _loss_kwargs(self, labels, domain_ids) -> dict:
        """The arguments both losses take from the batch and the (current stage's) loss config."""
        L = self.loss_cfg
        return dict(
            labels=labels.reshape(-1),
            domain_ids=domain_ids,
            num_domains=self.num_domains,
            divergence=L.divergence,
            temperature=L.temperature,
            kd_weight=L.kd_weight,
            ce_weight=L.ce_weight,
            scale_by_t2=L.scale_by_t2,
            backend=self.backend,
        )

    def _kd_loss(self, s_hidden, labels, domain_ids, teacher_hidden, teacher_weight):
        return fused_linear_kd_loss(
            s_hidden.reshape(-1, s_hidden.shape[-1]),
            head_weight(self.student),
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight,
            beta=self.loss_cfg.beta,
            skew_lambda=self.loss_cfg.skew_lambda,
            **self._loss_kwargs(labels, domain_ids),
        )

    def _sparse_teacher_loss(self, s_hidden, labels, domain_ids, topk_ids, topk_logprobs, tail_logmass):
        """The loss against cached teacher rows: top-k ids and log-probs ``[B, L, k]``, tail ``[B, L]``."""
        k = topk_ids.shape[-1]
        return fused_linear_kd_loss_topk(
            s_hidden.reshape(-1, s_hidden.shape[-1]),
            head_weight(self.student),
            topk_ids.reshape(-1, k),
            topk_logprobs.reshape(-1, k),
            tail_logmass.reshape(-1),
            **self._loss_kwargs(labels, domain_ids),
        )
