"""The ``chunked`` work split (design (b)): cuBLAS for every matmul, one Triton kernel over each chunk of logits.

Math: the same loss and gradient as ``kd_forward.py`` / ``kd_backward.py``, computed per chunk of C token rows:
  forward   S = h_s[c] @ W_s^T, T = h_t[c] @ W_t[:V_s]^T  (cuBLAS, bf16/fp16 in, fp32 out: ``mm(out_dtype=fp32)``),
            then the tiled forward kernels over the given logits (``FROM_LOGITS``, split over the vocabulary so
            a chunk of a few hundred rows still fills the GPU): online softmaxes, CE, D, S, domain sums;
  backward  recompute S and T (cuBLAS), the gradient kernel writes dS = dL/dS over the chunk (in place into S
            for fp32 inputs, into one [C, V_s] buffer of the input dtype otherwise), then
            dH[c] = dS @ W_s (cuBLAS, fp32 out, every row written once: no atomics) and dW += dS^T @ h_s[c]
            (cuBLAS, accumulated in fp32).

Bytes per chunk (B = input bytes): the GEMMs read C (H_s + H_t) B + V_s (H_s + H_t) B and write 2 C V_s fp32;
the forward kernel reads 2 C V_s fp32 (x 2 for jsd / skew / tv); the backward kernel reads 2 C V_s fp32 and
writes C V_s B of dS, which dH / dW read again. Extra memory: C V_s (8 + B) bytes of logits and dS (C chosen so
this is <= CHUNK_LOGIT_BYTES) + O(N) stats; the weights are read once per chunk (N / C times in all), from HBM.

FLOPs (training step, frozen head): 2 N V_s (H_s + H_t) forward + the same again for the recompute + 2 N V_s
H_s for dH; the fused kernels in kd_forward.py / kd_backward.py do the same count, but here the matmuls run at
cuBLAS speed and the Triton kernel only streams logits. ``kd_fwd_bwd_chunked`` (gradient-in-forward) does the
forward and the gradient from the same logits: 2 N V_s (2 H_s + H_t), the floor, with no recompute.
"""

from __future__ import annotations

import functools
import os

import torch

from .kd_backward import kd_bwd_tiles
from .kd_forward import kd_fwd_tiles

CHUNK_LOGIT_BYTES = 768 << 20  # logits + dS of one chunk: C V_s (4 + 4 + B) bytes at most
CHUNK_ROW_MULTIPLE = 128  # chunk rows are a multiple of this (whole cuBLAS / Triton tiles)
CHUNK_ROWS_ENV = "DDK_FAST_KD_CHUNK_ROWS"  # override (tests use it to force several chunks)
DS_SPLIT_ENV = "DDK_FAST_KD_DS_SPLIT"  # "1": bf16 / fp16 dS as hi + lo (see kd_bwd_chunked)


def ds_split_enabled() -> bool:
    return os.environ.get(DS_SPLIT_ENV, "0") not in ("", "0")


