"""Backward Triton kernel of the fused ``lm_head`` + KD loss (and of the KD loss from logits, ``FROM_LOGITS``).

Math (per token row i; s = student logits, x = s/T, q = softmax(x), p = softmax(t/T), M the jsd / skew
mixture, D the divergence; lse's and the row constant S come from the forward passes in ``kd_forward.py``):

  ``_kd_bwd_kernel`` (grid: row blocks x vocabulary tiles): recompute the tile, form
      dL/ds = w_ce,i (softmax(s) - onehot(y_i)) + w_kd,i / T * dD/dx,
      dD/dx = q - p | q (log q - log p - D) | (1-beta) q (log q - log M - S) | q (g - S)  (g = dD/dq)
  times the softcap derivative, then ``dH[rows] += dS @ W[cols]`` and ``dW[cols] += dS^T @ H[rows]`` with fp32
  ``tl.atomic_add`` over H in BK chunks (FROM_LOGITS: store dS directly). The per-row weights w_ce,i = dL/dCE_i
  and w_kd,i = dL/dD_i arrive from autograd (grad_output and the 1/n mean included, no host sync).

Bytes (B = bytes per element of the inputs, NB = ceil(N / BN)):
  reads NB * V_s * (H_s + H_t) * B of weights + N (H_s + H_t) B of hidden states to recompute the tiles, 4 N + 2 N
  fp32 of stats and row weights, plus N*H_s*B and V_s*H_s*B per row block for the gradient matmuls, and
  atomically adds N*H_s*4 * ceil(V_s/BV) + V_s*H_s*4 * NB bytes. No [N, V] tensor exists in any dtype; extra
  memory is the fp32 gradients of H_s and W_s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_common import _blocks, _dot_precision, _logaddexp, _tile, _transform, _upcast


@triton.jit
def _kd_bwd_kernel(
    hs_ptr,
    ws_ptr,
    ht_ptr,
    wt_ptr,
    labels_ptr,
    stats_ptr,
    gce_ptr,
    gd_ptr,
    gh_ptr,
    gw_ptr,
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
    g_hn,
    g_hk,
    g_wv,
    g_wk,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    beta,
    lam,
    HAS_LABELS: tl.constexpr,
    DIV: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    m2 = rmask[:, None] & cmask[None, :]
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
    else:
        y = tl.full((BLOCK_N,), -1, tl.int64)
        valid = rmask
    lse_s = tl.load(stats_ptr + rows, mask=rmask, other=0.0)
    lse_x = tl.load(stats_ptr + N + rows, mask=rmask, other=0.0)
    lse_y = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    aux = tl.load(stats_ptr + 3 * N + rows, mask=rmask, other=0.0)
    # per-row weights = dL/dCE_i and dL/dD_i (0 for ignored rows)
    w_ce = tl.where(valid, tl.load(gce_ptr + rows, mask=rmask, other=0.0), 0.0)
    w_kd = tl.where(valid, tl.load(gd_ptr + rows, mask=rmask, other=0.0), 0.0) * inv_t

    raw = _tile(
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
    )
    s = _transform(raw, s_scale, s_cap, S_CAP)
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
    if DIV == 0:
        gz = q - p
    elif DIV == 1:
        gz = q * (lq - lp - aux[:, None])
    elif DIV == 2:
        lm = _logaddexp(lp + tl.log(beta), lq + tl.log(1.0 - beta))
        gz = (1.0 - beta) * q * (lq - lm - aux[:, None])
    elif DIV == 3:
        lm = _logaddexp(lp + tl.log(lam), lq + tl.log(1.0 - lam))
        gz = -(1.0 - lam) * q * (tl.exp(lp - lm) - aux[:, None])
    elif DIV == 4:
        lm = _logaddexp(lq + tl.log(lam), lp + tl.log(1.0 - lam))
        lqm = lq - lm
        gz = q * (lqm - lam * tl.exp(lqm) - aux[:, None])
    else:
        diff = q - p
        g = 0.5 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        gz = q * (g - aux[:, None])
    ds = w_kd[:, None] * gz
    if HAS_LABELS:
        sm = tl.exp(s - lse_s[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        ds += w_ce[:, None] * sm
    if S_CAP:
        th = s / s_cap
        ds = ds * (s_scale * (1.0 - th * th))
    else:
        ds = ds * s_scale
    ds = tl.where(m2, ds, 0.0)

    if FROM_LOGITS:
        tl.store(
            gh_ptr + rows[:, None] * g_hn + cols[None, :] * g_hk, ds.to(gh_ptr.dtype.element_ty), mask=m2
        )
    else:
        dsc = ds.to(hs_ptr.dtype.element_ty)
        if UPCAST:
            dsc = dsc.to(tl.float32)
        for k0 in range(0, HS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < HS
            if NEED_H:
                w = tl.load(
                    ws_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                    mask=cmask[:, None] & km[None, :],
                    other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(dsc, w, input_precision=DOT_PREC)
                tl.atomic_add(
                    gh_ptr + rows[:, None] * g_hn + ks[None, :] * g_hk, dh, mask=rmask[:, None] & km[None, :]
                )
            if NEED_W:
                h = tl.load(
                    hs_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                    mask=rmask[:, None] & km[None, :],
                    other=0.0,
                )
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dsc), h, input_precision=DOT_PREC)
                tl.atomic_add(
                    gw_ptr + cols[:, None] * g_wv + ks[None, :] * g_wk, dw, mask=cmask[:, None] & km[None, :]
                )


# ------------------------------------------------------------------------------------------------ launcher


def kd_bwd(
    h_s,
    w_s,
    h_t,
    w_t,
    labels,
    stats,
    g_ce,
    g_d,
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
):
    """Gradient pass. ``g_ce``/``g_d`` [N] fp32: dL/dCE_i and dL/dD_i. Returns (grad_h fp32 [N, H_s] or None,
    grad_w fp32 [V_s, H_s] or None); ``from_logits``: (grad of the student logits in their dtype, None)."""
    import torch

    n = h_s.shape[0]
    dev = h_s.device
    if from_logits:
        gh = torch.zeros(h_s.shape, dtype=h_s.dtype, device=dev)
        gw = None
        need_h, need_w = True, False
        hs_k = ht_k = 0
    else:
        hs_k, ht_k = h_s.shape[1], h_t.shape[1]
        gh = torch.zeros(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    if n == 0 or not (need_h or need_w):
        return gh, gw
    bn, bv, bk, warps = _blocks(n, vocab, max(hs_k, ht_k), from_logits)
    ws = w_s if not from_logits else h_s
    wt = w_t if not from_logits else h_t
    has_labels = labels is not None
    lab = labels if has_labels else g_ce
    gh_ = gh if gh is not None else g_ce
    gw_ = gw if gw is not None else g_ce
    gh_strides = (gh.stride(0), gh.stride(1)) if gh is not None else (0, 0)
    gw_strides = (gw.stride(0), gw.stride(1)) if gw is not None else (0, 0)
    grid = (triton.cdiv(n, bn), triton.cdiv(vocab, bv))
    _kd_bwd_kernel[grid](
        h_s,
        ws,
        h_t,
        wt,
        lab,
        stats,
        g_ce,
        g_d,
        gh_,
        gw_,
        n,
        vocab,
        hs_k,
        ht_k,
        h_s.stride(0),
        h_s.stride(1),
        ws.stride(0),
        ws.stride(1),
        h_t.stride(0),
        h_t.stride(1),
        wt.stride(0),
        wt.stride(1),
        *gh_strides,
        *gw_strides,
        1.0 / temperature,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        ignore_index,
        beta,
        lam,
        HAS_LABELS=has_labels,
        DIV=div,
        NEED_H=need_h,
        NEED_W=need_w,
        S_CAP=s_cap > 0,
        T_CAP=t_cap > 0,
        FROM_LOGITS=from_logits,
        DOT_PREC=_dot_precision(h_s.dtype),
        UPCAST=_upcast(h_s),
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_K=bk,
        num_warps=warps,
    )
    return gh, gw
