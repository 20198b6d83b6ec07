"""Public KD-loss API: ``fused_linear_kd_loss`` / ``FusedLinearKDLoss`` and ``kd_loss`` / ``KDLoss``.

The backend is chosen by :func:`ddk_fast.backend.resolve_loss_backend`: ``triton`` (fused kernels,
``ddk_fast/kernels/kd_forward.py``, ``kd_backward.py``) for CUDA tensors, the chunked torch reference
(``ddk_fast/ops/reference.py``) on CPU. Importing this module imports neither triton nor touches CUDA.

What this layer adds to the ops: ``[B, T, H]`` inputs (flattened here), ``shift_labels``, the reduction
(``mean`` / ``sum`` / ``num_items_in_batch``), the float64 policy and the ``validate=`` value check.
"""

from __future__ import annotations

import torch
from torch import nn

from .backend import resolve_loss_backend
from .ops.fused_linear_kd import fused_linear_kd_loss_triton, kd_loss_triton  # no triton import here
from .ops.params import (
    KDOutput,
    KDParams,
    check_bias,
    check_linear_shapes,
    check_logits,
    check_token_values,
    check_tokens,
    make_params,
)
from .ops.reference import check_chunk, kd_torch, linear_kd_torch

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "kd_loss", "KDLoss", "KDOutput", "KDParams"]
__all__ += ["fused_linear_kd_loss_topk", "FusedLinearKDTopkLoss"]

REDUCTIONS = ("mean", "sum")
VALIDATE = (True, False, "sync")


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


def _choose_backend(backend: str, x: torch.Tensor, float64: bool) -> str:
    """The resolved backend; float64 inputs run on the torch path in float64 (the kernels are fp32/bf16)."""
    name = _backend_name(backend, x.is_cuda)
    if float64 and name == "triton":
        if backend == "triton":
            raise ValueError(
                "backend='triton': expected float32/bfloat16/float16 inputs, got float64; "
                "use backend='torch' (computes in float64) or cast the inputs"
            )
        return "torch"
    return name


def _flatten_tokens(x, other, other_name, labels, domain_ids, shift_labels, ignore_index, name):
    """``[B, T, F]`` (or ``[N, F]``) -> ``[B*T, F]``; labels / domain ids shaped ``[B, T]`` (``[N]``) -> flat.

    ``shift_labels``: the label of position i becomes the label of i + 1 (the last position of each row gets
    ``ignore_index``), for model-aligned labels (``labels == input_ids``) as Hugging Face passes them."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a [B, T, H] or [N, H] tensor, got {shape}")
    lead = tuple(x.shape[:-1])
    if not isinstance(other, torch.Tensor) or (x.dim() == 3 and tuple(other.shape[:-1]) != lead):
        got = list(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
        raise ValueError(
            f"{other_name}: expected shape [{', '.join(map(str, lead))}, *] ({name}'s), got {got}"
        )
    for tname, t in (("labels", labels), ("domain_ids", domain_ids)):
        if isinstance(t, torch.Tensor) and x.dim() == 3 and tuple(t.shape) != lead:
            raise ValueError(
                f"{tname}: expected shape {list(lead)} (one per token of {name}), got {list(t.shape)}"
            )
    if shift_labels and labels is not None:
        pad = labels.new_full((*lead[:-1], 1), ignore_index)
        labels = torch.cat([labels[..., 1:], pad], -1)
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
        other = other.reshape(-1, other.shape[-1])
        labels = labels.reshape(-1) if labels is not None else None
        domain_ids = domain_ids.reshape(-1) if domain_ids is not None else None
    return x, other, labels, domain_ids


def _divisor(reduction, num_items_in_batch, device):
    """None (mean over counted tokens), or the 0-d tensor that replaces the count."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction == "sum":
            raise ValueError(
                "num_items_in_batch: expected None with reduction='sum' (it is the mean's divisor)"
            )
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch: expected a scalar, got shape {list(num_items_in_batch.shape)}"
                )
            # as Hugging Face's own losses: no host sync, a zero count is the caller's to avoid
            return num_items_in_batch.detach().reshape(()).to(device, torch.float32)
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise ValueError(
                f"num_items_in_batch: expected an int, a tensor or None, got {num_items_in_batch!r}"
            )
        if not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch: expected a number > 0, got {num_items_in_batch!r}")
        return torch.tensor(float(num_items_in_batch), device=device)
    return torch.ones((), device=device) if reduction == "sum" else None