def chunk_rows(n: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: ``$DDK_FAST_KD_CHUNK_ROWS`` if set, else the most whose logits and dS fit the budget."""
    env = os.environ.get(CHUNK_ROWS_ENV, "")
    if env:
        rows = int(env)
        if rows < 1:
            raise ValueError(f"{CHUNK_ROWS_ENV}: expected an int >= 1, got {env!r}")
        return min(n, rows)
    ds_bytes = (
        0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8 * (2 if ds_split_enabled() else 1)
    )
    per_row = max(vocab, 1) * (4 + 4 + ds_bytes)
    rows = CHUNK_LOGIT_BYTES // per_row // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return min(n, max(CHUNK_ROW_MULTIPLE, rows))


@functools.cache
def _mm_out_dtype_ok() -> bool:
    """Whether this torch has ``mm(..., out_dtype=)`` (bf16/fp16 operands, fp32 result) for CUDA."""
    return hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


def matmul_fp32(a, b, out=None, acc=None):
    """fp32 ``a @ b`` (into ``out``), or ``acc += a @ b``. bf16 / fp16 operands on CUDA go to cuBLAS with an
    fp32 result (fp32 accumulation, never rounded to 16 bits); elsewhere they are upcast (exact products)."""
    lowp = a.dtype != torch.float32
    if lowp and a.is_cuda and _mm_out_dtype_ok():
        if acc is not None:
            try:
                return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            except RuntimeError:  # a torch that refuses out aliasing self: one temporary of acc's size
                return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        if out is not None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32)
    if lowp:  # CPU, or a torch without mm(out_dtype=): exact products, fp32 accumulation, slower
        a, b = a.float(), b.float()
    if acc is not None:
        return acc.addmm_(a, b)
    if out is not None:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b)


def _chunk_logits(h_s, w_s, h_t, w_t, vocab, i, j):
    s = matmul_fp32(h_s[i:j], w_s.T)
    t = matmul_fp32(h_t[i:j], w_t[:vocab].T)
    return s, t


def _part(t, i, j):
    return None if t is None else t[i:j]


def kd_fwd_chunked(
    h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature, s_scale, s_cap, t_scale,
    t_cap, ignore_index, num_domains, outputs,
):  # fmt: skip
    """Forward of the chunked variant into ``outputs`` = (stats [4, N], ce, d, dce, dkd, dtok)."""
    stats, ce, d, dce, dkd, dtok = outputs
    n = h_s.shape[0]
    rows = chunk_rows(n, vocab, h_s.dtype)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        s, t = _chunk_logits(h_s, w_s, h_t, w_t, vocab, i, j)
        kd_fwd_tiles(
            s, None, t, None, _part(labels, i, j), _part(domain_ids, i, j), vocab, div, beta, lam, temperature,
            s_scale, s_cap, t_scale, t_cap, ignore_index, num_domains, True,
            (stats[:, i:j], ce[i:j], d[i:j], dce, dkd, dtok), splits=True,
        )  # fmt: skip
        del s, t


class _DsBuffers:
    """The [C, V_s] dS buffers of the backward (none for fp32: dS overwrites S in place)."""

    def __init__(self, h_s, rows: int, vocab: int):
        self.hi = self.lo = None
        if h_s.dtype != torch.float32:
            self.hi = torch.empty(rows, vocab, dtype=h_s.dtype, device=h_s.device)
            if ds_split_enabled():
                self.lo = torch.empty_like(self.hi)


def _chunk_grad(
    s, t, buffers, h_s, w_s, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale, s_cap,
    t_scale, t_cap, ignore_index, need_h, need_w, gh, gw, i, j,
):  # fmt: skip
    """dS of rows i:j from their logits (s is overwritten for fp32), then dH[i:j] = dS W_s, dW += dS^T h_s."""
    ds = s if buffers.hi is None else buffers.hi[: j - i]
    ds_lo = None if buffers.lo is None else buffers.lo[: j - i]
    kd_bwd_tiles(
        s, None, t, None, _part(labels, i, j), stats[:, i:j], g_ce[i:j], g_d[i:j], vocab, div, beta, lam,
        temperature, s_scale, s_cap, t_scale, t_cap, ignore_index, True, False, True, ds, None, ds_lo,
    )  # fmt: skip
    if need_h:
        matmul_fp32(ds, w_s, out=gh[i:j])
        if ds_lo is not None:
            matmul_fp32(ds_lo, w_s, acc=gh[i:j])
    if need_w:
        matmul_fp32(ds.T, h_s[i:j], acc=gw)
        if ds_lo is not None:
            matmul_fp32(ds_lo.T, h_s[i:j], acc=gw)


def kd_bwd_chunked(
    h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale, s_cap, t_scale,
    t_cap, ignore_index, need_h, need_w, gh, gw,
):  # fmt: skip
    """Backward of the chunked variant: ``gh`` [N, H_s] fp32 (every row written) and ``gw`` (zeroed) filled.

    bf16 / fp16 inputs: dS is rounded to the input dtype for the cuBLAS dH / dW (relative error 2^-9 per
    element for bf16, ~3x the error of rounding the gradient itself to bf16). ``$DDK_FAST_KD_DS_SPLIT=1`` keeps
    dS as hi + lo (two 16-bit tensors, dH = hi W + lo W): ~16 mantissa bits for one more [C, V] buffer and
    twice the dH / dW GEMM FLOPs."""
    n = h_s.shape[0]
    rows = chunk_rows(n, vocab, h_s.dtype)
    buffers = _DsBuffers(h_s, min(rows, n), vocab)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        s, t = _chunk_logits(h_s, w_s, h_t, w_t, vocab, i, j)
        _chunk_grad(
            s, t, buffers, h_s, w_s, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale,
            s_cap, t_scale, t_cap, ignore_index, need_h, need_w, gh, gw, i, j,
        )  # fmt: skip
        del s, t


def kd_fwd_bwd_chunked(
    h_s, w_s, h_t, w_t, labels, domain_ids, vocab: int, div: int, beta: float, lam: float, temperature: float,
    s_scale: float, s_cap: float, t_scale: float, t_cap: float, ignore_index: int, num_domains: int,
    ce_weight: float, kd_scale: float, need_h: bool, need_w: bool,
):  # fmt: skip
    """Gradient-in-forward (a prototype for the op layer; the benchmark measures it as
    ``ddk_fast_chunked_gif``): one pass over the chunks computes the forward *and* the gradients of
    ``loss = ce_weight * sum(ce) / count + kd_scale * sum(d) / count`` (count = counted rows, >= 1; the
    op's ``_assemble``) at grad_output 1, from the same logits: no recomputed GEMMs, 2 N V_s (2 H_s + H_t)
    FLOPs in all (the floor). Returns ``kd_fwd``'s six outputs + (grad_h fp32 [N, H_s] or None,
    grad_w fp32 [V_s, H_s] or None); a backward multiplies them by grad_output."""
    n = h_s.shape[0]
    dev = h_s.device
    stats = torch.empty(4, n, dtype=torch.float32, device=dev)
    ce = torch.empty(n, dtype=torch.float32, device=dev)
    d = torch.empty(n, dtype=torch.float32, device=dev)
    sums = [torch.zeros(num_domains, dtype=torch.float32, device=dev) for _ in range(3)]
    gh = torch.empty(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    if n == 0:
        return (stats, ce, d, *sums, gh, gw)
    valid = (labels != ignore_index) if labels is not None else torch.ones(n, dtype=torch.bool, device=dev)
    per_row = valid.float() / valid.sum().clamp(min=1).float()  # 1 / count on counted rows (no host sync)
    g_ce, g_d = per_row * ce_weight, per_row * kd_scale
    rows = chunk_rows(n, vocab, h_s.dtype)
    buffers = _DsBuffers(h_s, min(rows, n), vocab)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        s, t = _chunk_logits(h_s, w_s, h_t, w_t, vocab, i, j)
        kd_fwd_tiles(
            s, None, t, None, _part(labels, i, j), _part(domain_ids, i, j), vocab, div, beta, lam, temperature,
            s_scale, s_cap, t_scale, t_cap, ignore_index, num_domains, True,
            (stats[:, i:j], ce[i:j], d[i:j], *sums), splits=True,
        )  # fmt: skip
        if need_h or need_w:
            _chunk_grad(
                s, t, buffers, h_s, w_s, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale,
                s_cap, t_scale, t_cap, ignore_index, need_h, need_w, gh, gw, i, j,
            )  # fmt: skip
        del s, t
    return (stats, ce, d, *sums, gh, gw)
