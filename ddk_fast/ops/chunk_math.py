"""The per-chunk math of the plain-torch KD loss (``reference.py`` runs it over token chunks for the
logits and the fused-linear losses; ``topk_reference.py`` and ``naive.py`` share its helpers): the chunk size
and its memory bound, the logit transforms, CE / divergence values and their gradients for one ``[chunk, V]``
tile, and the reductions into the loss, the means and the per-domain sums. The formulas are in
``reference.py``'s docstring."""

from __future__ import annotations

import math

import torch

from .params import KDOutput, KDParams

# default chunk: a [chunk, V] fp32 tile of this many elements (32 MiB), but at least _MIN_ROWS rows: each
# chunk re-reads both [V, H] heads, and on few rows the matmuls are bound by that read (measured on 2 CPU
# cores, V 151936, H 512: 12 GFLOP/s at 27 rows, 27 at 128, 30 at 256; the fused loss at 128 / 512 rows
# took 30 / 24 s, bench/e2e_diagnostics.py)
_CHUNK_ELEMENTS = 1 << 23
_MIN_ROWS = 256
# live [chunk, V] fp32 tiles at the peak of a chunk: 4 for forward_kl (3 with kd_weight 0), 8 for the others
_PEAK_TILES_FORWARD_KL = 4
_PEAK_TILES_OTHER = 8