def _validate(validate, labels, domain_ids, vocab, p: KDParams):
    if not (validate is True or validate is False or validate == "sync"):
        raise ValueError(f"validate: expected True, False or 'sync', got {validate!r}")
    if validate is False:
        return
    t = labels if labels is not None else domain_ids
    sync = validate == "sync" or (t is not None and t.device.type == "cpu")
    check_token_values(labels, domain_ids, vocab, p.num_domains, p.ignore_index, sync=sync)


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
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: bool = False,
    validate: bool | str = True,
    chunk_size: int | None = None,
) -> KDOutput:
    """Student and teacher ``lm_head`` + cross-entropy + distillation divergence, without [N, V] logits.

    Args:
        student_hidden: final hidden states of the student (after the final norm); fp32/bf16/fp16, or fp64
            (computed in fp64 on the torch path).
        student_weight: student ``lm_head`` weight; gets a gradient only if it requires grad.
        teacher_hidden, teacher_weight: the teacher's; ``V_t >= V_s``, rows ``>= V_s`` are padding and are
            never read. The teacher gets no gradient.
        labels: int64 next-token labels aligned with the hidden states, or None; ``ignore_index`` marks
            tokens counted in neither term. Without labels CE is 0 and every token counts for D.
        domain_ids: int64 in ``[0, num_domains)`` or None (then the domain sums are zeros).
        divergence: ``forward_kl`` KL(p||q) | ``reverse_kl`` KL(q||p) | ``jsd`` (beta: TRL convention,
            M = beta p + (1-beta) q, D = beta KL(p||M) + (1-beta) KL(q||M), beta 0 / 1 = forward / reverse KL)
            | ``skew_forward_kl`` KL(p || lam p + (1-lam) q) | ``skew_reverse_kl`` KL(q || lam q + (1-lam) p)
            | ``total_variation`` 1/2 sum |p - q|; p = softmax(t/T) teacher, q = softmax(s/T) student,
            lam = ``skew_lambda``.
        temperature: T > 0 for D only; CE uses the un-tempered student logits.
        student_logit_scale, student_softcap (and teacher_*): per-model logits
            ``softcap * tanh(scale * (h W^T + b) / softcap)`` (Gemma-2 soft-capping; softcap 0 = off; Cohere
            logit scale).
        student_bias, teacher_bias: optional ``lm_head`` biases; the student's gets a gradient if it
            requires one.
        reduction: ``mean`` (over counted tokens) or ``sum``.
        num_items_in_batch: the mean's divisor instead of this call's token count (int or 0-d tensor, as
            Hugging Face Trainer passes it under gradient accumulation: the loss is then a sum over this
            micro-batch divided by the count over all of them).
        shift_labels: True when ``labels`` are aligned with the inputs (``labels == input_ids``): position i
            is then scored against label i + 1, the last position of each row is ignored.
        validate: labels outside ``[0, V_s)`` other than ``ignore_index`` and domain ids outside
            ``[0, num_domains)`` are errors, checked by one fused reduction. True (default): on CPU a
            ValueError naming the tensor, the value and the bound; on CUDA a device-side assert (no host
            sync; it cannot name the value). ``'sync'``: the ValueError on CUDA too, at one host sync per
            call. False: no check (out-of-range labels are then clamped).
        backend: ``auto`` (triton on CUDA, torch on CPU) | ``triton`` | ``torch``; the env var
            ``DDK_FAST_LOSS_BACKEND`` overrides.
        chunk_size: rows per chunk of the torch path (default: ~32 MiB fp32 tiles, at least 256 rows).

    Shape:
        ``student_hidden [B, T, H_s]`` or ``[N, H_s]``, ``student_weight [V_s, H_s]``, ``teacher_hidden`` with
        the same leading dims and ``H_t``, ``teacher_weight [V_t, H_t]``, ``labels``/``domain_ids`` ``[B, T]``
        (``[N]``), biases ``[V_s]`` / ``[V_t]``.

    Returns:
        :class:`KDOutput`: ``loss = (ce_weight * sum CE + kd_weight * (T^2 if scale_by_t2 else 1) * sum D) /
        divisor`` (scalar fp32 whatever the autocast state; fp64 for fp64 inputs; 0 with zero gradients when
        every token is ignored under ``mean``), ``ce``/``kd`` the detached means over counted tokens (kd
        without T^2 and weight), and ``domain_ce_sum``, ``domain_kd_sum``, ``domain_tokens``
        (``[num_domains]`` sums over counted tokens). Gradients come back in the inputs' dtypes;
        ``create_graph=True`` raises.
    """
    p = make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains,
        skew_lambda, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    )  # fmt: skip
    check_chunk(chunk_size)
    student_hidden, teacher_hidden, labels, domain_ids = _flatten_tokens(
        student_hidden, teacher_hidden, "teacher_hidden", labels, domain_ids, shift_labels, ignore_index,
        "student_hidden",
    )  # fmt: skip
    student_weight, teacher_weight = _full(student_weight), _full(teacher_weight)
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_bias("student_bias", student_bias, student_weight)
    check_bias("teacher_bias", teacher_bias, teacher_weight)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    _validate(validate, labels, domain_ids, student_weight.shape[0], p)
    divisor = _divisor(reduction, num_items_in_batch, student_hidden.device)
    mats = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    if _choose_backend(backend, student_hidden, any(m.dtype == torch.float64 for m in mats)) == "triton":
        return fused_linear_kd_loss_triton(*mats, labels, domain_ids, p, student_bias, teacher_bias, divisor)
    return linear_kd_torch(
        *mats, labels, domain_ids, p, student_bias=student_bias, teacher_bias=teacher_bias, divisor=divisor,
        chunk=chunk_size or 0,
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
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: bool = False,
    validate: bool | str = True,
    chunk_size: int | None = None,
) -> KDOutput:
    """The same loss from logits the caller already has.

    Args:
        student_logits: gets a gradient in its own dtype. teacher_logits: columns ``>= V_s`` ignored, no
            gradient. Every other argument as :func:`fused_linear_kd_loss`.

    Shape:
        ``student_logits [B, T, V_s]`` or ``[N, V_s]``, ``teacher_logits`` the same leading dims and
        ``V_t >= V_s``; ``labels`` / ``domain_ids`` ``[B, T]`` (``[N]``).

    Returns:
        :class:`KDOutput` as :func:`fused_linear_kd_loss`. The triton path is a chunked-vocabulary kernel
        (online softmax over vocabulary tiles, fp32 math whatever the logits' dtype).
    """
    p = make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains,
        skew_lambda, student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap,
    )  # fmt: skip
    check_chunk(chunk_size)
    student_logits, teacher_logits, labels, domain_ids = _flatten_tokens(
        student_logits, teacher_logits, "teacher_logits", labels, domain_ids, shift_labels, ignore_index,
        "student_logits",
    )  # fmt: skip
    check_logits(student_logits, teacher_logits)
    check_tokens(student_logits.shape[0], labels, domain_ids, p.num_domains, student_logits.device)
    _validate(validate, labels, domain_ids, student_logits.shape[1], p)
    divisor = _divisor(reduction, num_items_in_batch, student_logits.device)
    f64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    if _choose_backend(backend, student_logits, f64) == "triton":
        return kd_loss_triton(student_logits, teacher_logits, labels, domain_ids, p, divisor)
    chunk = chunk_size or 0
    return kd_torch(student_logits, teacher_logits, labels, domain_ids, p, divisor=divisor, chunk=chunk)


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
        call_only = ("chunk_size", "reduction", "shift_labels", "validate")
        make_params(
            divergence,
            beta,
            temperature,
            kd_weight,
            ce_weight,
            scale_by_t2,
            ignore_index,
            num_domains,
            **{k: v for k, v in extras.items() if k not in call_only},
        )  # fmt: skip  (fail at construction, not at the first step)
        if extras.get("reduction", "mean") not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {extras['reduction']!r}")
        self.kwargs = dict(
            divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
            ce_weight=ce_weight, scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            num_domains=num_domains, backend=backend, **extras,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearKDLoss(_KDLossBase):
    """Module form of :func:`fused_linear_kd_loss` (stores the hyper-parameters, nothing else).

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    domain_ids=None, *, student_bias=None, teacher_bias=None, num_items_in_batch=None) -> KDOutput``;
    shapes as the function."""

    def forward(
        self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, domain_ids=None,
        *, student_bias=None, teacher_bias=None, num_items_in_batch=None,
    ):  # fmt: skip
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, domain_ids,
            student_bias=student_bias, teacher_bias=teacher_bias, num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )  # fmt: skip


