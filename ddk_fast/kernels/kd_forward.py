"""Forward Triton kernels of the fused ``lm_head`` + KD loss (and of the KD loss from logits, ``FROM_LOGITS``).

Math (per token row i; s = student logits, t = teacher logits restricted to the first V_s columns, T = temperature,
x = s/T, y = t/T, q = softmax(x), p = softmax(y)):

  pass 1 ``_kd_fwd_kernel`` (one program per (row block, vocabulary split); each vocabulary tile a [BN, BV]
  fp32 matmul accumulator ``h[rows] @ W[cols]^T`` over H in BK chunks, never stored). Online softmax for three
  streams:
      m <- max(m, max_j x_j),  l <- l * exp(m_old - m) + sum_j exp(x_j - m)       (lse = m + log l)
  for s (CE, T = 1), x (student at T) and y (teacher at T), and the rescaled running sums
      A_t = sum_j exp(y_j - m_t) (y_j - x_j)  -> forward KL = A_t / l_t - lse_y + lse_x
      A_s = sum_j exp(x_j - m_s) (x_j - y_j)  -> reverse KL = A_s / l_s - lse_x + lse_y
  plus the target logit s[y_i]: CE = lse_s - s[y_i]. With one split (``rowblock``) the program finishes its
  rows; with several (``vsplit``) it stores its 8 partial states and ``_kd_fwd_merge_kernel`` combines them
  (max of the m's, l's and A's rescaled to the common max, target logits summed) and finishes the rows.
  pass 2 ``_kd_div_kernel`` (only jsd / skew / total variation, whose log M needs normalised p and q): with the
  lse's known, accumulate D and the row constant S of the gradient (jsd: S = KL(q || M)); splits are summed by
  ``_kd_div_merge_kernel``. The gradient pass is in ``kd_backward.py``; ``kd_chunked.py`` drives these kernels
  over cuBLAS-computed logits (``FROM_LOGITS``).

Bytes (B = bytes per element of the inputs, NB = ceil(N / BN), P = splits):
  pass 1 reads NB * V_s * (H_s + H_t) * B of weights (from HBM once per group of GROUP_ROW_BLOCKS row blocks
  when they share the split in L2) + N (H_s + H_t) B * P of hidden states, writes 8 P N fp32 partials (vsplit)
  and 6 N fp32 (4 stats rows, ce, d), and atomically adds 3 fp32 per counted row into the per-domain sums;
  pass 2 reads the same again (jsd / skew / tv only) and writes 2 P N + 2 N fp32. No [N, V] tensor exists in
  any dtype; extra memory is O(P N).

Design choice: recompute-in-backward. A fused kernel cannot hold a row block's logits across the vocabulary
loop (128k x 64 rows fp32 = 32 MiB), so the gradient pass recomputes the logit tiles whether it runs inside the
forward (gradient-in-forward, as Liger) or in the backward. Recomputing in backward lets an eval/no-grad
forward skip the gradient pass, needs no ``requires_grad`` knowledge at forward time (plays with torch.compile /
custom_op), and keeps no [N, H_s] fp32 gradient alive between forward and backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_common import (
    GROUP_ROW_BLOCKS,
    _div_terms,
    _grouped_pid,
    _logit_tile_pair,
    _online_update,
    dot_precision,
    num_programs_target,
    strides,
    tile_configs,
    tuned_config,
    upcast,
)

PASS1_PARTIALS = 8  # m_ce, l_ce, m_s, l_s, m_t, l_t, acc_kl, s_target
PASS2_PARTIALS = 2  # acc_d, acc_aux


@triton.jit
def _finish_rows(
    rows,
    row_mask,
    valid,
    domain,
    domain_mask,
    m_ce,
    l_ce,
    m_s,
    l_s,
    m_t,
    l_t,
    acc_kl,
    s_target,
    lse_s_ptr,
    lse_x_ptr,
    lse_y_ptr,
    row_const_ptr,
    ce_ptr,
    d_ptr,
    domain_ce_ptr,
    domain_kd_ptr,
    domain_tokens_ptr,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    SAME_T: tl.constexpr,
    DIV: tl.constexpr,
):
    """lse's, CE and (forward / reverse KL) D of finished rows; stats, per-row outputs and domain sums."""
    lse_x = m_s + tl.log(l_s)
    lse_y = m_t + tl.log(l_t)
    if SAME_T:
        lse_s = lse_x
    else:
        lse_s = m_ce + tl.log(l_ce)
    if HAS_LABELS:
        ce = tl.where(valid, lse_s - s_target, 0.0)
    else:
        ce = tl.zeros_like(lse_x)
    tl.store(lse_s_ptr + rows, lse_s, mask=row_mask)
    tl.store(lse_x_ptr + rows, lse_x, mask=row_mask)
    tl.store(lse_y_ptr + rows, lse_y, mask=row_mask)
    tl.store(ce_ptr + rows, ce, mask=row_mask)
    if HAS_DOMAINS:
        tl.atomic_add(domain_ce_ptr + domain, ce, mask=domain_mask)
        tl.atomic_add(domain_tokens_ptr + domain, tl.where(domain_mask, 1.0, 0.0), mask=domain_mask)
    if DIV <= 1:
        if DIV == 0:
            d = acc_kl / l_t - lse_y + lse_x
        else:
            d = acc_kl / l_s - lse_x + lse_y
        d = tl.where(valid, d, 0.0)
        tl.store(d_ptr + rows, d, mask=row_mask)
        tl.store(row_const_ptr + rows, d, mask=row_mask)  # S = D for reverse KL (unused for forward KL)
        if HAS_DOMAINS:
            tl.atomic_add(domain_kd_ptr + domain, d, mask=domain_mask)


