"""The one plain-torch reference of the KD loss (CPU path, trainer, tests and benchmarks all import it).

Per token i with student logits ``s_i`` (``[V_s]``), teacher logits ``t_i`` (first ``V_s`` of ``[V_t]``;
teacher rows ``>= V_s`` are vocabulary padding and are never read), temperature ``T``:

    q = softmax(s / T)   (student)        p = softmax(t / T)   (teacher)
    CE_i  = logsumexp(s_i) - s_i[y_i]                     (un-tempered; 0 when no labels are given)
    forward_kl       D = KL(p || q) = sum p (log p - log q)
    reverse_kl       D = KL(q || p)
    jsd (beta)       M = beta p + (1-beta) q,  D = beta KL(p || M) + (1-beta) KL(q || M)
                     (TRL/GKD convention; beta = 0 -> forward_kl and beta = 1 -> reverse_kl, special-cased)
    skew_forward_kl  D = KL(p || lam p + (1-lam) q)        (DistiLLM, lam = skew_lambda, default 0.1)
    skew_reverse_kl  D = KL(q || lam q + (1-lam) p)
    total_variation  D = 1/2 sum |p - q|

    loss = ce_weight * mean_i CE_i + kd_weight * (T^2 if scale_by_t2 else 1) * mean_i D_i

means over the tokens whose label is not ``ignore_index`` (all tokens without labels); an all-ignored batch
gives loss 0 and zero gradients. Optional per-model logit transforms (fp32, after the matmul, before T):
``logits = softcap * tanh(scale * raw / softcap)`` (Gemma-2 final-logit soft-capping, Cohere logit scale).

Gradient w.r.t. the tempered student logits z = s/T, g_j = dD/dq_j: ``dD/dz_j = q_j (g_j - sum_k q_k g_k)``:
    forward_kl  q - p
    reverse_kl  q (log q - log p - D)
    jsd         (1-beta) q (log q - log M - KL(q || M))          (since dD/dq_j = (1-beta) log(q_j / M_j))
and the CE gradient is ``softmax(s) - onehot(y)``.

Memory: everything is chunked over tokens (``chunk_size`` rows at a time, default sized so a chunk's
``[chunk, V]`` fp32 tile is ~16 MiB); the gradient is computed in the forward pass per chunk
(gradient-in-forward inside an ``autograd.Function``), so autograd saves only the ``[N, H]`` / ``[V, H]``
gradients, never a ``[N, V]`` tensor. On CPU this is cheaper than recomputing the logits in backward: the
teacher matmul is done once (see docs/kernels.md for the measurement).

The plain formula (materialised logits, autograd), used as the float64 ground truth in the tests and as the
"naive" benchmark provider, is ``ddk_fast/ops/naive.py``: it is a transcription of the math above, not a
second implementation of this chunked reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
)

# a [chunk, V] fp32 tile of this many elements (16 MiB) by default
_CHUNK_ELEMENTS = 1 << 22


class KDOutput(NamedTuple):
    """Result of every KD-loss entry point (reference, naive and Triton).

    Attributes:
        loss: scalar float32, differentiable: ``ce_weight*CE + kd_weight*(T^2 if scale_by_t2)*D``.
        ce: scalar float32, detached: mean CE over counted tokens (0 without labels).
        kd: scalar float32, detached: mean divergence D over counted tokens (no T^2, no kd_weight).
        domain_ce_sum: ``[num_domains]`` float32, detached: sum of CE over counted tokens of each domain.
        domain_kd_sum: ``[num_domains]`` float32, detached: sum of D (no T^2, no kd_weight) per domain.
        domain_tokens: ``[num_domains]`` float32: number of counted tokens per domain.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    domain_ce_sum: torch.Tensor
    domain_kd_sum: torch.Tensor
    domain_tokens: torch.Tensor


