"""Backward Triton kernel of the fused ``lm_head`` + KD loss (and of the KD loss from logits, ``FROM_LOGITS``).

Math (per token row i; s = student logits, x = s/T, q = softmax(x), p = softmax(t/T), M the jsd / skew
mixture, D the divergence; lse's and the row constant S come from the forward passes in ``kd_forward.py``):

  ``_kd_bwd_kernel`` (one program per (row block, vocabulary tile), grouped so GROUP_ROW_BLOCKS row blocks
  that share a weight tile run together): recompute the tile pair, form
      dL/ds = w_ce,i (softmax(s) - onehot(y_i)) + w_kd,i / T * dD/dx,
      dD/dx = q - p | q (log q - log p - D) | (1-beta) q (log q - log M - S) | q (g - S)  (g = dD/dq)
  times the softcap derivative, then ``dH[rows] += dS @ W[cols]`` and ``dW[cols] += dS^T @ H[rows]`` with fp32
  ``tl.atomic_add`` over H in BK chunks (FROM_LOGITS: store dS, the path kd_chunked.py takes before its
  cuBLAS dH / dW). The per-row weights w_ce,i = dL/dCE_i and w_kd,i = dL/dD_i arrive from autograd
  (grad_output and the 1/n mean included, no host sync).

Bytes (B = bytes per element of the inputs, NB = ceil(N / BN)):
  reads NB * V_s * (H_s + H_t) * B of weights + N (H_s + H_t) B * ceil(V_s / BV) of hidden states to recompute
  the tiles, 4 N + 2 N fp32 of stats and row weights, plus N*H_s*B and V_s*H_s*B per row block for the gradient
  matmuls, and atomically adds N*H_s*4 * ceil(V_s/BV) + V_s*H_s*4 * NB bytes (FROM_LOGITS: writes N V_s
  elements of dS instead). No [N, V] tensor exists in any dtype; extra memory is the fp32 gradients of H_s
  and W_s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_common import (
    GROUP_ROW_BLOCKS,
    _div_grad,
    _grouped_pid,
    _logit_tile_pair,
    dot_precision,
    strides,
    tile_configs,
    tuned_config,
    upcast,
)


@triton.jit
def _kd_bwd_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    labels_ptr,
    lse_s_ptr,
    lse_x_ptr,
    lse_y_ptr,
    row_const_ptr,
    grad_ce_ptr,
    grad_d_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_lo_ptr,
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
    stride_gh_n,
    stride_gh_k,
    stride_gw_v,
    stride_gw_k,
    inv_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    ignore_index,
    beta,
    lam,
    num_row_blocks,
    num_col_blocks,
    HAS_LABELS: tl.constexpr,
    DIV: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    SPLIT_DS: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_block, col_block = _grouped_pid(tl.program_id(0), num_row_blocks, num_col_blocks, GROUP)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    in_tile = row_mask[:, None] & col_mask[None, :]
    if HAS_LABELS:
        target = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
        valid = row_mask & (target != ignore_index)
    else:
        target = tl.full((BLOCK_N,), -1, tl.int64)
        valid = row_mask
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_x = tl.load(lse_x_ptr + rows, mask=row_mask, other=0.0)
    lse_y = tl.load(lse_y_ptr + rows, mask=row_mask, other=0.0)
    row_const = tl.load(row_const_ptr + rows, mask=row_mask, other=0.0)
    # per-row weights = dL/dCE_i and dL/dD_i (0 for ignored rows)
    w_ce = tl.where(valid, tl.load(grad_ce_ptr + rows, mask=row_mask, other=0.0), 0.0)
    w_kd = tl.where(valid, tl.load(grad_d_ptr + rows, mask=row_mask, other=0.0), 0.0) * inv_t

    s, t = _logit_tile_pair(
        student_hidden_ptr, student_weight_ptr, teacher_hidden_ptr, teacher_weight_ptr,
        stride_sh_n, stride_sh_k, stride_sw_v, stride_sw_k, stride_th_n, stride_th_k, stride_tw_v,
        stride_tw_k, rows, cols, row_mask, col_mask, H_S, H_T, s_scale, s_cap, t_scale, t_cap,
        S_CAP, T_CAP, FROM_LOGITS, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    gz = _div_grad(s * inv_t - lse_x[:, None], t * inv_t - lse_y[:, None], row_const, beta, lam, DIV)
    ds = w_kd[:, None] * gz
    if HAS_LABELS:
        ds += w_ce[:, None] * (
            tl.exp(s - lse_s[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        )
    if S_CAP:  # d cap tanh(scale raw / cap) / d raw = scale (1 - (s / cap)^2)
        th = s / s_cap
        ds = ds * (s_scale * (1.0 - th * th))
    else:
        ds = ds * s_scale
    ds = tl.where(in_tile, ds, 0.0)

    if FROM_LOGITS:
        out_offsets = rows[:, None] * stride_gh_n + cols[None, :] * stride_gh_k
        ds_hi = ds.to(grad_hidden_ptr.dtype.element_ty)
        tl.store(grad_hidden_ptr + out_offsets, ds_hi, mask=in_tile)
        if SPLIT_DS:  # dS = hi + lo in two 16-bit tensors: ~16 mantissa bits through the cuBLAS dH / dW
            ds_lo = (ds - ds_hi.to(tl.float32)).to(grad_hidden_ptr.dtype.element_ty)
            tl.store(grad_lo_ptr + out_offsets, ds_lo, mask=in_tile)
    else:
        ds_in = ds.to(student_hidden_ptr.dtype.element_ty)
        if UPCAST:
            ds_in = ds_in.to(tl.float32)
        for k0 in range(0, H_S, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H_S
            if NEED_H:
                w = tl.load(
                    student_weight_ptr + cols[:, None] * stride_sw_v + ks[None, :] * stride_sw_k,
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(ds_in, w, input_precision=DOT_PREC)
                tl.atomic_add(
                    grad_hidden_ptr + rows[:, None] * stride_gh_n + ks[None, :] * stride_gh_k,
                    dh,
                    mask=row_mask[:, None] & k_mask[None, :],
                )
            if NEED_W:
                h = tl.load(
                    student_hidden_ptr + rows[:, None] * stride_sh_n + ks[None, :] * stride_sh_k,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(ds_in), h, input_precision=DOT_PREC)
                tl.atomic_add(
                    grad_weight_ptr + cols[:, None] * stride_gw_v + ks[None, :] * stride_gw_k,
                    dw,
                    mask=col_mask[:, None] & k_mask[None, :],
                )


# ------------------------------------------------------------------------------------------------ launchers


def kd_bwd_tiles(
    h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale, s_cap, t_scale,
    t_cap, ignore_index, need_h, need_w, from_logits, gh, gw, ds_lo=None, config=None,
):  # fmt: skip
    """Launch ``_kd_bwd_kernel`` into ``gh`` / ``gw`` (fp32, zeroed; FROM_LOGITS: ``gh`` receives dS, rounded
    to its dtype, and ``ds_lo`` (optional, same shape and strides) the rounding remainder dS - hi).
    ``config``: (BLOCK_N, BLOCK_V, BLOCK_K, num_warps), else tuned (into scratch copies: ``gh`` may be the
    student logits themselves, overwritten in place)."""
    import torch

    n = h_s.shape[0]
    h_s_k = 0 if from_logits else h_s.shape[1]
    h_t_k = 0 if from_logits else h_t.shape[1]
    if config is None:
        args = (h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale,
                s_cap, t_scale, t_cap, ignore_index, need_h, need_w, from_logits)  # fmt: skip

        def scratch(t):
            return None if t is None else torch.zeros_like(t)

        key = ("bwd", triton.next_power_of_2(n), vocab, h_s_k, h_t_k, h_s.dtype, div, from_logits,
               labels is not None, need_h, need_w, ds_lo is not None)  # fmt: skip
        config = tuned_config(
            key,
            tile_configs(n, max(h_s_k, h_t_k), from_logits),
            lambda c: kd_bwd_tiles(*args, scratch(gh), scratch(gw), scratch(ds_lo), config=c),
            h_s.device,
        )
    bn, bv, bk, warps = config
    ws = h_s if from_logits else w_s
    wt = h_t if from_logits else w_t
    has_labels = labels is not None
    lab = labels if has_labels else g_ce  # dummy pointers, never read
    gh_ = gh if gh is not None else g_ce
    gw_ = gw if gw is not None else g_ce
    gh_strides = (gh.stride(0), gh.stride(1)) if gh is not None else (0, 0)
    gw_strides = (gw.stride(0), gw.stride(1)) if gw is not None else (0, 0)
    n_row_blocks, n_col_blocks = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    _kd_bwd_kernel[(n_row_blocks * n_col_blocks,)](
        h_s, ws, h_t, wt, lab, stats[0], stats[1], stats[2], stats[3], g_ce, g_d, gh_, gw_,
        ds_lo if ds_lo is not None else g_ce, n, vocab, h_s_k, h_t_k, *strides(h_s, ws, h_t, wt), *gh_strides, *gw_strides,
        1.0 / temperature, s_scale, s_cap, t_scale, t_cap, ignore_index, beta, lam, n_row_blocks, n_col_blocks,
        HAS_LABELS=has_labels, DIV=div, NEED_H=need_h, NEED_W=need_w, SPLIT_DS=ds_lo is not None, S_CAP=s_cap > 0, T_CAP=t_cap > 0,
        FROM_LOGITS=from_logits, DOT_PREC=dot_precision(h_s.dtype), UPCAST=upcast(h_s),
        GROUP=GROUP_ROW_BLOCKS, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
