"""The Triton op of the sparse-teacher (top-k) KD loss: an ``autograd.Function`` around the launchers of
``ddk_fast/kernels/kd_topk.py`` (imported lazily: importing this module does not import triton).

The function returns per-row CE and D (0 on ignored rows); the scalar loss is assembled from them with
ordinary torch ops, so ``grad_output`` and the 1/n mean reach the backward kernels as per-row weights
dL/dCE_i, dL/dD_i (no host synchronisation), as in ``ops/fused_linear_kd.py``.
"""

from __future__ import annotations

import torch

from .params import KDOutput, KDParams
from .topk_reference import TAIL_FLOOR, TOPK_DIVERGENCES

# the kernel's ``DIV`` constexpr
TOPK_DIV_CODES = {name: code for code, name in enumerate(TOPK_DIVERGENCES)}


class FusedLinearKDTopkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, ids, a, c, labels, domain_ids, p: KDParams):
        from ..kernels.kd_topk import kd_topk_fwd  # lazy: triton is imported on first use only

        stats, _sup, corr, ce, d, dce, dkd, dtok = kd_topk_fwd(
            h_s, w_s, ids, a, c, labels, domain_ids, TOPK_DIV_CODES[p.divergence], p.temperature,
            TAIL_FLOOR, p.ignore_index, p.num_domains,
        )  # fmt: skip
        ctx.save_for_backward(h_s, w_s, ids, labels, stats, corr)
        ctx.p = p
        ctx.mark_non_differentiable(dce, dkd, dtok)
        return ce, d, dce, dkd, dtok

    @staticmethod
    def backward(ctx, g_ce, g_d, *unused):
        from ..kernels.kd_topk import kd_topk_bwd

        h_s, w_s, ids, labels, stats, corr = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 8
        n = h_s.shape[0]
        g_ce = g_ce.float().contiguous() if g_ce is not None else stats.new_zeros(n)
        g_d = g_d.float().contiguous() if g_d is not None else stats.new_zeros(n)
        gh, gw = kd_topk_bwd(
            h_s,
            w_s,
            ids,
            labels,
            stats,
            corr,
            g_ce,
            g_d,
            ctx.p.temperature,
            ctx.p.ignore_index,
            need_h,
            need_w,
        )
        gh = gh.to(h_s.dtype) if need_h else None
        gw = gw.to(w_s.dtype) if need_w else None
        return gh, gw, None, None, None, None, None, None


def fused_linear_kd_loss_topk_triton(student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass,
                                     labels, domain_ids, p: KDParams) -> KDOutput:  # fmt: skip
    """Triton path of :func:`ddk_fast.losses.fused_linear_kd_loss_topk` (inputs already validated)."""
    w_s = (
        student_weight
        if student_weight.dtype == student_hidden.dtype
        else student_weight.to(student_hidden.dtype)
    )
    if labels is not None:
        labels = labels.long().contiguous()
    if domain_ids is not None:
        domain_ids = domain_ids.long().contiguous()
    ids = topk_ids.detach().contiguous()
    a = topk_logprobs.detach().contiguous()
    c = tail_logmass.detach().float().contiguous()
    ce, d, dce, dkd, dtok = FusedLinearKDTopkFunction.apply(
        student_hidden, w_s, ids, a, c, labels, domain_ids, p
    )
    n = student_hidden.shape[0]
    if labels is None:
        count = torch.full((), float(max(n, 1)), device=ce.device)
    else:
        count = (labels != p.ignore_index).sum().float().clamp(min=1.0)
    ce_m = ce.sum() / count
    kd_m = d.sum() / count
    loss = p.ce_weight * ce_m + p.kd_scale * kd_m
    return KDOutput(loss, ce_m.detach(), kd_m.detach(), dce, dkd, dtok)
