"""The Triton op of the KD loss: ``torch.library.custom_op``s around the launchers of
``ddk_fast/kernels/kd_forward.py`` / ``kd_backward.py`` (imported lazily: importing this module does not
import triton).

Two custom ops, so ``torch.compile`` sees opaque nodes with fake (meta) implementations, no graph break:
- ``ddk_fast::kd_fwd``  -> (stats [4, N], ce [N], d [N], domain_ce_sum, domain_kd_sum, domain_tokens)
- ``ddk_fast::kd_bwd``  -> (grad_h, grad_w) (empty [0] tensors stand for "not needed")
Their schema is the tensors plus the hyper-parameters as two flat lists (:meth:`KDParams.op_ints`,
:meth:`KDParams.op_floats`) and the problem's own vocabulary and from-logits flag, not a dozen scalars.
``kd_fwd`` is differentiable through ``ce`` and ``d`` (per-row CE and divergence, 0 on ignored rows); the
scalar loss is assembled from them here with ordinary torch ops, so ``grad_output`` and the 1/divisor reach
the backward kernel as per-row weights dL/dCE_i, dL/dD_i (no host synchronisation anywhere).

A head bias is folded into the matmul: ``h W^T + b = [h, 1] [W, b]^T`` (one extra column; costs a copy of
the hidden states and the weight per call, so heads without a bias pay nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .params import DIVERGENCES, KDOutput, KDParams
from .reference import NO_HIGHER_ORDER

# the kernels' ``DIV`` constexpr: the position in DIVERGENCES (0 forward KL ... 5 total variation)
DIV_CODES = {name: code for code, name in enumerate(DIVERGENCES)}


def _launch_args(p: KDParams):
    """The launchers' positional scalars after ``vocab``: (div, beta, lam, temperature, s_scale, s_cap,
    t_scale, t_cap) and ignore_index."""
    return (DIV_CODES[p.divergence], p.beta, p.skew_lambda, p.temperature, p.student_logit_scale,
            p.student_softcap, p.teacher_logit_scale, p.teacher_softcap), p.ignore_index  # fmt: skip


@torch.library.custom_op("ddk_fast::kd_fwd", mutates_args=())
def kd_fwd_op(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, domain_ids: Tensor | None,
    ints: list[int], floats: list[float], vocab: int, from_logits: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    from ..kernels.variant import kd_fwd  # lazy: triton is imported on first use only

    p = KDParams.from_op(ints, floats)
    scalars, ignore_index = _launch_args(p)
    stats, ce, d, dce, dkd, dtok = kd_fwd(
        h_s, w_s, h_t, w_t, labels, domain_ids, vocab, *scalars, ignore_index, p.num_domains, from_logits
    )
    return stats, ce, d, dce, dkd, dtok


@kd_fwd_op.register_fake
def _(h_s, w_s, h_t, w_t, labels, domain_ids, ints, floats, vocab, from_logits):
    n = h_s.shape[0]
    f = dict(dtype=torch.float32, device=h_s.device)
    nd = ints[2]
    return (h_s.new_empty((4, n), **f), h_s.new_empty((n,), **f), h_s.new_empty((n,), **f),
            h_s.new_empty((nd,), **f), h_s.new_empty((nd,), **f), h_s.new_empty((nd,), **f))  # fmt: skip


@torch.library.custom_op("ddk_fast::kd_bwd", mutates_args=())
def kd_bwd_op(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, labels: Tensor | None, stats: Tensor, g_ce: Tensor,
    g_d: Tensor, ints: list[int], floats: list[float], vocab: int, need_h: bool, need_w: bool,
    from_logits: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from ..kernels.variant import kd_bwd  # lazy: triton is imported on first use only

    scalars, ignore_index = _launch_args(KDParams.from_op(ints, floats))
    gh, gw = kd_bwd(
        h_s,
        w_s,
        h_t,
        w_t,
        labels,
        stats,
        g_ce,
        g_d,
        vocab,
        *scalars,
        ignore_index,
        need_h,
        need_w,
        from_logits,
    )
    empty = h_s.new_empty((0,), dtype=torch.float32)
    return (gh if gh is not None else empty), (gw if gw is not None else empty.clone())


@kd_bwd_op.register_fake
def _(h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, ints, floats, vocab, need_h, need_w, from_logits):
    if from_logits:
        return h_s.new_empty(h_s.shape), h_s.new_empty((0,), dtype=torch.float32)
    gh = h_s.new_empty(h_s.shape, dtype=torch.float32) if need_h else h_s.new_empty((0,), dtype=torch.float32)
    gw = w_s.new_empty(w_s.shape, dtype=torch.float32) if need_w else h_s.new_empty((0,), dtype=torch.float32)
    return gh, gw


def _setup_context(ctx, inputs, output):
    h_s, w_s, h_t, w_t, labels, _dom, ints, floats, vocab, from_logits = inputs
    ctx.save_for_backward(h_s, w_s, h_t, w_t, labels, output[0])
    ctx.args = (ints, floats, vocab)
    ctx.from_logits = from_logits


def _backward(ctx, _g_stats, g_ce, g_d, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(NO_HIGHER_ORDER)
    h_s, w_s, h_t, w_t, labels, stats = ctx.saved_tensors
    need_h = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] and not ctx.from_logits
    if not (need_h or need_w):
        return (None,) * 10
    n = h_s.shape[0]
    g_ce = g_ce if g_ce is not None else stats.new_zeros(n)
    g_d = g_d if g_d is not None else stats.new_zeros(n)
    gh, gw = kd_bwd_op(
        h_s, w_s, h_t, w_t, labels, stats, g_ce.float().contiguous(), g_d.float().contiguous(),
        *ctx.args, need_h, need_w, ctx.from_logits,
    )  # fmt: skip
    gh = gh.to(h_s.dtype) if need_h else None
    gw = gw.to(w_s.dtype) if need_w else None
    return (gh, gw) + (None,) * 8


kd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _assemble(ce, d, dce, dkd, dtok, labels, divisor, p: KDParams, n: int) -> KDOutput:
    if labels is None:
        count = torch.full((), float(max(n, 1)), device=ce.device)
    else:
        count = (labels != p.ignore_index).sum().float().clamp(min=1.0)
    ce_sum, d_sum = ce.sum(), d.sum()
    div = count if divisor is None else divisor.float()
    loss = (p.ce_weight * ce_sum + p.kd_scale * d_sum) / div
    return KDOutput(loss, (ce_sum / count).detach(), (d_sum / count).detach(), dce, dkd, dtok)


def _run(h_s, w_s, h_t, w_t, labels, domain_ids, divisor, vocab: int, p: KDParams, from_logits: bool):
    if labels is not None:
        labels = labels.long().contiguous()
    if domain_ids is not None:
        domain_ids = domain_ids.long().contiguous()
    with torch.autocast(h_s.device.type, enabled=False):
        stats, ce, d, dce, dkd, dtok = kd_fwd_op(
            h_s, w_s, h_t, w_t, labels, domain_ids, p.op_ints(), p.op_floats(), vocab, from_logits
        )
        return _assemble(ce, d, dce, dkd, dtok, labels, divisor, p, h_s.shape[0])


def _with_bias(h, w, b):
    """``[h, 1]`` and ``[w, b]``: the bias as one more input column (gradients flow through ``cat``)."""
    if b is None:
        return h, w
    return torch.cat([h, h.new_ones(h.shape[0], 1)], 1), torch.cat([w, b.to(w.dtype)[:, None]], 1)


def fused_linear_kd_loss_triton(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                domain_ids, p: KDParams, student_bias=None, teacher_bias=None,
                                divisor=None) -> KDOutput:  # fmt: skip
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
    h_s, w_s = _with_bias(student_hidden, w_s, student_bias)
    h_t, w_t = _with_bias(h_t, w_t, None if teacher_bias is None else teacher_bias.detach())
    return _run(h_s, w_s, h_t, w_t, labels, domain_ids, divisor, student_weight.shape[0], p, False)


def kd_loss_triton(student_logits, teacher_logits, labels, domain_ids, p: KDParams, divisor=None) -> KDOutput:
    """Triton path of :func:`ddk_fast.losses.kd_loss` (chunked-vocabulary kernel over given logits)."""
    dummy = student_logits.new_empty((0,)).detach()
    t = teacher_logits.detach()
    return _run(
        student_logits, dummy, t, dummy, labels, domain_ids, divisor, student_logits.shape[1], p, True
    )