@triton.jit
def _row_setup(
    rows, N, labels_ptr, domain_ids_ptr, ignore_index, num_domains, HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
):  # fmt: skip
    """(row mask, target labels, counted rows, domain ids, domain mask) of a row block."""
    row_mask = rows < N
    if HAS_LABELS:
        target = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
        valid = row_mask & (target != ignore_index)
    else:
        target = tl.full(rows.shape, -1, tl.int64)
        valid = row_mask
    if HAS_DOMAINS:
        domain = tl.load(domain_ids_ptr + rows, mask=row_mask, other=0)
        domain_mask = valid & (domain >= 0) & (domain < num_domains)
    else:
        domain = tl.zeros(rows.shape, tl.int64)
        domain_mask = row_mask & (rows < 0)
    return row_mask, target, valid, domain, domain_mask


@triton.jit
def _kd_fwd_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    labels_ptr,
    domain_ids_ptr,
    lse_s_ptr,
    lse_x_ptr,
    lse_y_ptr,
    row_const_ptr,
    ce_ptr,
    d_ptr,
    domain_ce_ptr,
    domain_kd_ptr,
    domain_tokens_ptr,
    partial_ptr,
    N,
    V,
    H_S,
    H_T,
    stride_sh_n,
    stride_sh_k,
    stride_sw_v,
    stride_sw_k,
    stride_th_n,
    stride_th_k,
    stride_tw_v,
    stride_tw_k,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    num_domains,
    num_row_blocks,
    num_splits,
    split_cols,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    DIV: tl.constexpr,
    SAME_T: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_block, split = _grouped_pid(tl.program_id(0), num_row_blocks, num_splits, GROUP)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, target, valid, domain, domain_mask = _row_setup(
        rows, N, labels_ptr, domain_ids_ptr, ignore_index, num_domains, HAS_LABELS, HAS_DOMAINS
    )
    m_ce = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_ce = tl.zeros((BLOCK_N,), tl.float32)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    acc_kl = tl.zeros((BLOCK_N,), tl.float32)
    s_target = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split.to(tl.int64) * split_cols
    v_end = tl.minimum(v_start + split_cols, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        s, t = _logit_tile_pair(
            student_hidden_ptr, student_weight_ptr, teacher_hidden_ptr, teacher_weight_ptr,
            stride_sh_n, stride_sh_k, stride_sw_v, stride_sw_k, stride_th_n, stride_th_k, stride_tw_v,
            stride_tw_k, rows, cols, row_mask, col_mask, H_S, H_T, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, FROM_LOGITS, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        m_ce, l_ce, m_s, l_s, m_t, l_t, acc_kl, s_target = _online_update(
            s, t, cols, col_mask, target, inv_t, m_ce, l_ce, m_s, l_s, m_t, l_t, acc_kl, s_target,
            HAS_LABELS, SAME_T, DIV,
        )  # fmt: skip
    if WRITE_PARTIAL:  # [PASS1_PARTIALS, num_splits, N] fp32, merged by _kd_fwd_merge_kernel
        plane = num_splits.to(tl.int64) * N
        base = partial_ptr + split.to(tl.int64) * N + rows
        tl.store(base, m_ce, mask=row_mask)
        tl.store(base + plane, l_ce, mask=row_mask)
        tl.store(base + 2 * plane, m_s, mask=row_mask)
        tl.store(base + 3 * plane, l_s, mask=row_mask)
        tl.store(base + 4 * plane, m_t, mask=row_mask)
        tl.store(base + 5 * plane, l_t, mask=row_mask)
        tl.store(base + 6 * plane, acc_kl, mask=row_mask)
        tl.store(base + 7 * plane, s_target, mask=row_mask)
    else:
        _finish_rows(
            rows, row_mask, valid, domain, domain_mask, m_ce, l_ce, m_s, l_s, m_t, l_t, acc_kl, s_target,
            lse_s_ptr, lse_x_ptr, lse_y_ptr, row_const_ptr, ce_ptr, d_ptr, domain_ce_ptr, domain_kd_ptr,
            domain_tokens_ptr, HAS_LABELS, HAS_DOMAINS, SAME_T, DIV,
        )  # fmt: skip


@triton.jit
def _merge_stream(m, l, m_i, l_i):
    """Combine two online-softmax states (m, l) of disjoint column sets; returns (m, l, scale of l, of l_i)."""
    m_new = tl.maximum(m, m_i)
    a = tl.exp(m - m_new)
    b = tl.exp(m_i - m_new)
    return m_new, l * a + l_i * b, a, b


@triton.jit
def _kd_fwd_merge_kernel(
    partial_ptr,
    labels_ptr,
    domain_ids_ptr,
    lse_s_ptr,
    lse_x_ptr,
    lse_y_ptr,
    row_const_ptr,
    ce_ptr,
    d_ptr,
    domain_ce_ptr,
    domain_kd_ptr,
    domain_tokens_ptr,
    N,
    ignore_index,
    num_domains,
    num_splits,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    DIV: tl.constexpr,
    SAME_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, target, valid, domain, domain_mask = _row_setup(
        rows, N, labels_ptr, domain_ids_ptr, ignore_index, num_domains, HAS_LABELS, HAS_DOMAINS
    )
    m_ce = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_ce = tl.zeros((BLOCK_N,), tl.float32)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_N,), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_N,), tl.float32)
    acc_kl = tl.zeros((BLOCK_N,), tl.float32)
    s_target = tl.zeros((BLOCK_N,), tl.float32)
    plane = num_splits.to(tl.int64) * N
    for split in range(0, num_splits):
        base = partial_ptr + split * N + rows
        # masked rows load finite values so no inf - inf appears anywhere
        if HAS_LABELS and not SAME_T:
            m_ce, l_ce, _a, _b = _merge_stream(
                m_ce, l_ce, tl.load(base, mask=row_mask, other=0.0),
                tl.load(base + plane, mask=row_mask, other=1.0),
            )  # fmt: skip
        m_s, l_s, a_s, b_s = _merge_stream(
            m_s, l_s, tl.load(base + 2 * plane, mask=row_mask, other=0.0),
            tl.load(base + 3 * plane, mask=row_mask, other=1.0),
        )  # fmt: skip
        m_t, l_t, a_t, b_t = _merge_stream(
            m_t, l_t, tl.load(base + 4 * plane, mask=row_mask, other=0.0),
            tl.load(base + 5 * plane, mask=row_mask, other=1.0),
        )  # fmt: skip
        kl_i = tl.load(base + 6 * plane, mask=row_mask, other=0.0)
        if DIV == 0:
            acc_kl = acc_kl * a_t + kl_i * b_t
        if DIV == 1:
            acc_kl = acc_kl * a_s + kl_i * b_s
        s_target += tl.load(base + 7 * plane, mask=row_mask, other=0.0)
    _finish_rows(
        rows, row_mask, valid, domain, domain_mask, m_ce, l_ce, m_s, l_s, m_t, l_t, acc_kl, s_target,
        lse_s_ptr, lse_x_ptr, lse_y_ptr, row_const_ptr, ce_ptr, d_ptr, domain_ce_ptr, domain_kd_ptr,
        domain_tokens_ptr, HAS_LABELS, HAS_DOMAINS, SAME_T, DIV,
    )  # fmt: skip


