"""Shared pieces of the fused ``lm_head`` + KD loss kernels (``kd_forward.py``, ``kd_backward.py``).

Math of the jit helpers (s = student logits, t = teacher logits, both fp32):
  ``_tile``       one [BLOCK_N, BLOCK_V] fp32 logit tile ``h[rows] @ W[cols]^T``, accumulated over H in
                  BLOCK_K chunks with ``tl.dot`` (FROM_LOGITS: a tile of the given [N, V] logits instead);
  ``_transform``  ``cap * tanh(scale * raw / cap)`` (Gemma-2 final-logit soft-capping, Cohere logit scale),
                  ``scale * raw`` without a cap;
  ``_tanh``       ``1 - 2 / (exp(2x) + 1)``, saturating to +-1 without overflow NaNs;
  ``_logaddexp``  ``m + log(exp(a - m) + exp(b - m))``, m = max(a, b) (log M of the JSD / skew mixtures).

Bytes: ``_tile`` reads BLOCK_N * K + BLOCK_V * K input elements per call (B bytes each; FROM_LOGITS:
BLOCK_N * BLOCK_V) and writes nothing: its result lives in registers. The other helpers are elementwise on
registers and touch no memory.

Launcher helpers: ``_blocks`` picks (BLOCK_N, BLOCK_V, BLOCK_K, num_warps), ``_dot_precision`` the ``tl.dot``
precision (tf32 only where torch allows it for fp32 matmuls), ``_upcast`` whether bf16/fp16 tiles are
upcast to fp32 before the dot (the interpreter's bf16 ``tl.dot`` is wrong).
(``ops/fused_linear_kd.py`` maps divergence names to the kernels' ``DIV`` constexpr.)
"""

from __future__ import annotations

import triton
import triton.language as tl


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
