"""Forward Triton kernels of the fused ``lm_head`` + KD loss (and of the KD loss from logits, ``FROM_LOGITS``).

Math (per token row i; s = student logits, t = teacher logits restricted to the first V_s columns, T = temperature,
x = s/T, y = t/T, q = softmax(x), p = softmax(y)):

  pass 1 ``_kd_fwd_kernel``  (grid: row blocks; loop over vocabulary tiles, each tile a [BN, BV] fp32 matmul
  accumulator ``h[rows] @ W[cols]^T`` over H in BK chunks, never stored). Online softmax for three streams:
      m <- max(m, max_j x_j),  l <- l * exp(m_old - m) + sum_j exp(x_j - m)       (lse = m + log l)
  for s (CE, T = 1), x (student at T) and y (teacher at T), and the rescaled running sums
      A_t = sum_j exp(y_j - m_t) (y_j - x_j)  -> forward KL = A_t / l_t - lse_y + lse_x
      A_s = sum_j exp(x_j - m_s) (x_j - y_j)  -> reverse KL = A_s / l_s - lse_x + lse_y
  plus the target logit s[y_i]: CE = lse_s - s[y_i].
  pass 2 ``_kd_div_kernel`` (only jsd / skew / total variation, whose log M needs normalised p and q): with the
  lse's known, accumulate D and the row constant S of the gradient (jsd: S = KL(q || M)).
  The gradient pass is in ``kd_backward.py``.

Bytes (B = bytes per element of the inputs, NB = ceil(N / BN)):
  pass 1 reads NB * V_s * (H_s + H_t) * B of weights + N (H_s + H_t) B of hidden states, writes 6 N fp32
  (stats [4, N], ce [N], d [N]) and atomically adds 3 fp32 per counted row into the per-domain sums;
  pass 2 reads the same again (jsd / skew / tv only) and rewrites d and S. No [N, V] tensor exists in any
  dtype; extra memory is O(N).

Design choice: recompute-in-backward. A fused kernel cannot hold a row block's logits across the vocabulary
loop (128k x 64 rows fp32 = 32 MiB), so the gradient pass recomputes the logit tiles whether it runs inside the
forward (gradient-in-forward, as Liger) or in the backward: the FLOPs are the same in training. Recomputing in
backward lets an eval/no-grad forward skip the gradient pass (>= 2x cheaper), needs no ``requires_grad``
knowledge at forward time (plays with torch.compile / custom_op), and keeps no [N, H_s] fp32 gradient alive
between forward and backward. The CPU reference does the opposite (gradient-in-forward): there the [chunk, V]
logits *are* materialised, so it computes them once (measured in docs/kernels.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_common import _blocks, _dot_precision, _logaddexp, _tile, _transform, _upcast


@triton.jit
def _kd_fwd_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    labels_ptr,
    dom_ptr,
    stats_ptr,
    ce_ptr,
    d_ptr,
    dce_ptr,
    dkd_ptr,
    dtok_ptr,
    N,
    V,
    HS,
    HT,
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    t_hn,
    t_hk,
    t_wv,
    t_wk,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    num_domains,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    DIV: tl.constexpr,
    SAME_T: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
    else:
        y = tl.full((BLOCK_N,), -1, tl.int64)
        valid = rmask
    m1 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l1 = tl.zeros((BLOCK_N,), tl.float32)
    ms = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    ls = tl.zeros((BLOCK_N,), tl.float32)
    mt = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lt = tl.zeros((BLOCK_N,), tl.float32)
    acc_kl = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        s = _transform(
            _tile(
                hs_ptr,
                ws_ptr,
                s_hn,
                s_hk,
                s_wv,
                s_wk,
                rows,
                cols,
                rmask,
                cmask,
                HS,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
                FROM_LOGITS,
                DOT_PREC,
                UPCAST,
            ),
            s_scale,
            s_cap,
            S_CAP,
        )
        t = _transform(
            _tile(
                ht_ptr,
                wt_ptr,
                t_hn,
                t_hk,
                t_wv,
                t_wk,
                rows,
                cols,
                rmask,
                cmask,
                HT,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
                FROM_LOGITS,
                DOT_PREC,
                UPCAST,
            ),
            t_scale,
            t_cap,
            T_CAP,
        )
        s = tl.where(cmask[None, :], s, float("-inf"))
        x = s * inv_t
        yt = tl.where(cmask[None, :], t * inv_t, float("-inf"))
        if HAS_LABELS:
            s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
            if not SAME_T:
                m1n = tl.maximum(m1, tl.max(s, axis=1))
                l1 = l1 * tl.exp(m1 - m1n) + tl.sum(tl.exp(s - m1n[:, None]), axis=1)
                m1 = m1n
        msn = tl.maximum(ms, tl.max(x, axis=1))
        a_s = tl.exp(ms - msn)
        e_s = tl.exp(x - msn[:, None])
        ls = ls * a_s + tl.sum(e_s, axis=1)
        mtn = tl.maximum(mt, tl.max(yt, axis=1))
        a_t = tl.exp(mt - mtn)
        e_t = tl.exp(yt - mtn[:, None])
        lt = lt * a_t + tl.sum(e_t, axis=1)
        if DIV == 0:
            acc_kl = acc_kl * a_t + tl.sum(tl.where(cmask[None, :], e_t * (yt - x), 0.0), axis=1)
        if DIV == 1:
            acc_kl = acc_kl * a_s + tl.sum(tl.where(cmask[None, :], e_s * (x - yt), 0.0), axis=1)
        ms = msn
        mt = mtn
    lse_x = ms + tl.log(ls)
    lse_y = mt + tl.log(lt)
    if SAME_T:
        lse_s = lse_x
    else:
        lse_s = m1 + tl.log(l1)
    if HAS_LABELS:
        ce = tl.where(valid, lse_s - s_y, 0.0)
    else:
        ce = tl.zeros((BLOCK_N,), tl.float32)
    tl.store(stats_ptr + rows, lse_s, mask=rmask)
    tl.store(stats_ptr + N + rows, lse_x, mask=rmask)
    tl.store(stats_ptr + 2 * N + rows, lse_y, mask=rmask)
    tl.store(ce_ptr + rows, ce, mask=rmask)
    if HAS_DOMAINS:
        dom = tl.load(dom_ptr + rows, mask=rmask, other=0)
        dmask = valid & (dom >= 0) & (dom < num_domains)
        tl.atomic_add(dce_ptr + dom, ce, mask=dmask)
        tl.atomic_add(dtok_ptr + dom, tl.where(dmask, 1.0, 0.0), mask=dmask)
    if DIV <= 1:
        if DIV == 0:
            d = acc_kl / lt - lse_y + lse_x
        else:
            d = acc_kl / ls - lse_x + lse_y
        d = tl.where(valid, d, 0.0)
        tl.store(d_ptr + rows, d, mask=rmask)
        tl.store(stats_ptr + 3 * N + rows, d, mask=rmask)  # S = D for reverse KL (unused for forward KL)
        if HAS_DOMAINS:
            tl.atomic_add(dkd_ptr + dom, d, mask=dmask)


@triton.jit
def _kd_div_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    labels_ptr,
    dom_ptr,
    stats_ptr,
    d_ptr,
    dkd_ptr,
    N,
    V,
    HS,
    HT,
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    t_hn,
    t_hk,
    t_wv,
    t_wk,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    num_domains,
    beta,
    lam,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    DIV: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
    else:
        valid = rmask
    lse_x = tl.load(stats_ptr + N + rows, mask=rmask, other=0.0)
    lse_y = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    acc_d = tl.zeros((BLOCK_N,), tl.float32)
    acc_aux = tl.zeros((BLOCK_N,), tl.float32)
    log_b = tl.log(beta)
    log_1mb = tl.log(1.0 - beta)
    log_l = tl.log(lam)
    log_1ml = tl.log(1.0 - lam)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        m2 = rmask[:, None] & cmask[None, :]
        s = _transform(
            _tile(
                hs_ptr,
                ws_ptr,
                s_hn,
                s_hk,
                s_wv,
                s_wk,
                rows,
                cols,
                rmask,
                cmask,
                HS,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
                FROM_LOGITS,
                DOT_PREC,
                UPCAST,
            ),
            s_scale,
            s_cap,
            S_CAP,
        )
        t = _transform(
            _tile(
                ht_ptr,
                wt_ptr,
                t_hn,
                t_hk,
                t_wv,
                t_wk,
                rows,
                cols,
                rmask,
                cmask,
                HT,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
                FROM_LOGITS,
                DOT_PREC,
                UPCAST,
            ),
            t_scale,
            t_cap,
            T_CAP,
        )
        lq = s * inv_t - lse_x[:, None]
        lp = t * inv_t - lse_y[:, None]
        q = tl.exp(lq)
        p = tl.exp(lp)
        if DIV == 2:  # jsd: D = beta KL(p||M) + (1-beta) KL(q||M), S = KL(q||M)
            lm = _logaddexp(lp + log_b, lq + log_1mb)
            kq = q * (lq - lm)
            dd = beta * p * (lp - lm) + (1.0 - beta) * kq
            aux = kq
        elif DIV == 3:  # skew forward: D = KL(p || lam p + (1-lam) q), S = sum q p/m
            lm = _logaddexp(lp + log_l, lq + log_1ml)
            dd = p * (lp - lm)
            aux = q * tl.exp(lp - lm)
        elif DIV == 4:  # skew reverse: D = KL(q || lam q + (1-lam) p), g = log(q/m) - lam q/m
            lm = _logaddexp(lq + log_l, lp + log_1ml)
            lqm = lq - lm
            dd = q * lqm
            aux = q * (lqm - lam * tl.exp(lqm))
        else:  # total variation, g = sign(q - p) / 2
            diff = q - p
            dd = 0.5 * tl.abs(diff)
            aux = q * 0.5 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        acc_d += tl.sum(tl.where(m2, dd, 0.0), axis=1)
        acc_aux += tl.sum(tl.where(m2, aux, 0.0), axis=1)
    d = tl.where(valid, acc_d, 0.0)
    tl.store(d_ptr + rows, d, mask=rmask)
    tl.store(stats_ptr + 3 * N + rows, acc_aux, mask=rmask)
    if HAS_DOMAINS:
        dom = tl.load(dom_ptr + rows, mask=rmask, other=0)
        dmask = valid & (dom >= 0) & (dom < num_domains)
        tl.atomic_add(dkd_ptr + dom, d, mask=dmask)


# ------------------------------------------------------------------------------------------------ launcher


def kd_fwd(
    h_s,
    w_s,
    h_t,
    w_t,
    labels,
    domain_ids,
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
):
    """Passes 1 (+2). Returns ``stats`` [4, N] fp32 (lse_s, lse_x, lse_y, S), ``ce`` [N], ``d`` [N] (0 on
    ignored rows) and the per-domain sums ``dce, dkd, dtok`` [num_domains] fp32.

    ``from_logits``: ``h_s``/``h_t`` are the logits [N, V_s] / [N, V_t] and ``w_s``/``w_t`` are ignored."""
    import torch

    n = h_s.shape[0]
    dev = h_s.device
    hs_k = 0 if from_logits else h_s.shape[1]
    ht_k = 0 if from_logits else h_t.shape[1]
    stats = torch.empty(4, n, dtype=torch.float32, device=dev)
    ce = torch.empty(n, dtype=torch.float32, device=dev)
    d = torch.empty(n, dtype=torch.float32, device=dev)
    dce = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    dkd = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    dtok = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    if n == 0:
        return stats, ce, d, dce, dkd, dtok
    bn, bv, bk, warps = _blocks(n, vocab, max(hs_k, ht_k), from_logits)
    ws = w_s if not from_logits else h_s
    wt = w_t if not from_logits else h_t
    has_labels = labels is not None
    has_dom = domain_ids is not None and num_domains > 0
    lab = labels if has_labels else ce  # dummy pointer, never read
    dom = domain_ids if has_dom else ce
    common = (
        h_s.stride(0),
        h_s.stride(1),
        ws.stride(0),
        ws.stride(1),
        h_t.stride(0),
        h_t.stride(1),
        wt.stride(0),
        wt.stride(1),
    )
    prec = _dot_precision(h_s.dtype)
    grid = (triton.cdiv(n, bn),)
    _kd_fwd_kernel[grid](
        h_s,
        ws,
        h_t,
        wt,
        lab,
        dom,
        stats,
        ce,
        d,
        dce,
        dkd,
        dtok,
        n,
        vocab,
        hs_k,
        ht_k,
        *common,
        1.0 / temperature,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        ignore_index,
        num_domains,
        HAS_LABELS=has_labels,
        HAS_DOMAINS=has_dom,
        DIV=div,
        SAME_T=temperature == 1.0,
        S_CAP=s_cap > 0,
        T_CAP=t_cap > 0,
        FROM_LOGITS=from_logits,
        DOT_PREC=prec,
        UPCAST=_upcast(h_s),
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_K=bk,
        num_warps=warps,
    )
    if div >= 2:
        _kd_div_kernel[grid](
            h_s,
            ws,
            h_t,
            wt,
            lab,
            dom,
            stats,
            d,
            dkd,
            n,
            vocab,
            hs_k,
            ht_k,
            *common,
            1.0 / temperature,
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            ignore_index,
            num_domains,
            beta,
            lam,
            HAS_LABELS=has_labels,
            HAS_DOMAINS=has_dom,
            DIV=div,
            S_CAP=s_cap > 0,
            T_CAP=t_cap > 0,
            FROM_LOGITS=from_logits,
            DOT_PREC=prec,
            UPCAST=_upcast(h_s),
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_K=bk,
            num_warps=warps,
        )
    return stats, ce, d, dce, dkd, dtok