class KDLoss(_KDLossBase):
    """Module form of :func:`kd_loss`: ``forward(student_logits, teacher_logits, labels=None,
    domain_ids=None, *, num_items_in_batch=None) -> KDOutput``; shapes as the function."""

    def forward(
        self, student_logits, teacher_logits, labels=None, domain_ids=None, *, num_items_in_batch=None
    ):
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            domain_ids,
            num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )


# ----------------------------------------------------------------------------------------------------------
# sparse teacher: the teacher's cached top-k distribution instead of its hidden states (offline teacher)
# ----------------------------------------------------------------------------------------------------------


def fused_linear_kd_loss_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
) -> KDOutput:
    """Student ``lm_head`` + CE + divergence against a *sparse* teacher: its top-k distribution plus one tail
    bucket (what ``python -m ddk_fast.teacher_cache`` stores), without [N, V] logits.

    Args:
        student_hidden: ``[N, H]``; student_weight: ``[V, H]`` (gets a gradient if it requires grad).
        topk_ids: ``[N, k]`` int32/int64 teacher token ids in ``[0, V)``, distinct per row (not checked).
        topk_logprobs: ``[N, k]`` the teacher's log-probabilities of those ids at T = 1 (any float dtype).
        tail_logmass: ``[N]`` log of the teacher's probability of every other token (``-inf`` when k = V).
        divergence: ``forward_kl`` | ``total_variation`` on the teacher's support plus one tail bucket (the
            student's mass outside the support); others raise ValueError. Equal to
            :func:`fused_linear_kd_loss` when k = V; for k < V a lower bound of it (coarsened distributions).
        temperature: T > 0. The support is tempered and re-normalised at T; the tail keeps its T = 1 mass
            (exact for k = V; for k < V an approximation, see ``ddk_fast/ops/topk_reference.py``).
        Other arguments as :func:`fused_linear_kd_loss`.

    Returns:
        :class:`KDOutput`, the same fields as :func:`fused_linear_kd_loss`.
    """
    from .ops.topk import fused_linear_kd_loss_topk_triton  # no triton import here
    from .ops.topk_reference import check_topk_inputs, fused_linear_kd_loss_topk_reference, make_topk_params

    p = make_topk_params(
        divergence, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
        scale_by_t2=scale_by_t2, ignore_index=ignore_index, num_domains=num_domains,
    )  # fmt: skip
    check_chunk(chunk_size)
    student_weight = _full(student_weight)
    check_topk_inputs(student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    args = (student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass, labels, domain_ids)
    if _backend_name(backend, student_hidden.is_cuda) == "triton":
        return fused_linear_kd_loss_topk_triton(*args, p)
    return fused_linear_kd_loss_topk_reference(*args, chunk_size=chunk_size, params=p)


class FusedLinearKDTopkLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss_topk` (stores the hyper-parameters, nothing else).

    ``forward(student_hidden [N, H], student_weight [V, H], topk_ids [N, k], topk_logprobs [N, k],
    tail_logmass [N], labels=None, domain_ids=None) -> KDOutput``."""

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0, kd_weight: float = 1.0,
                 ce_weight: float = 1.0, scale_by_t2: bool = True, ignore_index: int = -100,
                 num_domains: int = 0, backend: str = "auto", chunk_size: int | None = None):  # fmt: skip
        super().__init__()
        from .ops.topk_reference import make_topk_params

        make_topk_params(
            divergence,
            temperature=temperature,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            scale_by_t2=scale_by_t2,
            ignore_index=ignore_index,
            num_domains=num_domains,
        )  # fmt: skip  (fail at construction, not at the first step)
        self.kwargs = dict(
            divergence=divergence, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
            scale_by_t2=scale_by_t2, ignore_index=ignore_index, num_domains=num_domains, backend=backend,
            chunk_size=chunk_size,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

    def forward(self, student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass, labels=None,
                domain_ids=None):  # fmt: skip
        return fused_linear_kd_loss_topk(
            student_hidden,
            student_weight,
            topk_ids,
            topk_logprobs,
            tail_logmass,
            labels,
            domain_ids,
            **self.kwargs,
        )
