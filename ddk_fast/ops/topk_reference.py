"""The one plain-torch reference of the sparse-teacher (top-k) KD loss, and the teacher's top-k extraction.

An offline teacher is cached as, per token, its top-k token ids ``I`` (``[k]`` int), their log-probabilities
``a`` at T = 1 and the log of the remaining mass ``c = log(1 - sum exp(a))`` (the *tail*, ``-inf`` when
k = V). The loss treats both models as distributions over k + 1 categories: the teacher's support plus one
tail bucket holding every other token.

Teacher (per token; the cached values are first normalised to sum 1, which absorbs bf16/fp16 rounding):

    Z = logaddexp(lse(a), c)          log P = c - Z          log (1 - P) = lse(a) - Z
    log p_j = log (1 - P) + a_j / T - lse(a / T)             (j in I)

At T = 1 this is ``a_j - Z``. At T != 1 the support is tempered and re-normalised *within the support*, and
the tail bucket keeps its T = 1 mass P. That is exact when k = V (no tail: the full tempered teacher); for
k < V it approximates softmax(t / T) by assuming the tail's share does not change with T (for T > 1 the true
tail share grows, so the tail is under-weighted; for T < 1 over-weighted).

Student (``s`` = student logits over the full vocabulary, x = s / T, q = softmax(x)): the support
probabilities ``q_j = exp(x[I_j] - lse(x))`` and the tail bucket ``Q = 1 - sum_j q_j``, floored at
``TAIL_FLOOR`` where a log or a division needs it (fp32 cancellation leaves ~1e-7 of noise in Q, so a
smaller student tail is not resolved).

Divergences on the k + 1 categories (``p~ = (p_I, P)``, ``q~ = (q_I, Q)``):

    forward_kl       D = sum_j p_j log(p_j / q_j) + P log(P / Q)        (0 log 0 = 0)
    total_variation  D = 1/2 (sum_j |p_j - q_j| + |P - Q|)

Both equal the dense loss when k = V. For k < V they are the divergences of the two distributions coarsened
to support + bucket (by the data-processing inequality they bound the full ones from below). Reverse-mode
divergences (reverse KL, JSD, the skew KLs) need the teacher's probability of every token the student puts
mass on, which the bucket does not keep: they are rejected with a ValueError.

Gradient w.r.t. x, with g_j = dD/dq_j, g_t = dD/dQ and S = sum_j q_j g_j + Q g_t:
    dD/dx_v = q_v (g_t - S)  +  [v = I_j] q_j (g_j - g_t)
(a dense term, one coefficient per row times q, plus a k-sparse correction on the support);
forward KL: q_j g_j = -p_j, g_t = -P / Q;  total variation: g_j = sign(q_j - p_j) / 2, g_t = sign(Q - P) / 2.
CE (un-tempered, T = 1) and the loss assembly are those of ``reference.py``:
    loss = ce_weight * mean CE + kd_weight * (T^2 if scale_by_t2) * mean D    over non-ignored tokens.
"""

from __future__ import annotations

import math

import torch

from .chunk_math import _finish, _out_from, _valid_mask, auto_chunk_size
from .params import KDOutput, KDParams, check_tokens, make_params

TOPK_DIVERGENCES = ("forward_kl", "total_variation")
TAIL_FLOOR = 1e-6


def make_topk_params(divergence: str = "forward_kl", **kwargs) -> KDParams:
    """``make_params`` restricted to the divergences the sparse teacher defines (ValueError otherwise)."""
    p = make_params(divergence, **kwargs)
    if p.divergence not in TOPK_DIVERGENCES:
        raise ValueError(
            f"divergence: the sparse-teacher (top-k) loss supports {TOPK_DIVERGENCES}, got {divergence!r}: "
            "reverse-mode divergences need the teacher's probability of every token the student puts mass "
            "on, and the cache keeps only the top-k plus one tail bucket"
        )
    return p


