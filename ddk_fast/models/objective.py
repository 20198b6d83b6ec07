"""The distillation objective as one module: student forward + fused KD loss (DDK Eq. 3) in ``forward``.

Keeping the whole student computation, lm_head included, inside one ``nn.Module.forward`` is what DDP and
FSDP2 need: DDP prepares its gradient reduction in ``forward``, and FSDP2 all-gathers the root's parameters
(embeddings, final norm, lm_head) only for the duration of the root's ``forward``.

The teacher comes in as a :class:`TeacherSignal`, whatever produced it (the online model, a cache: see
``ddk_fast/training/teacher.py``). Its *form* picks the loss: final hidden states and an ``lm_head``
(:class:`TeacherHead`) give the dense :func:`~ddk_fast.losses.fused_linear_kd_loss`; cached top-k rows (ids,
log-probabilities, tail log-mass) give the sparse-teacher :func:`~ddk_fast.losses.fused_linear_kd_loss_topk`.
Both heads' logit transforms (bias, logit scale, soft-cap) reach the loss.

With ``[hidden] weight > 0`` the objective also holds a :class:`~ddk_fast.models.hidden.HiddenStateLoss`
(its projections train with the adapters): the mapped student layers are captured during the same forward,
the teacher's come in as ``TeacherSignal.layers``, and the loss is ``KD loss + weight * hidden loss``. The
hidden loss of the latest forward (detached, and its per-domain token sums) is kept in ``last_hidden``.

``forward(input_ids, labels)`` without a teacher scores the validation set instead: it returns the float64
sum of token CE and the token count (used by :mod:`ddk_fast.models.evaluation`), through the same module so a
sharded student is gathered the same way.

On-policy distillation (``ddk_fast/training/onpolicy.py``) uses two more entries of the same ``forward``:
``sample=SampleSpec`` generates the student's continuations of prompts (:mod:`.generation`; through the
module, so FSDP gathers the sharded student for every decoding step), and ``kd_only_rows`` names rows whose
counted tokens take the KD term only (the student wrote them: there is no label to take CE against). Those
rows get their own loss call with ``ce_weight = 0``; both calls divide by the micro-batch's total count of
counted tokens, so the loss stays the mean over every counted token. The returned per-domain sums are the
other rows'; the KD-only rows' (KD sum, token count) per domain are kept in ``last_onpolicy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import LossConfig
from ..losses import KDOutput, fused_linear_kd_loss, fused_linear_kd_loss_topk
from .evaluation import head_ce_sum
from .generation import SampleSpec, sample_continuations
from .hidden import HiddenStateLoss, capture_layers
from .loading import final_hidden, head_spec


@dataclass
class TeacherHead:
    """A teacher's output head: ``weight`` ``[V_t, H_t]``, optional ``bias`` ``[V_t]`` and its logit
    transform ``softcap * tanh(logit_scale * logits / softcap)`` (softcap 0 = off)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float = 0.0

    @classmethod
    def of(cls, model: nn.Module) -> TeacherHead:
        spec = head_spec(model)
        return cls(spec["weight"], spec["bias"], spec["logit_scale"], spec["softcap"])


