"""Triton kernels of the fused ``lm_head`` + KD loss (and of the KD loss from logits, ``FROM_LOGITS``).

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
  backward ``_kd_bwd_kernel`` (grid: row blocks x vocabulary tiles): recompute the tile, form
      dL/ds = w_ce,i (softmax(s) - onehot(y_i)) + w_kd,i / T * dD/dx,
      dD/dx = q - p | q (log q - log p - D) | (1-beta) q (log q - log M - S) | q (g - S)  (g = dD/dq)
  times the softcap derivative, then ``dH[rows] += dS @ W[cols]`` and ``dW[cols] += dS^T @ H[rows]`` with fp32
  ``tl.atomic_add`` over H in BK chunks (FROM_LOGITS: store dS directly).

Bytes (B = bytes per element of the inputs, NB = ceil(N / BN)):
  pass 1 reads NB * V_s * (H_s + H_t) * B of weights + N (H_s + H_t) B of hidden states, writes 6 N fp32;
  pass 2 reads the same again (jsd / skew / tv only); backward reads it once more plus N*H_s*B and
  V_s*H_s*B per row block for the gradient matmuls and atomically adds N*H_s*4 * ceil(V_s/BV) +
  V_s*H_s*4 * NB bytes. No [N, V] tensor exists in any dtype; extra memory is O(N) + the fp32 gradients.

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

DIV_CODES = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_forward_kl": 3,
    "skew_reverse_kl": 4,
    "total_variation": 5,
}


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow NaNs
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(
    h_ptr,
    w_ptr,
    s_hn,
    s_hk,
    s_wv,
    s_wk,
    rows,
    cols,
    rmask,
    cmask,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 raw logits: h[rows] @ w[cols]^T (or a tile of given logits)."""
    if FROM_LOGITS:
        acc = tl.load(
            h_ptr + rows[:, None] * s_hn + cols[None, :] * s_hk,
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < K
            a = tl.load(
                h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                mask=rmask[:, None] & km[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                mask=cmask[:, None] & km[None, :],
                other=0.0,
            )
            if UPCAST:  # interpreter: its bf16 tl.dot is wrong; bf16 x bf16 products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _transform(raw, scale, cap, HAS_CAP: tl.constexpr):
    x = raw * scale
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


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


# ------------------------------------------------------------------------------------------------ launchers


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _blocks(n: int, v: int, k: int, from_logits: bool):
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps). Interpreter: few, large tiles (each op is a numpy call)."""
    if _interpreted():
        bn = max(16, min(64, triton.next_power_of_2(n)))
        return bn, 512 if from_logits else 256, max(16, min(256, triton.next_power_of_2(k))), 1
    if from_logits:
        return 16, 1024, 16, 8
    return 64, 128, 64, 8


def _upcast(t) -> bool:
    import torch

    return _interpreted() and t.dtype != torch.float32


def _dot_precision(dtype) -> str:
    import torch

    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreted():
        return "tf32"
    return "ieee"


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
