"""The naive KD loss: the formula of ``ddk_fast/ops/reference.py`` written out over all N x V logits at
once, differentiated by autograd. The float64 ground truth of the tests and the "naive" benchmark provider
(what TRL / torchtune do); never a training path.

Per token i (s, t = student / teacher logits, t cut to the first V_s columns, after the optional logit scale
and soft-cap; lq = log_softmax(s / T), lp = log_softmax(t / T)):

    forward_kl       D = KL(p || q)                  reverse_kl       D = KL(q || p)
    jsd              lm = log(beta p + (1-beta) q),  D = beta KL(p || M) + (1-beta) KL(q || M)
    skew_forward_kl  D = KL(p || lam p + (1-lam) q)  skew_reverse_kl  D = KL(q || lam q + (1-lam) p)
    total_variation  D = 1/2 sum |p - q|             CE_i = cross_entropy(s_i, y_i)  (un-tempered)
    loss = ce_weight * mean CE + kd_weight * (T^2 if scale_by_t2) * mean D   over non-ignored tokens

KL from log-probabilities with 0 log 0 = 0. Memory O(N x V): ``fused_linear_kd_loss_naive`` materialises both
[N, V_s] logits in ``compute_dtype`` plus the [N, V_s] intermediates autograd saves. The hyper-parameters are
validated by ``make_params`` exactly as in the reference.
"""

from __future__ import annotations

import torch

from .chunk_math import _valid_mask
from .params import KDOutput, KDParams, make_params


def _kl_from_logprobs(la, lb):
    """KL(a || b) per row from log-probabilities, 0 * log 0 = 0."""
    a = la.exp()
    return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)


def kd_loss_naive(
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
    params: KDParams | None = None,
    **extras,
) -> KDOutput:
    """The formula written out with autograd over all N x V logits at once, in the dtype of the inputs
    (pass float64 tensors for the ground truth). Memory O(N x V): tests and the "naive" provider only."""
    p = params or make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains, **extras
    )
    n, v = student_logits.shape
    s = student_logits
    t = teacher_logits[:, :v].detach()
    s = p.student_logit_scale * s
    t = p.teacher_logit_scale * t
    if p.student_softcap > 0:
        s = p.student_softcap * torch.tanh(s / p.student_softcap)
    if p.teacher_softcap > 0:
        t = p.teacher_softcap * torch.tanh(t / p.teacher_softcap)
    lq = torch.log_softmax(s / p.temperature, -1)
    lp = torch.log_softmax(t / p.temperature, -1)
    div = p.divergence
    if div == "forward_kl":
        d = _kl_from_logprobs(lp, lq)
    elif div == "reverse_kl":
        d = _kl_from_logprobs(lq, lp)
    elif div == "jsd":
        lm = torch.log(p.beta * lp.exp() + (1 - p.beta) * lq.exp())
        d = p.beta * _kl_from_logprobs(lp, lm) + (1 - p.beta) * _kl_from_logprobs(lq, lm)
    elif div == "skew_forward_kl":
        lm = torch.log(p.skew_lambda * lp.exp() + (1 - p.skew_lambda) * lq.exp())
        d = _kl_from_logprobs(lp, lm)
    elif div == "skew_reverse_kl":
        lm = torch.log(p.skew_lambda * lq.exp() + (1 - p.skew_lambda) * lp.exp())
        d = _kl_from_logprobs(lq, lm)
    else:  # total_variation
        d = 0.5 * (lq.exp() - lp.exp()).abs().sum(-1)
    valid = _valid_mask(labels, n, p.ignore_index, s.device)
    if labels is not None:
        ce = torch.nn.functional.cross_entropy(
            s, labels.long(), ignore_index=p.ignore_index, reduction="none"
        )
    else:
        ce = torch.zeros_like(d)
    ce = torch.where(valid, ce, 0.0)
    d = torch.where(valid, d, 0.0)
    nv = valid.to(d.dtype).sum().clamp(min=1.0)
    ce_m, kd_m = ce.sum() / nv, d.sum() / nv
    loss = p.ce_weight * ce_m + p.kd_scale * kd_m
    z = torch.zeros(p.num_domains, dtype=d.dtype, device=s.device)
    dce, dkd, dtok = z.clone(), z.clone(), z.clone()
    if domain_ids is not None and p.num_domains > 0:
        dce = dce.index_add(0, domain_ids.long(), ce.detach())
        dkd = dkd.index_add(0, domain_ids.long(), d.detach())
        dtok = dtok.index_add(0, domain_ids.long(), valid.to(d.dtype))
    return KDOutput(loss, ce_m.detach(), kd_m.detach(), dce, dkd, dtok)


def fused_linear_kd_loss_naive(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = torch.float32,
    **kwargs,
) -> KDOutput:
    """Materialise both logits (``compute_dtype``, fp32 as TRL/torchtune do; None keeps the input dtype)
    then :func:`kd_loss_naive`. ``kwargs`` as :func:`kd_loss_naive`."""
    v = student_weight.shape[0]
    dt = compute_dtype or student_hidden.dtype
    s = student_hidden.to(dt) @ student_weight.to(dt).T
    with torch.no_grad():
        t = teacher_hidden.to(dt) @ teacher_weight[:v].to(dt).T
    return kd_loss_naive(s, t, labels, domain_ids, **kwargs)
