"""Triton kernels of the sparse-teacher (top-k) fused ``lm_head`` + KD loss.

Math (per token row i; the definitions are those of ``ddk_fast/ops/topk_reference.py``): s = h W^T student
logits over the full vocabulary V, x = s / T, q = softmax(x); the cached teacher gives ids I (k), log-probs
a (T = 1) and the tail log-mass c; p_j / P are the teacher's support / tail probabilities at T.

  ``_topk_gather_kernel`` (grid: rows): the support logits s[I_j] = h . W[I_j] as k gathered dot products
      (no [N, V] tensor; N k H multiply-adds, nothing next to the N V H of the vocabulary loop).
  ``_topk_fwd_kernel`` (grid: row blocks): one loop over vocabulary tiles, each tile a [BN, BV] fp32 matmul
      accumulator never stored, with the online softmax of s (CE, T = 1) and of x:
          m <- max(m, max_j x_j),  l <- l exp(m_old - m) + sum_j exp(x_j - m)      (lse = m + log l)
      and the label logit (CE = lse(s) - s[y]). Then two short loops over the support:
          A: lse(a), lse(a / T) (online) and sum_j q_j, q_j = exp(x[I_j] - lse(x))
             -> Z = logaddexp(lse(a), c), log P = c - Z, Q = 1 - sum_j q_j
          B: log p_j = lse(a) - Z + a_j / T - lse(a / T); D's support terms; q_j g_j (g = dD/dq)
      D adds the tail bucket's term; stored per row: lse(s), lse(x), the dense gradient coefficient
      g_t - S (S = sum_j q_j g_j + Q g_t) and per support entry the correction q_j g_j - q_j g_t.
  ``_topk_bwd_dense_kernel`` (grid: row blocks x vocabulary tiles): recompute the tile,
          dL/ds = w_ce (softmax(s) - onehot(y)) + w_kd / T (g_t - S) q
      then dH += dS W, dW += dS^T H (fp32 atomics over H in BK chunks), as ``kd_backward.py``.
  ``_topk_bwd_sparse_kernel`` (grid: rows): the k-sparse part w_kd / T (q_j g_j - q_j g_t) at columns I_j:
      dH[i] += sum_j ds_j W[I_j],  dW[I_j] += ds_j h_i (atomics: two rows may share a support id).

Bytes (B = bytes per input element, NB = ceil(N / BN)): forward reads NB V H B of weights + N H B of hidden
states (the dense loss reads the teacher's as well: about half the traffic and FLOPs), plus N k (H B + 4 + Bc)
for the gathered rows, ids and cached log-probs (Bc bytes each); writes 3 N + 3 N + N k fp32 (stats, ce, d,
support logits and corrections). The dense backward reads what the forward's vocabulary loop read and adds
the gradients; the sparse backward reads and atomically adds 2 N k H elements.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_common import _logit_tile, dot_precision, tile_blocks, upcast


@triton.jit
def _topk_gather_kernel(
    h_ptr, w_ptr, ids_ptr, out_ptr, H, K,
    s_hn, s_hk, s_wv, s_wk,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jm = js < K
        ids = tl.load(ids_ptr + row * K + js, mask=jm, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_J,), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            h = tl.load(h_ptr + row * s_hn + ks * s_hk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + ids[:, None] * s_wv + ks[None, :] * s_wk, mask=jm[:, None] & km[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        tl.store(out_ptr + row * K + js, acc, mask=jm)


@triton.jit
def _topk_fwd_kernel(
    hs_ptr, ws_ptr, sup_ptr, a_ptr, c_ptr, labels_ptr, dom_ptr,
    stats_ptr, corr_ptr, ce_ptr, d_ptr, dce_ptr, dkd_ptr, dtok_ptr,
    N, V, H, K,
    s_hn, s_hk, s_wv, s_wk,
    inv_t, tail_floor, ignore_index, num_domains,
    HAS_LABELS: tl.constexpr, HAS_DOMAINS: tl.constexpr, DIV: tl.constexpr, SAME_T: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
    else:
        y = tl.full((BLOCK_N,), -1, tl.int64)
        valid = rmask
    m1 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l1 = tl.zeros((BLOCK_N,), tl.float32)
    mx = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lx = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        s = _logit_tile(hs_ptr, ws_ptr, s_hn, s_hk, s_wv, s_wk, rows, cols, rmask, cmask, H,
                        BLOCK_N, BLOCK_V, BLOCK_K, False, DOT_PREC, UPCAST)  # fmt: skip
        s = tl.where(cmask[None, :], s, float("-inf"))
        if HAS_LABELS:
            s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
        if not SAME_T:
            m1n = tl.maximum(m1, tl.max(s, axis=1))
            l1 = l1 * tl.exp(m1 - m1n) + tl.sum(tl.exp(s - m1n[:, None]), axis=1)
            m1 = m1n
        x = s * inv_t
        mxn = tl.maximum(mx, tl.max(x, axis=1))
        lx = lx * tl.exp(mx - mxn) + tl.sum(tl.exp(x - mxn[:, None]), axis=1)
        mx = mxn
    lse_x = mx + tl.log(lx)
    if SAME_T:
        lse_s = lse_x
    else:
        lse_s = m1 + tl.log(l1)

    # support, loop A: teacher lse's (online) and the student's support mass
    ma = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    la = tl.zeros((BLOCK_N,), tl.float32)
    mat = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lat = tl.zeros((BLOCK_N,), tl.float32)
    sum_q = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        m2 = rmask[:, None] & (js < K)[None, :]
        off = rows[:, None] * K + js[None, :]
        a = tl.load(a_ptr + off, mask=m2, other=float("-inf")).to(tl.float32)
        xs = tl.load(sup_ptr + off, mask=m2, other=float("-inf")) * inv_t
        man = tl.maximum(ma, tl.max(a, axis=1))
        man = tl.where(man == float("-inf"), 0.0, man)  # fully masked rows stay finite
        la = la * tl.exp(ma - man) + tl.sum(tl.exp(a - man[:, None]), axis=1)
        ma = man
        at = a * inv_t
        matn = tl.maximum(mat, tl.max(at, axis=1))
        matn = tl.where(matn == float("-inf"), 0.0, matn)
        lat = lat * tl.exp(mat - matn) + tl.sum(tl.exp(at - matn[:, None]), axis=1)
        mat = matn
        sum_q += tl.sum(tl.exp(xs - lse_x[:, None]), axis=1)
    lse_a = ma + tl.log(la)
    lse_at = mat + tl.log(lat)
    c = tl.load(c_ptr + rows, mask=rmask, other=float("-inf")).to(tl.float32)
    mz = tl.maximum(lse_a, c)
    z = mz + tl.log(tl.exp(lse_a - mz) + tl.exp(c - mz))
    lpt = c - z
    big_p = tl.exp(lpt)
    shift = lse_a - z - lse_at  # log p_j = a_j / T + shift
    q_raw = 1.0 - sum_q
    q_tail = tl.maximum(q_raw, tail_floor)
    if DIV == 0:  # forward KL: g_t = -P / Q, tail term P log(P / Q)
        g_t = -big_p / q_tail
        d = tl.where(big_p > 0, big_p * (lpt - tl.log(q_tail)), 0.0)
    else:  # total variation: g_t = sign(Q - P) / 2, tail term |P - Q| / 2
        qc = tl.maximum(q_raw, 0.0)
        g_t = 0.5 * tl.where(qc > big_p, 1.0, tl.where(qc < big_p, -1.0, 0.0))
        d = 0.5 * tl.abs(qc - big_p)

    # support, loop B: D's support terms and the gradient corrections
    sum_qg = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        m2 = rmask[:, None] & (js < K)[None, :]
        off = rows[:, None] * K + js[None, :]
        a = tl.load(a_ptr + off, mask=m2, other=float("-inf")).to(tl.float32)
        xs = tl.load(sup_ptr + off, mask=m2, other=float("-inf")) * inv_t
        lp = a * inv_t + shift[:, None]
        p = tl.exp(lp)
        lq = xs - lse_x[:, None]
        q = tl.exp(lq)
        if DIV == 0:
            d += tl.sum(tl.where(m2 & (p > 0), p * (lp - lq), 0.0), axis=1)
            qg = -p
        else:
            d += tl.sum(tl.where(m2, 0.5 * tl.abs(q - p), 0.0), axis=1)
            qg = q * 0.5 * tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
        qg = tl.where(m2, qg, 0.0)
        sum_qg += tl.sum(qg, axis=1)
        tl.store(corr_ptr + off, qg - q * g_t[:, None], mask=m2)
    coef = g_t - (sum_qg + q_raw * g_t)

    if HAS_LABELS:
        ce = tl.where(valid, lse_s - s_y, 0.0)
    else:
        ce = tl.zeros((BLOCK_N,), tl.float32)
    d = tl.where(valid, d, 0.0)
    tl.store(stats_ptr + rows, lse_s, mask=rmask)
    tl.store(stats_ptr + N + rows, lse_x, mask=rmask)
    tl.store(stats_ptr + 2 * N + rows, coef, mask=rmask)
    tl.store(ce_ptr + rows, ce, mask=rmask)
    tl.store(d_ptr + rows, d, mask=rmask)
    if HAS_DOMAINS:
        dom = tl.load(dom_ptr + rows, mask=rmask, other=0)
        dmask = valid & (dom >= 0) & (dom < num_domains)
        tl.atomic_add(dce_ptr + dom, ce, mask=dmask)
        tl.atomic_add(dkd_ptr + dom, d, mask=dmask)
        tl.atomic_add(dtok_ptr + dom, tl.where(dmask, 1.0, 0.0), mask=dmask)


@triton.jit
def _topk_bwd_dense_kernel(
    hs_ptr, ws_ptr, labels_ptr, stats_ptr, gce_ptr, gd_ptr, gh_ptr, gw_ptr,
    N, V, H,
    s_hn, s_hk, s_wv, s_wk, g_hn, g_hk, g_wv, g_wk,
    inv_t, ignore_index,
    HAS_LABELS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
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
    coef = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    w_ce = tl.where(valid, tl.load(gce_ptr + rows, mask=rmask, other=0.0), 0.0)
    w_kd = tl.where(valid, tl.load(gd_ptr + rows, mask=rmask, other=0.0), 0.0) * inv_t
    s = _logit_tile(hs_ptr, ws_ptr, s_hn, s_hk, s_wv, s_wk, rows, cols, rmask, cmask, H,
                    BLOCK_N, BLOCK_V, BLOCK_K, False, DOT_PREC, UPCAST)  # fmt: skip
    ds = (w_kd * coef)[:, None] * tl.exp(s * inv_t - lse_x[:, None])
    if HAS_LABELS:
        ds += w_ce[:, None] * (tl.exp(s - lse_s[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    ds = tl.where(m2, ds, 0.0)
    dsc = ds.to(hs_ptr.dtype.element_ty)
    if UPCAST:
        dsc = dsc.to(tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < H
        if NEED_H:
            w = tl.load(ws_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk, mask=cmask[:, None] & km[None, :],
                        other=0.0)  # fmt: skip
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dsc, w, input_precision=DOT_PREC)
            tl.atomic_add(
                gh_ptr + rows[:, None] * g_hn + ks[None, :] * g_hk, dh, mask=rmask[:, None] & km[None, :]
            )
        if NEED_W:
            h = tl.load(hs_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk, mask=rmask[:, None] & km[None, :],
                        other=0.0)  # fmt: skip
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dsc), h, input_precision=DOT_PREC)
            tl.atomic_add(
                gw_ptr + cols[:, None] * g_wv + ks[None, :] * g_wk, dw, mask=cmask[:, None] & km[None, :]
            )


@triton.jit
def _topk_bwd_sparse_kernel(
    hs_ptr, ws_ptr, ids_ptr, corr_ptr, labels_ptr, gd_ptr, gh_ptr, gw_ptr,
    H, K,
    s_hn, s_hk, s_wv, s_wk, g_hn, g_hk, g_wv, g_wk,
    inv_t, ignore_index,
    HAS_LABELS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    w_kd = tl.load(gd_ptr + row) * inv_t
    if HAS_LABELS:
        w_kd = tl.where(tl.load(labels_ptr + row) != ignore_index, w_kd, 0.0)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jm = js < K
        ids = tl.load(ids_ptr + row * K + js, mask=jm, other=0).to(tl.int64)
        ds = tl.load(corr_ptr + row * K + js, mask=jm, other=0.0) * w_kd
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            m2 = jm[:, None] & km[None, :]
            if NEED_H:
                w = tl.load(ws_ptr + ids[:, None] * s_wv + ks[None, :] * s_wk, mask=m2, other=0.0).to(
                    tl.float32
                )
                tl.atomic_add(gh_ptr + row * g_hn + ks * g_hk, tl.sum(ds[:, None] * w, axis=0), mask=km)
            if NEED_W:
                h = tl.load(hs_ptr + row * s_hn + ks * s_hk, mask=km, other=0.0).to(tl.float32)
                tl.atomic_add(
                    gw_ptr + ids[:, None] * g_wv + ks[None, :] * g_wk, ds[:, None] * h[None, :], mask=m2
                )


# ------------------------------------------------------------------------------------------------ launchers


def _support_blocks(k: int, h: int) -> tuple[int, int]:
    return max(16, min(64, triton.next_power_of_2(k))), max(16, min(128, triton.next_power_of_2(h)))


def kd_topk_fwd(h_s, w_s, ids, a, c, labels, domain_ids, div: int, temperature: float, tail_floor: float,
                ignore_index: int, num_domains: int):  # fmt: skip
    """Gather + forward. Returns ``stats`` [3, N] fp32 (lse(s), lse(x), dense gradient coefficient),
    ``sup`` [N, k] fp32 support logits, ``corr`` [N, k] fp32 sparse gradient corrections, ``ce``/``d`` [N]
    (0 on ignored rows) and the per-domain sums ``dce, dkd, dtok`` [num_domains] fp32."""
    import torch

    n, hdim = h_s.shape
    v = w_s.shape[0]
    k = ids.shape[1]
    dev = h_s.device
    f32 = dict(dtype=torch.float32, device=dev)
    stats = torch.empty(3, n, **f32)
    sup = torch.empty(n, k, **f32)
    corr = torch.empty(n, k, **f32)
    ce, d = torch.empty(n, **f32), torch.empty(n, **f32)
    dce, dkd, dtok = (torch.zeros(num_domains, **f32) for _ in range(3))
    if n == 0:
        return stats, sup, corr, ce, d, dce, dkd, dtok
    bj, bkh = _support_blocks(k, hdim)
    _topk_gather_kernel[(n,)](h_s, w_s, ids, sup, hdim, k, h_s.stride(0), h_s.stride(1), w_s.stride(0),
                              w_s.stride(1), BLOCK_J=bj, BLOCK_K=bkh)  # fmt: skip
    bn, bv, bk, warps = tile_blocks(n, hdim, False)
    has_labels = labels is not None
    has_dom = domain_ids is not None and num_domains > 0
    _topk_fwd_kernel[(triton.cdiv(n, bn),)](
        h_s, w_s, sup, a, c, labels if has_labels else ce, domain_ids if has_dom else ce,
        stats, corr, ce, d, dce, dkd, dtok,
        n, v, hdim, k,
        h_s.stride(0), h_s.stride(1), w_s.stride(0), w_s.stride(1),
        1.0 / temperature, tail_floor, ignore_index, num_domains,
        HAS_LABELS=has_labels, HAS_DOMAINS=has_dom, DIV=div, SAME_T=temperature == 1.0,
        DOT_PREC=dot_precision(h_s.dtype), UPCAST=upcast(h_s),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, BLOCK_J=bj, num_warps=warps,
    )  # fmt: skip
    return stats, sup, corr, ce, d, dce, dkd, dtok


def kd_topk_bwd(h_s, w_s, ids, labels, stats, corr, g_ce, g_d, temperature: float, ignore_index: int,
                need_h: bool, need_w: bool):  # fmt: skip
    """Dense + sparse gradient passes. ``g_ce``/``g_d`` [N] fp32: dL/dCE_i and dL/dD_i. Returns (grad_h
    fp32 [N, H] or None, grad_w fp32 [V, H] or None)."""
    import torch

    n, hdim = h_s.shape
    v = w_s.shape[0]
    k = ids.shape[1]
    dev = h_s.device
    gh = torch.zeros(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    if n == 0 or not (need_h or need_w):
        return gh, gw
    has_labels = labels is not None
    lab = labels if has_labels else g_ce
    gh_, gw_ = (gh if gh is not None else g_ce), (gw if gw is not None else g_ce)
    g_strides = ((gh.stride(0), gh.stride(1)) if gh is not None else (0, 0)) + (
        (gw.stride(0), gw.stride(1)) if gw is not None else (0, 0)
    )
    bn, bv, bk, warps = tile_blocks(n, hdim, False)
    _topk_bwd_dense_kernel[(triton.cdiv(n, bn), triton.cdiv(v, bv))](
        h_s, w_s, lab, stats, g_ce, g_d, gh_, gw_,
        n, v, hdim,
        h_s.stride(0), h_s.stride(1), w_s.stride(0), w_s.stride(1), *g_strides,
        1.0 / temperature, ignore_index,
        HAS_LABELS=has_labels, NEED_H=need_h, NEED_W=need_w,
        DOT_PREC=dot_precision(h_s.dtype), UPCAST=upcast(h_s),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    bj, bkh = _support_blocks(k, hdim)
    _topk_bwd_sparse_kernel[(n,)](
        h_s, w_s, ids, corr, lab, g_d, gh_, gw_,
        hdim, k,
        h_s.stride(0), h_s.stride(1), w_s.stride(0), w_s.stride(1), *g_strides,
        1.0 / temperature, ignore_index,
        HAS_LABELS=has_labels, NEED_H=need_h, NEED_W=need_w, BLOCK_J=bj, BLOCK_K=bkh,
    )  # fmt: skip
    return gh, gw