def check_topk_inputs(student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass) -> None:
    """Shapes, dtypes and devices of the sparse-teacher loss inputs (ValueError naming the argument)."""
    for name, t in (
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("topk_ids", topk_ids),
        ("topk_logprobs", topk_logprobs),
        ("tail_logmass", tail_logmass),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != student_hidden.device:
            raise ValueError(f"{name}: expected a tensor on {student_hidden.device}, got one on {t.device}")
    if student_hidden.dim() != 2 or not student_hidden.is_floating_point():
        raise ValueError(f"student_hidden: expected a float [N, H] tensor, got {student_hidden.dtype} "
                         f"{list(student_hidden.shape)}")  # fmt: skip
    n, h = student_hidden.shape
    if student_weight.dim() != 2 or student_weight.shape[1] != h:
        raise ValueError(f"student_weight: expected shape [V, {h}], got {list(student_weight.shape)}")
    v = student_weight.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or not 1 <= topk_ids.shape[1] <= v:
        raise ValueError(
            f"topk_ids: expected shape [{n}, k] with 1 <= k <= V = {v}, got {list(topk_ids.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids: expected an int32 or int64 tensor, got {topk_ids.dtype}")
    if topk_logprobs.shape != topk_ids.shape or not topk_logprobs.is_floating_point():
        raise ValueError(
            f"topk_logprobs: expected a float tensor of shape {list(topk_ids.shape)} (as topk_ids), "
            f"got {topk_logprobs.dtype} {list(topk_logprobs.shape)}"
        )
    if tail_logmass.shape != (n,) or not tail_logmass.is_floating_point():
        raise ValueError(
            f"tail_logmass: expected a float tensor of shape [{n}], got {tail_logmass.dtype} "
            f"{list(tail_logmass.shape)}"
        )


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache stores for teacher logits ``[N, V]`` (cut to the student vocabulary by the caller):
    top-k ids (int32 ``[N, k]``, by decreasing probability), their log-probabilities at T = 1 (fp32) and the
    tail log-mass (fp32 ``[N]``, computed from the logits outside the support, ``-inf`` when k = V)."""
    if not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k: expected an int in [1, {logits.shape[-1]}] (the vocabulary), got {k!r}")
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    vals, ids = torch.topk(lf, k, dim=-1)
    rest = lf.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - lse
    return ids.to(torch.int32), vals - lse[:, None], tail


def teacher_support(a: torch.Tensor, c: torch.Tensor, temperature: float):
    """Teacher log-probabilities on the support at T (``[N, k]`` fp32) and the tail's ``log P`` (``[N]``)."""
    a = a.float()
    c = c.float()
    lse1 = torch.logsumexp(a, dim=-1)
    z = torch.logaddexp(lse1, c)
    if temperature == 1.0:
        lp = a - z[:, None]
    else:
        at = a / temperature
        lp = (lse1 - z)[:, None] + at - torch.logsumexp(at, dim=-1, keepdim=True)
    return lp, c - z


def _topk_terms(s, ids, lp, lpt, labels, p: KDParams, need_grad: bool):
    """Per-row CE and D of a chunk and the gradient of ``ce_weight*CE + kd_scale*D`` w.r.t. ``s`` ([C, V]
    fp32 student logits; ``ids`` [C, k] int64; ``lp`` [C, k] / ``lpt`` [C] teacher log-probs at T)."""
    inv_t = 1.0 / p.temperature
    x = s * inv_t if p.temperature != 1.0 else s
    lq_all = torch.log_softmax(x, dim=-1)
    lq = lq_all.gather(1, ids)
    q = lq.exp()
    pt = lp.exp()
    big_p = lpt.exp()
    q_raw = 1.0 - q.sum(-1)  # the student's tail bucket Q
    q_tail = q_raw.clamp(min=TAIL_FLOOR)
    if p.divergence == "forward_kl":
        d = torch.where(pt > 0, pt * (lp - lq), 0.0).sum(-1)
        d = d + torch.where(big_p > 0, big_p * (lpt - q_tail.log()), 0.0)
        qg = -pt  # q_j g_j
        g_t = -big_p / q_tail
    else:  # total_variation
        d = 0.5 * ((q - pt).abs().sum(-1) + (q_raw.clamp(min=0.0) - big_p).abs())
        qg = q * 0.5 * torch.sign(q - pt)
        g_t = 0.5 * torch.sign(q_raw.clamp(min=0.0) - big_p)
    if labels is not None:
        safe = labels.clamp(0, s.shape[1] - 1).long()[:, None]
        lse1 = torch.logsumexp(s, dim=-1) if p.temperature != 1.0 else (s[:, :1] - lq_all[:, :1]).squeeze(1)
        ce = lse1 - s.gather(1, safe).squeeze(1)
    else:
        ce = torch.zeros_like(d)
    grad = None
    if need_grad:
        big_s = qg.sum(-1) + q_raw * g_t
        qall = lq_all.exp()
        grad = qall * (g_t - big_s)[:, None]
        grad.scatter_add_(1, ids, qg - q * g_t[:, None])
        grad.mul_(p.kd_scale * inv_t)
        if labels is not None and p.ce_weight != 0.0:
            sm = qall if p.temperature == 1.0 else torch.softmax(s, dim=-1)
            grad.add_(sm, alpha=p.ce_weight)
            grad.scatter_add_(1, safe, torch.full_like(safe, -p.ce_weight, dtype=grad.dtype))
    return ce, d, grad


class FusedLinearKDTopkReferenceFunction(torch.autograd.Function):
    """Chunked gradient-in-forward (as ``FusedLinearKDReferenceFunction``); saves grad_h and grad_w only."""

    @staticmethod
    def forward(ctx, h_s, w_s, ids, a, c, labels, domain_ids, p: KDParams, chunk_size, need_h, need_w):
        n = h_s.shape[0]
        v = w_s.shape[0]
        dev = h_s.device
        w32 = w_s.float()
        chunk = chunk_size or auto_chunk_size(n, v)
        valid = _valid_mask(labels, n, p.ignore_index, dev)
        ce_rows = torch.empty(n, dtype=torch.float32, device=dev)
        d_rows = torch.empty(n, dtype=torch.float32, device=dev)
        grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
        inv_n = 1.0 / valid.float().sum().clamp(min=1.0)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            hs = h_s[i:j].float()
            s = hs @ w32.T
            lp, lpt = teacher_support(a[i:j], c[i:j], p.temperature)
            lab = labels[i:j] if labels is not None else None
            ce, d, g = _topk_terms(s, ids[i:j].long(), lp, lpt, lab, p, need_h or need_w)
            vm = valid[i:j]
            ce_rows[i:j] = torch.where(vm, ce, 0.0)
            d_rows[i:j] = torch.where(vm, d, 0.0)
            if g is not None:
                g.mul_((vm.float() * inv_n)[:, None])
                if need_h:
                    grad_h[i:j] = g @ w32
                if need_w:
                    grad_w.addmm_(g.T, hs)
        loss, ce, kd, dce, dkd, dtok = _finish(ce_rows, d_rows, valid, domain_ids, p, inv_n)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        ctx.mark_non_differentiable(ce, kd, dce, dkd, dtok)
        return loss, ce, kd, dce, dkd, dtok

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_h, grad_w = ctx.saved_tensors
        gh = gw = None
        if grad_h is not None and ctx.needs_input_grad[0]:
            gh = (grad_h * grad_loss).to(ctx.dtypes[0])
        if grad_w is not None and ctx.needs_input_grad[1]:
            gw = (grad_w * grad_loss).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None, None, None, None, None


def fused_linear_kd_loss_topk_reference(
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
    chunk_size: int | None = None,
    params: KDParams | None = None,
) -> KDOutput:
    """Plain-torch sparse-teacher loss, chunked over tokens (the CPU path; see the module docstring).
    Gradients reach ``student_hidden`` / ``student_weight`` when they require grad (cast to their dtype)."""
    p = params or make_topk_params(
        divergence, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
        scale_by_t2=scale_by_t2, ignore_index=ignore_index, num_domains=num_domains,
    )  # fmt: skip
    check_topk_inputs(student_hidden, student_weight, topk_ids, topk_logprobs, tail_logmass)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    grad_on = torch.is_grad_enabled()
    res = FusedLinearKDTopkReferenceFunction.apply(
        student_hidden, student_weight, topk_ids.detach(), topk_logprobs.detach(), tail_logmass.detach(),
        labels, domain_ids, p, chunk_size,
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
    )  # fmt: skip
    return _out_from(res)


def coarsening_gap(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """Relative error ``|sparse - dense| / |dense|`` of a loss value (reported by tests and benchmarks)."""
    dv, sv = float(dense), float(sparse)
    return abs(sv - dv) / max(abs(dv), math.ulp(1.0))