@dataclass
class TeacherSignal:
    """What the objective needs from the teacher for one micro-batch (``[B, L]`` tokens).

    Dense: ``hidden`` ``[B, L, H_t]`` (final normalised hidden states) and ``head``. Sparse: ``topk`` =
    (ids int ``[B, L, k]``, log-probabilities ``[B, L, k]``, tail log-mass ``[B, L]``). ``layers``: the
    decoder layers ``[hidden]`` maps, in pair order (online teacher only)."""

    hidden: torch.Tensor | None = None
    head: TeacherHead | None = None
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    layers: list[torch.Tensor] | None = None


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
        self.last_onpolicy: torch.Tensor | None = None  # [2, num_domains]: KD-only rows' KD sums, tokens
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
        teacher: TeacherSignal | None = None,
        kd_only_rows: tuple[int, ...] = (),
        sample: SampleSpec | None = None,
        sample_keys: torch.Tensor | None = None,
    ):
        if sample is not None:  # on-policy: the student continues the prompts `input_ids`
            return self._generate(input_ids, sample, sample_keys)
        if teacher is None:  # validation scoring (no autocast, as the teacher's)
            hidden = final_hidden(self.student, input_ids)
            return head_ce_sum(hidden, head_spec(self.student), labels, self.vocab_size)
        layers = teacher.layers if self.hidden is not None else None
        if layers is not None:
            with capture_layers(self.student, self.hidden.student_layers) as student_layers:
                s_hidden = self._hidden(input_ids)
        else:
            s_hidden = self._hidden(input_ids)
        if teacher.topk is not None:  # the sparse teacher of a top-k cache
            if kd_only_rows:
                raise ValueError("kd_only_rows: not supported with a top-k teacher cache (on-policy needs "
                                 "a teacher that scores new tokens)")  # fmt: skip
            return self._sparse_teacher_loss(s_hidden, labels, domain_ids, *teacher.topk)
        if kd_only_rows:
            out = self._mixed_loss(s_hidden, labels, domain_ids, teacher, kd_only_rows)
        else:
            out = self._kd_loss(s_hidden, labels, domain_ids, teacher.hidden, teacher.head)
        if layers is None:
            return out
        h, domain_sums = self.hidden(student_layers, layers, labels, domain_ids, self.num_domains)
        self.last_hidden = (h.detach(), domain_sums)
        return out._replace(loss=out.loss + self.hidden.weight * h.to(out.loss.dtype))

    def _loss_kwargs(self, labels, domain_ids, **override) -> dict:
        """The arguments both losses take from the batch and the (current stage's) loss config."""
        L = self.loss_cfg
        kwargs = dict(
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
        kwargs.update(override)  # e.g. ce_weight = 0 for the rows the student generated
        return kwargs

    def _generate(self, prompts: torch.Tensor, spec: SampleSpec, keys: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return sample_continuations(self.student, prompts, keys, spec)
        with torch.autocast(self.autocast[0], dtype=self.autocast[1]):
            return sample_continuations(self.student, prompts, keys, spec)

    def _mixed_loss(self, s_hidden, labels, domain_ids, teacher: TeacherSignal, kd_only_rows) -> KDOutput:
        """Rows ``kd_only_rows`` take the KD term only, the others CE + KD (module doc)."""
        rows = s_hidden.shape[0]
        dev = s_hidden.device
        kd_only_set = set(kd_only_rows)
        on = torch.tensor(sorted(kd_only_set), device=dev)
        off = [i for i in range(rows) if i not in kd_only_set]
        labels = labels.reshape(rows, -1)
        doms = domain_ids.reshape(rows, -1) if domain_ids is not None else None
        count = (labels != -100).sum().clamp(min=1)  # every counted token of the micro-batch: the divisor

        def part(idx, **override):
            return self._kd_loss(
                s_hidden[idx], labels[idx], None if doms is None else doms[idx].reshape(-1),
                teacher.hidden[idx], teacher.head, num_items_in_batch=count, **override,
            )  # fmt: skip

        kd_only = part(on, ce_weight=0.0)
        self.last_onpolicy = torch.stack([kd_only.domain_kd_sum, kd_only.domain_tokens]).detach()
        if len(off) == 0:  # every row generated: no CE, and no off-policy sums
            zero = torch.zeros_like(kd_only.domain_kd_sum)
            return KDOutput(kd_only.loss, zero.sum(), zero.sum(), zero, zero, zero)
        rest = part(torch.tensor(off, device=dev))
        return rest._replace(loss=rest.loss + kd_only.loss)

    def _kd_loss(self, s_hidden, labels, domain_ids, teacher_hidden, head: TeacherHead, **override):
        student = head_spec(self.student)
        return fused_linear_kd_loss(
            s_hidden.reshape(-1, s_hidden.shape[-1]),
            student["weight"],
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            head.weight,
            beta=self.loss_cfg.beta,
            skew_lambda=self.loss_cfg.skew_lambda,
            student_bias=student["bias"],
            student_logit_scale=student["logit_scale"],
            student_softcap=student["softcap"],
            teacher_bias=head.bias,
            teacher_logit_scale=head.logit_scale,
            teacher_softcap=head.softcap,
            **self._loss_kwargs(labels, domain_ids, **override),
        )

    def _sparse_teacher_loss(self, s_hidden, labels, domain_ids, topk_ids, topk_logprobs, tail_logmass):
        """The loss against cached teacher rows: top-k ids and log-probs ``[B, L, k]``, tail ``[B, L]``."""
        k = topk_ids.shape[-1]
        return fused_linear_kd_loss_topk(
            s_hidden.reshape(-1, s_hidden.shape[-1]),
            head_spec(self.student)["weight"],
            topk_ids.reshape(-1, k),
            topk_logprobs.reshape(-1, k),
            tail_logmass.reshape(-1),
            **self._loss_kwargs(labels, domain_ids),
        )
