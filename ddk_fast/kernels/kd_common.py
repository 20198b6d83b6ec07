"""Shared pieces of the fused ``lm_head`` + KD loss kernels (``kd_forward.py``, ``kd_backward.py``,
``kd_chunked.py``): the one tile-pair helper every kernel calls, the per-divergence element math and the
launch-parameter choice.

Math of the jit helpers (s = student logits, t = teacher logits, both fp32; x = s/T, y = t/T; lq, lp the
student / teacher log-probabilities at T once the row's log-sum-exps are known):
  ``_logit_tile``      one [BLOCK_N, BLOCK_V] fp32 tile ``hidden[rows] @ weight[cols]^T``, accumulated over
                       H in BLOCK_K chunks with ``tl.dot`` (FROM_LOGITS: a tile of the given [N, V] logits);
  ``_logit_tile_pair`` the student and teacher tiles of the same (rows, cols), transformed
                       (``cap * tanh(scale * raw / cap)``, or ``scale * raw``) and -inf outside the vocabulary;
  ``_online_update``   one tile of the online softmax of s (CE), x and y, plus the rescaled running sums of
                       forward / reverse KL and the target logit (pass 1, see kd_forward.py);
  ``_div_terms``       per element, D's summand and the summand of the row constant S = sum_j q_j dD/dq_j
                       (jsd, skew KLs, total variation: pass 2);
  ``_div_grad``        per element, dD/dx_j = q_j (g_j - S) for every divergence (the gradient pass);
  ``_logaddexp``       ``m + log(exp(a - m) + exp(b - m))``, m = max(a, b) (log M of the jsd / skew mixtures);
  ``_tanh``            ``1 - 2 / (exp(2x) + 1)``, saturating to +-1 without overflow NaNs.

Bytes: ``_logit_tile`` reads BLOCK_N * K + BLOCK_V * K input elements per call (B bytes each; FROM_LOGITS:
BLOCK_N * BLOCK_V fp32) and writes nothing: its result lives in registers. The other helpers are elementwise
on registers and touch no memory. Every row / column index is int64 before it meets a stride, so
``row * stride`` cannot wrap when N * V or V * H passes 2^31 (N >= 16,744 at V = 128,256).

The work-split variants and their switch are in ``variant.py``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Launch shapes on a GPU (first guesses, not yet tuned on one: see docs/kernels.md)
GPU_BLOCK_N = 64  # rows per program of the tiled (matmul-in-kernel) kernels
GPU_BLOCK_V = 128  # vocabulary columns per tile
GPU_BLOCK_K = 64  # hidden-size chunk of each tl.dot
GPU_WARPS = 8
LOGITS_BLOCK_N = 16  # rows per program of the kernels over materialised logits (memory-bound)
LOGITS_BLOCK_V = 1024
GROUP_ROW_BLOCKS = 8  # vsplit: row blocks that run together over one weight split (L2 reuse)
PROGRAMS_PER_SM = 4  # vsplit: aim for this many programs per SM when choosing the split count
# Interpreter: each tl op is a numpy call, so few large tiles
INTERP_BLOCK_N_MAX = 64
INTERP_BLOCK_V = 256
INTERP_LOGITS_BLOCK_V = 512
INTERP_BLOCK_K_MAX = 256
INTERP_PROGRAMS = 4  # vsplit under the interpreter: enough splits to exercise the merge


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow NaNs
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _transform(raw, scale, cap, HAS_CAP: tl.constexpr):
    x = raw * scale
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _logit_tile(
    hidden_ptr,
    weight_ptr,
    stride_h_n,
    stride_h_k,
    stride_w_v,
    stride_w_k,
    rows,
    cols,
    row_mask,
    col_mask,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] fp32 raw logits: hidden[rows] @ weight[cols]^T (FROM_LOGITS: hidden is the logits).
    ``rows`` / ``cols`` are int64."""
    if FROM_LOGITS:
        acc = tl.load(
            hidden_ptr + rows[:, None] * stride_h_n + cols[None, :] * stride_h_k,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(
                hidden_ptr + rows[:, None] * stride_h_n + ks[None, :] * stride_h_k,
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                weight_ptr + cols[:, None] * stride_w_v + ks[None, :] * stride_w_k,
                mask=col_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if UPCAST:  # interpreter: its bf16 tl.dot is wrong; bf16 x bf16 products are exact in fp32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _logit_tile_pair(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    stride_sh_n,
    stride_sh_k,
    stride_sw_v,
    stride_sw_k,
    stride_th_n,
    stride_th_k,
    stride_tw_v,
    stride_tw_k,
    rows,
    cols,
    row_mask,
    col_mask,
    H_S,
    H_T,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(student, teacher) [BLOCK_N, BLOCK_V] fp32 logits after the transforms; -inf outside the vocabulary."""
    s = _logit_tile(
        student_hidden_ptr, student_weight_ptr, stride_sh_n, stride_sh_k, stride_sw_v, stride_sw_k,
        rows, cols, row_mask, col_mask, H_S, BLOCK_N, BLOCK_V, BLOCK_K, FROM_LOGITS, DOT_PREC, UPCAST,
    )  # fmt: skip
    t = _logit_tile(
        teacher_hidden_ptr, teacher_weight_ptr, stride_th_n, stride_th_k, stride_tw_v, stride_tw_k,
        rows, cols, row_mask, col_mask, H_T, BLOCK_N, BLOCK_V, BLOCK_K, FROM_LOGITS, DOT_PREC, UPCAST,
    )  # fmt: skip
    s = tl.where(col_mask[None, :], _transform(s, s_scale, s_cap, S_CAP), float("-inf"))
    t = tl.where(col_mask[None, :], _transform(t, t_scale, t_cap, T_CAP), float("-inf"))
    return s, t


@triton.jit
def _online_update(
    s,
    t,
    cols,
    col_mask,
    target,
    inv_t,
    m_ce,
    l_ce,
    m_s,
    l_s,
    m_t,
    l_t,
    acc_kl,
    s_target,
    HAS_LABELS: tl.constexpr,
    SAME_T: tl.constexpr,
    DIV: tl.constexpr,
):
    """One vocabulary tile of pass 1. Running states per row: (m, l) of s (CE, only when T != 1), of x = s/T
    and of y = t/T, with m <- max(m, max_j), l <- l exp(m_old - m) + sum_j exp(. - m); ``acc_kl`` the rescaled
    sum_j exp(y_j - m_t)(y_j - x_j) (forward KL, DIV 0) or sum_j exp(x_j - m_s)(x_j - y_j) (reverse KL, DIV 1);
    ``s_target`` = s[row, label]. Returns the updated states in the same order."""
    x = s * inv_t
    y = t * inv_t
    if HAS_LABELS:
        s_target += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
        if not SAME_T:
            m_ce_new = tl.maximum(m_ce, tl.max(s, axis=1))
            l_ce = l_ce * tl.exp(m_ce - m_ce_new) + tl.sum(tl.exp(s - m_ce_new[:, None]), axis=1)
            m_ce = m_ce_new
    m_s_new = tl.maximum(m_s, tl.max(x, axis=1))
    alpha_s = tl.exp(m_s - m_s_new)
    e_s = tl.exp(x - m_s_new[:, None])
    l_s = l_s * alpha_s + tl.sum(e_s, axis=1)
    m_t_new = tl.maximum(m_t, tl.max(y, axis=1))
    alpha_t = tl.exp(m_t - m_t_new)
    e_t = tl.exp(y - m_t_new[:, None])
    l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
    if DIV == 0:
        acc_kl = acc_kl * alpha_t + tl.sum(tl.where(col_mask[None, :], e_t * (y - x), 0.0), axis=1)
    if DIV == 1:
        acc_kl = acc_kl * alpha_s + tl.sum(tl.where(col_mask[None, :], e_s * (x - y), 0.0), axis=1)
    return m_ce, l_ce, m_s_new, l_s, m_t_new, l_t, acc_kl, s_target


@triton.jit
def _div_terms(lq, lp, beta, lam, DIV: tl.constexpr):
    """Pass 2 (DIV >= 2), per element: (D's summand, S's summand), S = sum_j q_j dD/dq_j (up to constants
    that cancel in the gradient)."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 2:  # jsd: D = beta KL(p||M) + (1-beta) KL(q||M), S = KL(q||M)
        lm = _logaddexp(lp + tl.log(beta), lq + tl.log(1.0 - beta))
        kq = q * (lq - lm)
        dd = beta * p * (lp - lm) + (1.0 - beta) * kq
        aux = kq
    elif DIV == 3:  # skew forward: D = KL(p || lam p + (1-lam) q), S = sum q p/m
        lm = _logaddexp(lp + tl.log(lam), lq + tl.log(1.0 - lam))
        dd = p * (lp - lm)
        aux = q * tl.exp(lp - lm)
    elif DIV == 4:  # skew reverse: D = KL(q || lam q + (1-lam) p), g = log(q/m) - lam q/m
        lm = _logaddexp(lq + tl.log(lam), lp + tl.log(1.0 - lam))
        lqm = lq - lm
        dd = q * lqm
        aux = q * (lqm - lam * tl.exp(lqm))
    else:  # total variation, g = sign(q - p) / 2
        diff = q - p
        dd = 0.5 * tl.abs(diff)
        aux = q * 0.5 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return dd, aux


@triton.jit
def _div_grad(lq, lp, row_const, beta, lam, DIV: tl.constexpr):
    """dD/dx_j per element (x = s/T): q - p | q (log q - log p - D) | (1-beta) q (log q - log M - S) |
    q (g - S); ``row_const`` [BLOCK_N] is the forward's S (D for reverse KL)."""
    q = tl.exp(lq)
    if DIV == 0:
        gz = q - tl.exp(lp)
    elif DIV == 1:
        gz = q * (lq - lp - row_const[:, None])
    elif DIV == 2:
        lm = _logaddexp(lp + tl.log(beta), lq + tl.log(1.0 - beta))
        gz = (1.0 - beta) * q * (lq - lm - row_const[:, None])
    elif DIV == 3:
        lm = _logaddexp(lp + tl.log(lam), lq + tl.log(1.0 - lam))
        gz = -(1.0 - lam) * q * (tl.exp(lp - lm) - row_const[:, None])
    elif DIV == 4:
        lm = _logaddexp(lq + tl.log(lam), lp + tl.log(1.0 - lam))
        lqm = lq - lm
        gz = q * (lqm - lam * tl.exp(lqm) - row_const[:, None])
    else:
        diff = q - tl.exp(lp)
        g = 0.5 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        gz = q * (g - row_const[:, None])
    return gz


@triton.jit
def _grouped_pid(pid, num_row_blocks, num_col_blocks, GROUP: tl.constexpr):
    """(row block, column block) of a linear program id, GROUP row blocks per column block in launch order
    (the Triton matmul tutorial's swizzle): programs launched together share one weight split in L2."""
    per_group = GROUP * num_col_blocks
    group = pid // per_group
    first_row_block = group * GROUP
    group_size = tl.minimum(num_row_blocks - first_row_block, GROUP)
    local = pid % per_group
    return first_row_block + local % group_size, local // group_size


# ------------------------------------------------------------------------------------------------ launchers


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Launch configurations (BLOCK_N, BLOCK_V, BLOCK_K, num_warps) the GPU tuner tries, the first the default
GPU_TILE_CONFIGS = ((GPU_BLOCK_N, GPU_BLOCK_V, GPU_BLOCK_K, GPU_WARPS), (128, 128, 64, 8), (64, 256, 64, 8))
GPU_LOGITS_CONFIGS = ((LOGITS_BLOCK_N, LOGITS_BLOCK_V, 16, GPU_WARPS), (8, 2048, 16, 8), (4, 4096, 16, 8))
AUTOTUNE_ENV = "DDK_FAST_KD_AUTOTUNE"  # unset: on for CUDA tensors; "0" off; "1" on (also interpreted)
AUTOTUNE_REPS = 3
_TUNED: dict = {}  # (kernel, shape bucket, flags) -> the fastest configuration, per process


def tile_configs(n: int, k: int, from_logits: bool):
    """The candidate (BLOCK_N, BLOCK_V, BLOCK_K, num_warps) of the tiled kernels, the default first."""
    if interpreted():  # few, large tiles (each op is a numpy call); two so the tuner's logic is testable
        bn = max(16, min(INTERP_BLOCK_N_MAX, triton.next_power_of_2(n)))
        bk = max(16, min(INTERP_BLOCK_K_MAX, triton.next_power_of_2(max(k, 1))))
        bv = INTERP_LOGITS_BLOCK_V if from_logits else INTERP_BLOCK_V
        return ((bn, bv, bk, 1), (bn, bv // 2, bk, 1))
    return GPU_LOGITS_CONFIGS if from_logits else GPU_TILE_CONFIGS


def tile_blocks(n: int, k: int, from_logits: bool):
    """The default (BLOCK_N, BLOCK_V, BLOCK_K, num_warps) of the tiled kernels."""
    return tile_configs(n, k, from_logits)[0]


def autotune_enabled(device) -> bool:
    env = os.environ.get(AUTOTUNE_ENV, "")
    if env:
        return env != "0"
    return device.type == "cuda" and not interpreted()


def _launch_ms(run, config, device) -> float:
    import time

    import torch

    run(config)  # compile and warm
    if interpreted():  # tuning is only exercised there (tests): one timed call is enough
        t0 = time.perf_counter()
        run(config)
        return (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(AUTOTUNE_REPS):
            run(config)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    for _ in range(AUTOTUNE_REPS):
        run(config)
    return (time.perf_counter() - t0) * 1e3


def tuned_config(key, candidates, run, device):
    """The fastest of ``candidates`` for ``key``, timed once per process (``run(config)`` launches into scratch
    outputs only) and cached; the first candidate when tuning is off. ``key`` buckets N to a power of 2, so a
    training run tunes once per distinct (kernel, V, H, flags)."""
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or not autotune_enabled(device):
        return candidates[0]
    best = min(candidates, key=lambda c: _launch_ms(run, c, device))
    _TUNED[key] = best
    return best


def upcast(t) -> bool:
    import torch

    return interpreted() and t.dtype != torch.float32


def dot_precision(dtype) -> str:
    import torch

    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted():
        return "tf32"
    return "ieee"


def num_programs_target(device) -> int:
    """How many programs fill the device (vsplit's split count aims at this)."""
    import torch

    if interpreted() or device.type != "cuda":
        return INTERP_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def strides(*tensors):
    out = []
    for t in tensors:
        out += [t.stride(0), t.stride(1)]
    return tuple(out)
