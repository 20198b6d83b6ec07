"""The Triton op of the KD loss: ``torch.library.custom_op``s around the launchers of
``ddk_fast/kernels/kd_forward.py`` / ``kd_backward.py`` (imported lazily: importing this module does not
import triton).

Two custom ops, so ``torch.compile`` sees opaque nodes with fake (meta) implementations, no graph break:
- ``ddk_fast::kd_fwd``  -> (stats [4, N], ce [N], d [N], domain_ce_sum, domain_kd_sum, domain_tokens)
- ``ddk_fast::kd_bwd``  -> (grad_h, grad_w) (empty [0] tensors stand for "not needed")
``kd_fwd`` is differentiable through ``ce`` and ``d`` (per-row CE and divergence, 0 on ignored rows); the
scalar loss is assembled from them here with ordinary torch ops, so ``grad_output`` and the 1/n mean reach the
backward kernel as per-row weights dL/dCE_i, dL/dD_i (no host synchronisation anywhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import DIVERGENCES, KDOutput, KDParams

# the kernels' ``DIV`` constexpr: the position in DIVERGENCES (0 forward KL ... 5 total variation)
DIV_CODES = {name: code for code, name in enumerate(DIVERGENCES)}


@torch.library.custom_op("ddk_fast::kd_fwd", mutates_args=())
def kd_fwd_op(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor,
    w_t: Tensor,
    labels: Tensor | None,
    domain_ids: Tensor | None,
    vocab: int,
    div: int,
    beta: float,
    lam: float,
    temperature: float,
    s_scale: float,
    s_cap: float,
    t_scale: float,
    t_cap: float,
    ignore_index: int,
    num_domains: int,
    from_logits: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.kd_forward import kd_fwd  # lazy: triton is imported on first use only

    stats, ce, d, dce, dkd, dtok = kd_fwd(
        h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature,
        s_scale, s_cap, t_scale, t_cap, ignore_index, num_domains, from_logits,
    )  # fmt: skip
    return stats, ce, d, dce, dkd, dtok


@kd_fwd_op.register_fake
def _(h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature, s_scale, s_cap,
      t_scale, t_cap, ignore_index, num_domains, from_logits):  # fmt: skip
    n = h_s.shape[0]
    f = dict(dtype=torch.float32, device=h_s.device)
    return (
        h_s.new_empty((4, n), **f),
        h_s.new_empty((n,), **f),
        h_s.new_empty((n,), **f),
        h_s.new_empty((num_domains,), **f),
        h_s.new_empty((num_domains,), **f),
        h_s.new_empty((num_domains,), **f),
    )


@torch.library.custom_op("ddk_fast::kd_bwd", mutates_args=())
def kd_bwd_op(
    h_s: Tensor,
    w_s: Tensor,
    h_t: Tensor,
    w_t: Tensor,
    labels: Tensor | None,
    stats: Tensor,
    g_ce: Tensor,
    g_d: Tensor,
    vocab: int,
    div: int,
    beta: float,
    lam: float,
    temperature: float,
    s_scale: float,
    s_cap: float,
    t_scale: float,
    t_cap: float,
    ignore_index: int,
    need_h: bool,
    need_w: bool,
    from_logits: bool,
) -> tuple[Tensor, Tensor]:
    from ..kernels.kd_backward import kd_bwd  # lazy: triton is imported on first use only

    gh, gw = kd_bwd(
        h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature,
        s_scale, s_cap, t_scale, t_cap, ignore_index, need_h, need_w, from_logits,
    )  # fmt: skip
    empty = h_s.new_empty((0,), dtype=torch.float32)
    return (gh if gh is not None else empty), (gw if gw is not None else empty.clone())


@kd_bwd_op.register_fake
def _(h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale,
      s_cap, t_scale, t_cap, ignore_index, need_h, need_w, from_logits):  # fmt: skip
    if from_logits:
        return h_s.new_empty(h_s.shape), h_s.new_empty((0,), dtype=torch.float32)
    gh = h_s.new_empty(h_s.shape, dtype=torch.float32) if need_h else h_s.new_empty((0,), dtype=torch.float32)
    gw = w_s.new_empty(w_s.shape, dtype=torch.float32) if need_w else h_s.new_empty((0,), dtype=torch.float32)
    return gh, gw


_SCALARS = (
    "vocab",
    "div",
    "beta",
    "lam",
    "temperature",
    "s_scale",
    "s_cap",
    "t_scale",
    "t_cap",
    "ignore_index",
)


def _setup_context(ctx, inputs, output):
    h_s, w_s, h_t, w_t, labels, _dom, *scalars, _num_domains, from_logits = inputs
    ctx.save_for_backward(h_s, w_s, h_t, w_t, labels, output[0])
    ctx.scalars = tuple(scalars)
    ctx.from_logits = from_logits


def _backward(ctx, _g_stats, g_ce, g_d, *_unused):
    h_s, w_s, h_t, w_t, labels, stats = ctx.saved_tensors
    need_h = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] and not ctx.from_logits
    if not (need_h or need_w):
        return (None,) * 18
    n = h_s.shape[0]
    g_ce = g_ce if g_ce is not None else stats.new_zeros(n)
    g_d = g_d if g_d is not None else stats.new_zeros(n)
    gh, gw = kd_bwd_op(
        h_s, w_s, h_t, w_t, labels, stats, g_ce.float().contiguous(), g_d.float().contiguous(),
        *ctx.scalars, need_h, need_w, ctx.from_logits,
    )  # fmt: skip
    gh = gh.to(h_s.dtype) if need_h else None
    gw = gw.to(w_s.dtype) if need_w else None
    return (gh, gw) + (None,) * 16


kd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _assemble(ce, d, dce, dkd, dtok, labels, p: KDParams, n: int) -> KDOutput:
    if labels is None:
        count = torch.full((), float(max(n, 1)), device=ce.device)
    else:
        count = (labels != p.ignore_index).sum().float().clamp(min=1.0)
    ce_m = ce.sum() / count
    kd_m = d.sum() / count
    loss = p.ce_weight * ce_m + p.kd_scale * kd_m
    return KDOutput(loss, ce_m.detach(), kd_m.detach(), dce, dkd, dtok)


def _run(h_s, w_s, h_t, w_t, labels, domain_ids, vocab: int, p: KDParams, from_logits: bool) -> KDOutput:
    if labels is not None:
        labels = labels.long().contiguous()
    if domain_ids is not None:
        domain_ids = domain_ids.long().contiguous()
    stats, ce, d, dce, dkd, dtok = kd_fwd_op(
        h_s, w_s, h_t, w_t, labels, domain_ids, vocab, DIV_CODES[p.divergence], p.beta, p.skew_lambda,
        p.temperature, p.student_logit_scale, p.student_softcap, p.teacher_logit_scale, p.teacher_softcap,
        p.ignore_index, p.num_domains, from_logits,
    )  # fmt: skip
    return _assemble(ce, d, dce, dkd, dtok, labels, p, h_s.shape[0])


def fused_linear_kd_loss_triton(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                domain_ids, p: KDParams) -> KDOutput:  # fmt: skip
    """Triton path of :func:`ddk_fast.losses.fused_linear_kd_loss` (inputs already validated)."""
    w_s = (
        student_weight
        if student_weight.dtype == student_hidden.dtype
        else student_weight.to(student_hidden.dtype)
    )
    w_t = teacher_weight.detach()
    h_t = teacher_hidden.detach()
    if w_t.dtype != h_t.dtype:
        w_t = w_t.to(h_t.dtype)
    return _run(student_hidden, w_s, h_t, w_t, labels, domain_ids, student_weight.shape[0], p, False)


def kd_loss_triton(student_logits, teacher_logits, labels, domain_ids, p: KDParams) -> KDOutput:
    """Triton path of :func:`ddk_fast.losses.kd_loss` (chunked-vocabulary kernel over given logits)."""
    dummy = student_logits.new_empty((0,)).detach()
    t = teacher_logits.detach()
    return _run(student_logits, dummy, t, dummy, labels, domain_ids, student_logits.shape[1], p, True)