class KDParams(NamedTuple):
    """Validated hyper-parameters shared by the reference and the Triton op (hashable, compile-friendly)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew_lambda: float = 0.1
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    scale_by_t2: bool = True
    ignore_index: int = -100
    num_domains: int = 0
    student_logit_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_logit_scale: float = 1.0
    teacher_softcap: float = 0.0

    @property
    def kd_scale(self) -> float:
        """Multiplier of mean D in the loss."""
        return self.kd_weight * (self.temperature**2 if self.scale_by_t2 else 1.0)


def _number(name: str, value, lo: float | None = None, lo_open: bool = False, hi: float | None = None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name}: expected a number {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: expected a number <= {hi}, got {value!r}")
    return float(value)


def make_params(
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    num_domains: int = 0,
    skew_lambda: float = 0.1,
    student_logit_scale: float = 1.0,
    student_softcap: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float = 0.0,
) -> KDParams:
    """Validate the hyper-parameters (ValueError naming the argument) and normalise ``jsd`` at beta 0 / 1."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    beta = _number("beta", beta, 0.0, hi=1.0)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"  # TRL convention: the beta -> 0 limit
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    skew_lambda = _number("skew_lambda", skew_lambda, 0.0)
    if skew_lambda >= 1.0:
        raise ValueError(f"skew_lambda: expected a number in [0, 1), got {skew_lambda!r}")
    if isinstance(scale_by_t2, bool) is False:
        raise ValueError(f"scale_by_t2: expected a bool, got {scale_by_t2!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 0:
        raise ValueError(f"num_domains: expected an int >= 0, got {num_domains!r}")
    return KDParams(
        divergence=divergence,
        beta=beta,
        skew_lambda=skew_lambda,
        temperature=_number("temperature", temperature, 0.0, lo_open=True),
        kd_weight=_number("kd_weight", kd_weight, 0.0),
        ce_weight=_number("ce_weight", ce_weight, 0.0),
        scale_by_t2=scale_by_t2,
        ignore_index=ignore_index,
        num_domains=num_domains,
        student_logit_scale=_number("student_logit_scale", student_logit_scale, 0.0, lo_open=True),
        student_softcap=_number("student_softcap", student_softcap, 0.0),
        teacher_logit_scale=_number("teacher_logit_scale", teacher_logit_scale, 0.0, lo_open=True),
        teacher_softcap=_number("teacher_softcap", teacher_softcap, 0.0),
    )


def check_tokens(n: int, labels, domain_ids, num_domains: int, device: torch.device) -> None:
    """Shape/dtype checks of labels and domain ids (no host sync: values are not range-checked)."""
    for name, t in (("labels", labels), ("domain_ids", domain_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name}: expected shape [{n}] (one per token), got {list(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected an int64 tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if domain_ids is not None and num_domains <= 0:
        raise ValueError(f"num_domains: expected an int > 0 when domain_ids is given, got {num_domains!r}")


def auto_chunk_size(n: int, vocab: int) -> int:
    return max(1, min(n, max(8, _CHUNK_ELEMENTS // max(vocab, 1))))


# ----------------------------------------------------------------------------------------------------------
# per-chunk math (fp32), shared by the logits and the fused-linear references
# ----------------------------------------------------------------------------------------------------------


def _transform(raw: torch.Tensor, scale: float, cap: float):
    """``cap * tanh(scale * raw / cap)`` (or ``scale * raw``); returns (logits, d logits / d raw or None)."""
    if scale != 1.0:
        raw = raw * scale
    if cap > 0.0:
        th = torch.tanh(raw / cap)
        return th * cap, (1.0 - th * th) * scale
    return raw, (scale if scale != 1.0 else None)


def _chunk_terms(s, t, labels, p: KDParams, need_grad: bool):
    """Per-row CE and D of a chunk, and the gradient of ``ce_weight*CE + kd_scale*D`` w.r.t. ``s`` (per row,
    unweighted by 1/n). ``s``: [C, V] fp32, ``t``: [C, V] fp32, ``labels``: [C] or None."""
    temp = p.temperature
    inv_t = 1.0 / temp
    lq = torch.log_softmax(s * inv_t if temp != 1.0 else s, dim=-1)
    lp = torch.log_softmax(t * inv_t if temp != 1.0 else t, dim=-1)
    q = lq.exp()
    pt = lp.exp()
    div = p.divergence
    gz = None
    if div == "forward_kl":
        d = (pt * (lp - lq)).sum(-1)
        if need_grad:
            gz = q - pt
    elif div == "reverse_kl":
        diff = lq - lp
        d = (q * diff).sum(-1)
        if need_grad:
            gz = q * (diff - d[:, None])
    elif div == "jsd":
        b = p.beta
        lm = torch.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        kp = (pt * (lp - lm)).sum(-1)
        lqm = lq - lm
        kq = (q * lqm).sum(-1)
        d = b * kp + (1.0 - b) * kq
        if need_grad:
            gz = (1.0 - b) * q * (lqm - kq[:, None])
    elif div == "skew_forward_kl":
        lam = p.skew_lambda
        lm = torch.logaddexp(lp + math.log(lam), lq + math.log1p(-lam)) if lam > 0 else lq
        d = (pt * (lp - lm)).sum(-1)
        if need_grad:
            r = (lp - lm).exp()  # p / m
            gz = -(1.0 - lam) * q * (r - (q * r).sum(-1, keepdim=True))
    elif div == "skew_reverse_kl":
        lam = p.skew_lambda
        lm = torch.logaddexp(lq + math.log(lam), lp + math.log1p(-lam)) if lam > 0 else lp
        lqm = lq - lm
        d = (q * lqm).sum(-1)
        if need_grad:
            g = lqm - lam * lqm.exp()  # dD/dq_j up to the constant 1 (cancels in g - sum q g)
            gz = q * (g - (q * g).sum(-1, keepdim=True))
    elif div == "total_variation":
        diff = q - pt
        d = 0.5 * diff.abs().sum(-1)
        if need_grad:
            g = 0.5 * torch.sign(diff)
            gz = q * (g - (q * g).sum(-1, keepdim=True))
    else:  # pragma: no cover - make_params validates
        raise ValueError(f"divergence: unknown {div!r}")

    if labels is not None:
        safe = labels.clamp(0, s.shape[1] - 1).long()[:, None]
        if temp == 1.0:
            lse1 = (s[:, :1] - lq[:, :1]).squeeze(1)
        else:
            lse1 = torch.logsumexp(s, dim=-1)
        ce = lse1 - s.gather(1, safe).squeeze(1)
    else:
        ce = torch.zeros_like(d)

    grad = None
    if need_grad:
        grad = gz.mul_(p.kd_scale * inv_t)
        if labels is not None and p.ce_weight != 0.0:
            sm = q if temp == 1.0 else torch.softmax(s, dim=-1)
            grad.add_(sm, alpha=p.ce_weight)
            grad.scatter_add_(1, safe, torch.full_like(safe, -p.ce_weight, dtype=grad.dtype))
    return ce, d, grad


def _valid_mask(labels, n: int, ignore_index: int, device) -> torch.Tensor:
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels != ignore_index


def _finish(ce_rows, d_rows, valid, domain_ids, p: KDParams):
    """Means, loss and per-domain sums from per-row CE and D (ignored rows must already be 0)."""
    validf = valid.float()
    n = validf.sum()
    inv_n = 1.0 / n.clamp(min=1.0)
    ce = ce_rows.sum() * inv_n
    kd = d_rows.sum() * inv_n
    loss = p.ce_weight * ce + p.kd_scale * kd
    nd = p.num_domains
    dev = ce_rows.device
    dce = torch.zeros(nd, dtype=torch.float32, device=dev)
    dkd = torch.zeros(nd, dtype=torch.float32, device=dev)
    dtok = torch.zeros(nd, dtype=torch.float32, device=dev)
    if domain_ids is not None and nd > 0:
        idx = domain_ids.long()
        dce.index_add_(0, idx, ce_rows)
        dkd.index_add_(0, idx, d_rows)
        dtok.index_add_(0, idx, validf)
    return loss, ce, kd, dce, dkd, dtok, inv_n


def _out_from(res) -> KDOutput:
    loss, ce, kd, dce, dkd, dtok = res
    return KDOutput(loss, ce.detach(), kd.detach(), dce, dkd, dtok)


# ----------------------------------------------------------------------------------------------------------
# fused linear + KD loss, chunked over tokens
# ----------------------------------------------------------------------------------------------------------


class FusedLinearKDReferenceFunction(torch.autograd.Function):
    """Chunked gradient-in-forward; saves only grad_h [N, H_s] fp32 and grad_w [V_s, H_s] fp32."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, domain_ids, p: KDParams, chunk_size, need_h, need_w):
        n, _ = h_s.shape
        v = w_s.shape[0]
        dev = h_s.device
        w_s32 = w_s.float()  # no copy for fp32 weights; bf16 logits are accumulated and kept in fp32
        w_t32 = w_t[:v].float()
        chunk = chunk_size or auto_chunk_size(n, v)
        valid = _valid_mask(labels, n, p.ignore_index, dev)
        ce_rows = torch.empty(n, dtype=torch.float32, device=dev)
        d_rows = torch.empty(n, dtype=torch.float32, device=dev)
        grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
        need_grad = need_h or need_w
        # 1/n is known before the loop (tensor, no host sync) so each chunk's gradient is final
        inv_n = 1.0 / valid.float().sum().clamp(min=1.0)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            hs = h_s[i:j].float()
            raw_s = hs @ w_s32.T
            s, ds = _transform(raw_s, p.student_logit_scale, p.student_softcap)
            t, _ = _transform(h_t[i:j].float() @ w_t32.T, p.teacher_logit_scale, p.teacher_softcap)
            del raw_s
            lab = labels[i:j] if labels is not None else None
            ce, d, g = _chunk_terms(s, t, lab, p, need_grad)
            del s, t
            vm = valid[i:j]
            ce_rows[i:j] = torch.where(vm, ce, 0.0)
            d_rows[i:j] = torch.where(vm, d, 0.0)
            if need_grad:
                g.mul_((vm.float() * inv_n)[:, None])
                if ds is not None:
                    g.mul_(ds)
                if need_h:
                    torch.mm(g, w_s32, out=grad_h[i:j])
                if need_w:
                    grad_w.addmm_(g.T, hs)
        loss, ce, kd, dce, dkd, dtok, _ = _finish(ce_rows, d_rows, valid, domain_ids, p)
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
        return gh, gw, None, None, None, None, None, None, None, None


def check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    """ValueError naming the argument when the four matrices do not fit together."""
    for name, t in (
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != student_hidden.device:
            raise ValueError(
                f"{name}: expected a tensor on {student_hidden.device} (student_hidden's), got {t.device}"
            )
    n, hs = student_hidden.shape
    if student_weight.shape[1] != hs:
        raise ValueError(
            f"student_weight: expected shape [V_s, {hs}] (H_s of student_hidden), "
            f"got {list(student_weight.shape)}"
        )
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden: expected {n} rows (one per student token), "
            f"got shape {list(teacher_hidden.shape)}"
        )
    ht = teacher_hidden.shape[1]
    if teacher_weight.shape[1] != ht:
        raise ValueError(
            f"teacher_weight: expected shape [V_t, {ht}] (H_t of teacher_hidden), "
            f"got {list(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: expected V_t >= V_s = {student_weight.shape[0]} "
            "(teacher rows >= V_s are padding), "
            f"got V_t = {teacher_weight.shape[0]}"
        )


def fused_linear_kd_loss_reference(
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
    chunk_size: int | None = None,
    params: KDParams | None = None,
    **extras,
) -> KDOutput:
    """Plain-torch fused ``lm_head`` + KD loss, chunked over tokens (the CPU path; see the module docstring).

    Shapes: ``student_hidden`` [N, H_s], ``student_weight`` [V_s, H_s], ``teacher_hidden`` [N, H_t],
    ``teacher_weight`` [V_t >= V_s, H_t], ``labels``/``domain_ids`` [N] int64. Any float dtype; logits are
    computed and kept in fp32. Gradients: ``student_hidden`` and ``student_weight`` when they require grad;
    the teacher gets none. ``extras``: ``skew_lambda``, ``student_logit_scale``, ``student_softcap``,
    ``teacher_logit_scale``, ``teacher_softcap``. Peak extra memory ~ 6 x chunk_size x V_s x 4 bytes.
    """
    p = params or make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains, **extras
    )
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_weight.requires_grad
    res = FusedLinearKDReferenceFunction.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        labels,
        domain_ids,
        p,
        chunk_size,
        need_h,
        need_w,
    )
    return _out_from(res)


# ----------------------------------------------------------------------------------------------------------
# KD loss from logits a user already has, chunked over tokens
# ----------------------------------------------------------------------------------------------------------


class KDReferenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_all, t_all, labels, domain_ids, p: KDParams, chunk_size, need_grad):
        n, v = s_all.shape
        dev = s_all.device
        chunk = chunk_size or auto_chunk_size(n, v)
        valid = _valid_mask(labels, n, p.ignore_index, dev)
        ce_rows = torch.empty(n, dtype=torch.float32, device=dev)
        d_rows = torch.empty(n, dtype=torch.float32, device=dev)
        grad = torch.empty(s_all.shape, dtype=s_all.dtype, device=dev) if need_grad else None
        inv_n = 1.0 / valid.float().sum().clamp(min=1.0)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            s, ds = _transform(s_all[i:j].float(), p.student_logit_scale, p.student_softcap)
            t, _ = _transform(t_all[i:j, :v].float(), p.teacher_logit_scale, p.teacher_softcap)
            lab = labels[i:j] if labels is not None else None
            ce, d, g = _chunk_terms(s, t, lab, p, need_grad)
            vm = valid[i:j]
            ce_rows[i:j] = torch.where(vm, ce, 0.0)
            d_rows[i:j] = torch.where(vm, d, 0.0)
            if need_grad:
                g.mul_((vm.float() * inv_n)[:, None])
                if ds is not None:
                    g.mul_(ds)
                grad[i:j] = g
        loss, ce, kd, dce, dkd, dtok, _ = _finish(ce_rows, d_rows, valid, domain_ids, p)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd, dce, dkd, dtok)
        return loss, ce, kd, dce, dkd, dtok

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        gs = None
        if grad is not None and ctx.needs_input_grad[0]:
            gs = grad * grad_loss.to(grad.dtype)
        return gs, None, None, None, None, None, None


def check_logits(student_logits, teacher_logits) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [N, V], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits: expected a tensor on {student_logits.device}, "
            f"got one on {teacher_logits.device}"
        )
    n, v = student_logits.shape
    if teacher_logits.shape[0] != n or teacher_logits.shape[1] < v:
        raise ValueError(
            f"teacher_logits: expected shape [{n}, V_t >= {v}] "
            f"(student_logits is {list(student_logits.shape)}), "
            f"got {list(teacher_logits.shape)}"
        )


def kd_loss_reference(
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
    chunk_size: int | None = None,
    params: KDParams | None = None,
    **extras,
) -> KDOutput:
    """KD loss from logits: ``student_logits`` [N, V_s] (gets a gradient in its own dtype),
    ``teacher_logits`` [N, V_t >= V_s] (columns >= V_s ignored, no gradient). Chunked over tokens."""
    p = params or make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains, **extras
    )
    check_logits(student_logits, teacher_logits)
    check_tokens(student_logits.shape[0], labels, domain_ids, p.num_domains, student_logits.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    need = torch.is_grad_enabled() and student_logits.requires_grad
    res = KDReferenceFunction.apply(
        student_logits, teacher_logits.detach(), labels, domain_ids, p, chunk_size, need
    )
    return _out_from(res)
