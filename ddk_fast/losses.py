"""Public KD-loss API: ``fused_linear_kd_loss`` / ``FusedLinearKDLoss`` and ``kd_loss`` / ``KDLoss``.

The backend is chosen by :func:`ddk_fast.backend.resolve_loss_backend`: ``triton`` (fused kernels,
``ddk_fast/kernels/kd_forward.py``, ``kd_backward.py``) for CUDA tensors, the chunked torch reference
(``ddk_fast/ops/reference.py``) on CPU. Importing this module imports neither triton nor touches CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import resolve_loss_backend
from .ops.fused_linear_kd import fused_linear_kd_loss_triton, kd_loss_triton  # no triton import here
from .ops.reference import (
    KDOutput,
    check_linear_shapes,
    check_logits,
    check_tokens,
    fused_linear_kd_loss_reference,
    kd_loss_reference,
    make_params,
)

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "kd_loss", "KDLoss", "KDOutput"]


def _full(t):
    """A DTensor (FSDP2-sharded weight) is gathered; autograd flows back to the shards."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _backend_name(backend: str, on_cuda: bool) -> str:
    return resolve_loss_backend(backend, on_cuda).name


# == torch.compiler.assume_constant_result(_backend_name): torch.compile evaluates it eagerly (it imports
# triton and reads the environment) and treats the name as a constant. Set by hand because the decorator
# imports torch._dynamo, which imports triton at `import ddk_fast` time.
_backend_name._dynamo_marked_constant = True


def _check_chunk(chunk_size):
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    skew_lambda: float = 0.1,
    student_logit_scale: float = 1.0,
    student_softcap: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float = 0.0,
    chunk_size: int | None = None,
) -> KDOutput:
    """Student and teacher ``lm_head`` + cross-entropy + distillation divergence, without [N, V] logits.

    Args:
        student_hidden: ``[N, H_s]`` final hidden states of the student (after the final norm); fp32/bf16.
        student_weight: ``[V_s, H_s]`` student ``lm_head`` weight; gets a gradient only if it requires grad.
        teacher_hidden: ``[N, H_t]``. teacher_weight: ``[V_t, H_t]`` with ``V_t >= V_s``; rows ``>= V_s`` are
            padding and are never read. The teacher gets no gradient.
        labels: ``[N]`` int64 or None; ``ignore_index`` marks tokens counted in neither term. Without labels
            CE is 0 and every token counts for D. Values must lie in ``[0, V_s)`` (not checked: no host sync).
        domain_ids: ``[N]`` int64 in ``[0, num_domains)`` or None (then the domain sums are zeros).
        divergence: ``forward_kl`` KL(p||q) | ``reverse_kl`` KL(q||p) | ``jsd`` (beta: TRL convention,
            M = beta p + (1-beta) q, D = beta KL(p||M) + (1-beta) KL(q||M), beta 0 / 1 = forward / reverse KL)
            | ``skew_forward_kl`` KL(p || lam p + (1-lam) q) | ``skew_reverse_kl`` KL(q || lam q + (1-lam) p)
            | ``total_variation`` 1/2 sum |p - q|; p = softmax(t/T) teacher, q = softmax(s/T) student,
            lam = ``skew_lambda``.
        temperature: T > 0 for D only; CE uses the un-tempered student logits.
        student_logit_scale, student_softcap (and teacher_*): per-model logits
            ``softcap * tanh(scale * h W^T / softcap)`` (Gemma-2 soft-capping; softcap 0 = off; Cohere scale).
        backend: ``auto`` (triton on CUDA, torch on CPU) | ``triton`` | ``torch``; the env var
            ``DDK_FAST_LOSS_BACKEND`` overrides.
        chunk_size: rows per chunk of the torch path (default: ~16 MiB fp32 tiles).

    Returns:
        :class:`KDOutput` with ``loss = ce_weight * CE + kd_weight * (T^2 if scale_by_t2 else 1) * D`` (scalar
        fp32; CE and D means over counted tokens; 0 with zero gradients when every token is ignored),
        ``ce``/``kd`` the detached means (kd without T^2 and weight), and ``domain_ce_sum``,
        ``domain_kd_sum``, ``domain_tokens`` (``[num_domains]`` fp32 sums over counted tokens).
    """
    p = make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains,
        skew_lambda, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    )  # fmt: skip
    _check_chunk(chunk_size)
    student_weight, teacher_weight = _full(student_weight), _full(teacher_weight)
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    if _backend_name(backend, student_hidden.is_cuda) == "triton":
        return fused_linear_kd_loss_triton(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, domain_ids, p
        )
    return fused_linear_kd_loss_reference(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, domain_ids,
        chunk_size=chunk_size, params=p,
    )  # fmt: skip


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    skew_lambda: float = 0.1,
    student_logit_scale: float = 1.0,
    student_softcap: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float = 0.0,
    chunk_size: int | None = None,
) -> KDOutput:
    """The same loss from logits the caller already has: ``student_logits`` ``[N, V_s]`` (gets a gradient in
    its own dtype), ``teacher_logits`` ``[N, V_t >= V_s]`` (columns ``>= V_s`` ignored, no gradient). Other
    arguments and the result as :func:`fused_linear_kd_loss`. The triton path is a chunked-vocabulary kernel
    (online softmax over vocabulary tiles, fp32 math whatever the logits' dtype)."""
    p = make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains,
        skew_lambda, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    )  # fmt: skip
    _check_chunk(chunk_size)
    check_logits(student_logits, teacher_logits)
    check_tokens(student_logits.shape[0], labels, domain_ids, p.num_domains, student_logits.device)
    if _backend_name(backend, student_logits.is_cuda) == "triton":
        return kd_loss_triton(student_logits, teacher_logits, labels, domain_ids, p)
    return kd_loss_reference(
        student_logits, teacher_logits, labels, domain_ids, chunk_size=chunk_size, params=p
    )


class _KDLossBase(nn.Module):
    def __init__(
        self,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        scale_by_t2: bool = True,
        ignore_index: int = -100,
        num_domains: int = 0,
        backend: str = "auto",
        **extras,
    ):
        super().__init__()
        make_params(
            divergence,
            beta,
            temperature,
            kd_weight,
            ce_weight,
            scale_by_t2,
            ignore_index,
            num_domains,
            **{k: v for k, v in extras.items() if k != "chunk_size"},
        )  # fmt: skip  (fail at construction, not at the first step)
        self.kwargs = dict(
            divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
            ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            num_domains=num_domains, backend=backend, **extras,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearKDLoss(_KDLossBase):
    """Module form of :func:`fused_linear_kd_loss` (stores the hyper-parameters, nothing else).

    ``forward(student_hidden [N, H_s], student_weight [V_s, H_s], teacher_hidden [N, H_t],
    teacher_weight [V_t, H_t], labels=None, domain_ids=None) -> KDOutput``."""

    def forward(
        self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, domain_ids=None
    ):
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, domain_ids, **self.kwargs
        )


class KDLoss(_KDLossBase):
    """Module form of :func:`kd_loss`: ``forward(student_logits [N, V_s], teacher_logits [N, V_t],
    labels=None, domain_ids=None) -> KDOutput``."""

    def forward(self, student_logits, teacher_logits, labels=None, domain_ids=None):
        return kd_loss(student_logits, teacher_logits, labels, domain_ids, **self.kwargs)