@triton.jit
def _finish_div_rows(
    rows, row_mask, valid, domain, domain_mask, acc_d, acc_aux, row_const_ptr, d_ptr, domain_kd_ptr,
    HAS_DOMAINS: tl.constexpr,
):  # fmt: skip
    d = tl.where(valid, acc_d, 0.0)
    tl.store(d_ptr + rows, d, mask=row_mask)
    tl.store(row_const_ptr + rows, acc_aux, mask=row_mask)
    if HAS_DOMAINS:
        tl.atomic_add(domain_kd_ptr + domain, d, mask=domain_mask)


@triton.jit
def _kd_div_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    labels_ptr,
    domain_ids_ptr,
    lse_x_ptr,
    lse_y_ptr,
    row_const_ptr,
    d_ptr,
    domain_kd_ptr,
    partial_ptr,
    N,
    V,
    H_S,
    H_T,
    stride_sh_n,
    stride_sh_k,
    stride_sw_v,
    stride_sw_k,
    stride_th_n,
    stride_th_k,
    stride_tw_v,
    stride_tw_k,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    num_domains,
    beta,
    lam,
    num_row_blocks,
    num_splits,
    split_cols,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    DIV: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_block, split = _grouped_pid(tl.program_id(0), num_row_blocks, num_splits, GROUP)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, target, valid, domain, domain_mask = _row_setup(
        rows, N, labels_ptr, domain_ids_ptr, ignore_index, num_domains, HAS_LABELS, HAS_DOMAINS
    )
    lse_x = tl.load(lse_x_ptr + rows, mask=row_mask, other=0.0)
    lse_y = tl.load(lse_y_ptr + rows, mask=row_mask, other=0.0)
    acc_d = tl.zeros((BLOCK_N,), tl.float32)
    acc_aux = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split.to(tl.int64) * split_cols
    v_end = tl.minimum(v_start + split_cols, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        s, t = _logit_tile_pair(
            student_hidden_ptr, student_weight_ptr, teacher_hidden_ptr, teacher_weight_ptr,
            stride_sh_n, stride_sh_k, stride_sw_v, stride_sw_k, stride_th_n, stride_th_k, stride_tw_v,
            stride_tw_k, rows, cols, row_mask, col_mask, H_S, H_T, s_scale, s_cap, t_scale, t_cap,
            S_CAP, T_CAP, FROM_LOGITS, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        dd, aux = _div_terms(s * inv_t - lse_x[:, None], t * inv_t - lse_y[:, None], beta, lam, DIV)
        in_tile = row_mask[:, None] & col_mask[None, :]
        acc_d += tl.sum(tl.where(in_tile, dd, 0.0), axis=1)
        acc_aux += tl.sum(tl.where(in_tile, aux, 0.0), axis=1)
    if WRITE_PARTIAL:  # [PASS2_PARTIALS, num_splits, N] fp32, summed by _kd_div_merge_kernel
        base = partial_ptr + split.to(tl.int64) * N + rows
        tl.store(base, acc_d, mask=row_mask)
        tl.store(base + num_splits.to(tl.int64) * N, acc_aux, mask=row_mask)
    else:
        _finish_div_rows(
            rows, row_mask, valid, domain, domain_mask, acc_d, acc_aux, row_const_ptr, d_ptr, domain_kd_ptr,
            HAS_DOMAINS,
        )  # fmt: skip


@triton.jit
def _kd_div_merge_kernel(
    partial_ptr,
    labels_ptr,
    domain_ids_ptr,
    row_const_ptr,
    d_ptr,
    domain_kd_ptr,
    N,
    ignore_index,
    num_domains,
    num_splits,
    HAS_LABELS: tl.constexpr,
    HAS_DOMAINS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, target, valid, domain, domain_mask = _row_setup(
        rows, N, labels_ptr, domain_ids_ptr, ignore_index, num_domains, HAS_LABELS, HAS_DOMAINS
    )
    acc_d = tl.zeros((BLOCK_N,), tl.float32)
    acc_aux = tl.zeros((BLOCK_N,), tl.float32)
    plane = num_splits.to(tl.int64) * N
    for split in range(0, num_splits):
        base = partial_ptr + split * N + rows
        acc_d += tl.load(base, mask=row_mask, other=0.0)
        acc_aux += tl.load(base + plane, mask=row_mask, other=0.0)
    _finish_div_rows(
        rows, row_mask, valid, domain, domain_mask, acc_d, acc_aux, row_const_ptr, d_ptr, domain_kd_ptr,
        HAS_DOMAINS,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ launchers

MERGE_BLOCK_N = 128  # rows per program of the merge kernels (elementwise over rows)


def split_plan(n_row_blocks: int, vocab: int, block_v: int, device, splits: bool):
    """(num_splits, columns per split): enough splits that row blocks x splits fills the device."""
    tiles = triton.cdiv(vocab, block_v)
    if not splits:
        return 1, tiles * block_v
    want = max(1, min(tiles, triton.cdiv(num_programs_target(device), n_row_blocks)))
    per_split = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per_split), per_split * block_v


def kd_fwd_tiles(
    h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature, s_scale, s_cap, t_scale,
    t_cap, ignore_index, num_domains, from_logits, outputs, splits: bool, config=None,
):  # fmt: skip
    """Passes 1 (+2) of the tiled kernels into ``outputs`` = (stats [4, N], ce, d, dce, dkd, dtok);
    ``splits``: the vsplit work split (else one program per row block). Also used by kd_chunked.py over a
    chunk of logits (``from_logits``). ``config``: (BLOCK_N, BLOCK_V, BLOCK_K, num_warps), else tuned."""
    import torch

    stats, ce, d, dce, dkd, dtok = outputs
    n = h_s.shape[0]
    h_s_k = 0 if from_logits else h_s.shape[1]
    h_t_k = 0 if from_logits else h_t.shape[1]
    if config is None:
        args = (h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature, s_scale, s_cap,
                t_scale, t_cap, ignore_index, num_domains, from_logits)  # fmt: skip
        key = ("fwd", triton.next_power_of_2(n), vocab, h_s_k, h_t_k, h_s.dtype, div, from_logits, splits,
               labels is not None, domain_ids is not None, temperature == 1.0)  # fmt: skip
        config = tuned_config(
            key,
            tile_configs(n, max(h_s_k, h_t_k), from_logits),
            lambda c: kd_fwd_tiles(*args, [torch.zeros_like(o) for o in outputs], splits, config=c),
            h_s.device,
        )
    bn, bv, bk, warps = config
    ws = h_s if from_logits else w_s
    wt = h_t if from_logits else w_t
    has_labels = labels is not None
    has_dom = domain_ids is not None and num_domains > 0
    lab = labels if has_labels else ce  # dummy pointer, never read
    dom = domain_ids if has_dom else ce
    n_row_blocks = triton.cdiv(n, bn)
    n_splits, split_cols = split_plan(n_row_blocks, vocab, bv, h_s.device, splits)
    partial = ce
    if n_splits > 1:
        partial = torch.empty(PASS1_PARTIALS * n_splits * n, dtype=torch.float32, device=h_s.device)
    common = dict(
        HAS_LABELS=has_labels, HAS_DOMAINS=has_dom, DIV=div, S_CAP=s_cap > 0, T_CAP=t_cap > 0,
        FROM_LOGITS=from_logits, WRITE_PARTIAL=n_splits > 1, DOT_PREC=dot_precision(h_s.dtype),
        UPCAST=upcast(h_s), GROUP=GROUP_ROW_BLOCKS, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    tensor_strides = strides(h_s, ws, h_t, wt)
    transforms = (1.0 / temperature, s_scale, s_cap, t_scale, t_cap, ignore_index, num_domains)
    grid = (n_row_blocks * n_splits,)
    merge_grid = (triton.cdiv(n, MERGE_BLOCK_N),)
    _kd_fwd_kernel[grid](
        h_s, ws, h_t, wt, lab, dom, stats[0], stats[1], stats[2], stats[3], ce, d, dce, dkd, dtok, partial,
        n, vocab, h_s_k, h_t_k, *tensor_strides, *transforms, n_row_blocks, n_splits, split_cols,
        SAME_T=temperature == 1.0, **common,
    )  # fmt: skip
    if n_splits > 1:
        _kd_fwd_merge_kernel[merge_grid](
            partial, lab, dom, stats[0], stats[1], stats[2], stats[3], ce, d, dce, dkd, dtok, n,
            ignore_index, num_domains, n_splits, HAS_LABELS=has_labels, HAS_DOMAINS=has_dom, DIV=div,
            SAME_T=temperature == 1.0, BLOCK_N=MERGE_BLOCK_N,
        )  # fmt: skip
    if div >= 2:
        _kd_div_kernel[grid](
            h_s, ws, h_t, wt, lab, dom, stats[1], stats[2], stats[3], d, dkd, partial, n, vocab, h_s_k,
            h_t_k, *tensor_strides, *transforms, beta, lam, n_row_blocks, n_splits, split_cols, **common,
        )  # fmt: skip
        if n_splits > 1:
            _kd_div_merge_kernel[merge_grid](
                partial, lab, dom, stats[3], d, dkd, n, ignore_index, num_domains, n_splits,
                HAS_LABELS=has_labels, HAS_DOMAINS=has_dom, BLOCK_N=MERGE_BLOCK_N,
            )  # fmt: skip