def auto_chunk_size(n: int, vocab: int) -> int:
    """Rows per chunk when the caller gives none: ~32 MiB fp32 tiles, at least 256 rows (at most n)."""
    return max(1, min(n, max(_MIN_ROWS, _CHUNK_ELEMENTS // max(vocab, 1))))


def peak_extra_bytes(n: int, vocab: int, hidden: int, chunk: int | None = None,
                     divergence: str = "forward_kl", need_weight_grad: bool = False) -> int:  # fmt: skip
    """The documented bound of the torch path's peak extra memory (fp32, forward + backward) beyond the
    inputs: the live ``[chunk, V]`` tiles of one chunk plus the gradient outputs (``[N, H]``, and ``[V, H]``
    when the head trains) and per-row buffers. ``bench/bench_kd_loss.py`` measures it and the smoke run
    fails above 1.5x this."""
    chunk = min(n, chunk or auto_chunk_size(n, vocab))
    tiles = _PEAK_TILES_FORWARD_KL if divergence == "forward_kl" else _PEAK_TILES_OTHER
    grads = n * hidden + (vocab * hidden if need_weight_grad else 0)
    return 4 * (tiles * chunk * vocab + grads + 8 * n)


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (bf16 / fp16 inputs are upcast: fp32 accumulation)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


# ----------------------------------------------------------------------------------------------------------
# per-chunk math, shared by the logits and the fused-linear references
# ----------------------------------------------------------------------------------------------------------


def _transform(raw: torch.Tensor, scale: float, cap: float):
    """``cap * tanh(scale * raw / cap)`` (or ``scale * raw``); returns (logits, d logits / d raw or None)."""
    if scale != 1.0:
        raw = raw * scale
    if cap > 0.0:
        th = torch.tanh(raw / cap)
        return th * cap, (1.0 - th * th) * scale
    return raw, (scale if scale != 1.0 else None)


def _ce_only_terms(tiles: list, labels, p: KDParams, need_grad: bool):
    """``kd_weight == 0``: CE and its gradient (D reported as 0); takes ``tiles = [s]`` over (emptied)."""
    s = tiles.pop()
    if labels is None:
        d = s.new_zeros(s.shape[0])
        return d, d, (s.zero_() if need_grad else None)
    safe = labels.clamp(0, s.shape[1] - 1).long()[:, None]
    lsm = torch.log_softmax(s, dim=-1)
    del s
    ce = -lsm.gather(1, safe).squeeze(1)
    d = torch.zeros_like(ce)
    if not need_grad:
        return ce, d, None
    grad = lsm.exp_().mul_(p.ce_weight)
    grad.scatter_add_(1, safe, torch.full_like(safe, -p.ce_weight, dtype=grad.dtype))
    return ce, d, grad


def _forward_kl_terms(tiles: list, labels, p: KDParams, need_grad: bool):
    """Forward KL + CE in few passes and three ``[C, V]`` tiles (four when T != 1 with labels): the fused
    log_softmax kernel, then in-place updates (log p - log q, times p; q, then the gradient)."""
    t, s = tiles.pop(), tiles.pop()
    temp = p.temperature
    safe = labels.clamp(0, s.shape[1] - 1).long()[:, None] if labels is not None else None
    lsm = None  # log_softmax of the un-tempered student logits (CE) when T != 1
    if temp != 1.0:
        if safe is not None:
            lsm = torch.log_softmax(s, dim=-1)
        s.mul_(1.0 / temp)
        t.mul_(1.0 / temp)
    lq = torch.log_softmax(s, dim=-1)
    del s
    lp = torch.log_softmax(t, dim=-1)
    del t
    ce = -(lq if lsm is None else lsm).gather(1, safe).squeeze(1) if safe is not None else None
    pt = lp.exp()
    d = lp.sub_(lq).mul_(pt).sum(-1)
    del lp
    if ce is None:
        ce = torch.zeros_like(d)
    if not need_grad:
        return ce, d, None
    kc = p.kd_scale / temp
    cw = p.ce_weight if safe is not None else 0.0
    grad = lq.exp_()  # q
    if lsm is None:
        grad.mul_(kc + cw).sub_(pt, alpha=kc)
    else:
        grad.mul_(kc).sub_(pt, alpha=kc).add_(lsm.exp_(), alpha=cw)
    if cw != 0.0:
        grad.scatter_add_(1, safe, torch.full_like(safe, -cw, dtype=grad.dtype))
    return ce, d, grad


def _chunk_terms(tiles: list, labels, p: KDParams, need_grad: bool):
    """Per-row CE and D of a chunk, and the gradient of ``ce_weight*CE + kd_scale*D`` w.r.t. ``s`` (per row,
    unweighted by 1/n). ``tiles``: ``[s, t]`` ([C, V] logits in the compute dtype: fp32, fp64 for fp64
    inputs), or ``[s]`` when ``kd_weight == 0`` (CE only, the teacher never computed: D is reported as 0).
    The function takes the tiles over: it empties the list and may overwrite them, so that a tile is freed as
    soon as it is used (the peak is a few tiles, not all the temporaries). ``labels``: [C] or None."""
    if len(tiles) == 1:
        return _ce_only_terms(tiles, labels, p, need_grad)
    if p.divergence == "forward_kl":
        return _forward_kl_terms(tiles, labels, p, need_grad)
    t, s = tiles.pop(), tiles.pop()
    temp = p.temperature
    inv_t = 1.0 / temp
    lq = torch.log_softmax(s * inv_t if temp != 1.0 else s, dim=-1)
    lp = torch.log_softmax(t * inv_t if temp != 1.0 else t, dim=-1)
    q = lq.exp()
    pt = lp.exp()
    div = p.divergence
    gz = None
    if div == "reverse_kl":
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


def _inv_divisor(valid, divisor, dt):
    """1 / (counted tokens, at least 1), or 1 / divisor when the caller gives one (sum, num_items)."""
    if divisor is None:
        return 1.0 / valid.to(dt).sum().clamp(min=1.0)
    return 1.0 / divisor.to(dt)


def _finish(ce_rows, d_rows, valid, domain_ids, p: KDParams, inv_div):
    """Loss, means and per-domain sums from per-row CE and D (ignored rows must already be 0)."""
    validf = valid.to(ce_rows.dtype)
    inv_n = 1.0 / validf.sum().clamp(min=1.0)
    ce_sum, d_sum = ce_rows.sum(), d_rows.sum()
    loss = (p.ce_weight * ce_sum + p.kd_scale * d_sum) * inv_div
    nd = p.num_domains
    dce = ce_rows.new_zeros(nd)
    dkd = ce_rows.new_zeros(nd)
    dtok = ce_rows.new_zeros(nd)
    if domain_ids is not None and nd > 0:
        idx = domain_ids.long()
        dce.index_add_(0, idx, ce_rows)
        dkd.index_add_(0, idx, d_rows)
        dtok.index_add_(0, idx, validf)
    return loss, ce_sum * inv_n, d_sum * inv_n, dce, dkd, dtok


def _out_from(res) -> KDOutput:
    loss, ce, kd, dce, dkd, dtok = res[:6]
    return KDOutput(loss, ce.detach(), kd.detach(), dce.detach(), dkd.detach(), dtok.detach())


def check_chunk(chunk_size) -> int:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    return chunk_size or 0


def _scalar_fakes(like, dt, nd):
    f = dict(dtype=dt, device=like.device)
    return tuple(like.new_empty((), **f) for _ in range(3)) + tuple(
        like.new_empty((nd,), **f) for _ in range(3)
    )
