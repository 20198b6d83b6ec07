"""The work-split switch of the dense KD kernels and the two launchers every caller uses.

Three variants compute the same loss and gradient (the math is in ``kd_forward.py`` / ``kd_backward.py``):
  ``rowblock``  the first design: 1-D forward grid of row blocks, each streaming both heads;
  ``vsplit``    design (a): 2-D forward grid (row block x vocabulary split), per-split partial states merged;
  ``chunked``   design (b): row chunks whose logit GEMMs are cuBLAS and one Triton kernel streams the chunk's
                logits (``kd_chunked.py``).
``kernel_variant`` picks one (argument, else ``$DDK_FAST_KD_VARIANT``, else ``chunked``); :func:`kd_fwd` and
:func:`kd_bwd` allocate the outputs and dispatch to the tiled kernels or to the chunked path. Keeping the
switch here means the forward, backward and chunked modules never import each other in a circle.
"""

from __future__ import annotations

import os

import torch

from .kd_backward import kd_bwd_tiles
from .kd_chunked import kd_bwd_chunked, kd_fwd_chunked
from .kd_forward import kd_fwd_tiles

VARIANTS = ("chunked", "vsplit", "rowblock")
VARIANT_ENV = "DDK_FAST_KD_VARIANT"
DEFAULT_VARIANT = "chunked"


def kernel_variant(variant: str | None = None) -> str:
    """The work-split variant: ``variant`` if given, else ``$DDK_FAST_KD_VARIANT``, else the default."""
    name = variant or os.environ.get(VARIANT_ENV, "") or DEFAULT_VARIANT
    if name not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV} / variant: expected one of {VARIANTS}, got {name!r}")
    return name


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
    *,
    variant: str | None = None,
):
    """Passes 1 (+2). Returns ``stats`` [4, N] fp32 (lse_s, lse_x, lse_y, S), ``ce`` [N], ``d`` [N] (0 on
    ignored rows) and the per-domain sums ``dce, dkd, dtok`` [num_domains] fp32.

    ``from_logits``: ``h_s``/``h_t`` are the logits [N, V_s] / [N, V_t] and ``w_s``/``w_t`` are ignored.
    ``variant``: the work split (VARIANTS; default ``$DDK_FAST_KD_VARIANT`` or ``chunked``)."""
    variant = kernel_variant(variant)
    n = h_s.shape[0]
    dev = h_s.device
    stats = torch.empty(4, n, dtype=torch.float32, device=dev)
    ce = torch.empty(n, dtype=torch.float32, device=dev)
    d = torch.empty(n, dtype=torch.float32, device=dev)
    dce = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    dkd = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    dtok = torch.zeros(num_domains, dtype=torch.float32, device=dev)
    outputs = (stats, ce, d, dce, dkd, dtok)
    if n == 0:
        return outputs
    args = (h_s, w_s, h_t, w_t, labels, domain_ids, vocab, div, beta, lam, temperature, s_scale, s_cap,
            t_scale, t_cap, ignore_index, num_domains)  # fmt: skip
    if variant == "chunked" and not from_logits:
        kd_fwd_chunked(*args, outputs)
    else:  # given logits are already "one chunk": chunked == vsplit over them
        kd_fwd_tiles(*args, from_logits, outputs, splits=variant != "rowblock")
    return outputs


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
    *,
    variant: str | None = None,
):
    """Gradient pass. ``g_ce``/``g_d`` [N] fp32: dL/dCE_i and dL/dD_i. Returns (grad_h fp32 [N, H_s] or None,
    grad_w fp32 [V_s, H_s] or None); ``from_logits``: (grad of the student logits in their dtype, None).
    ``variant``: the work split (VARIANTS; default ``$DDK_FAST_KD_VARIANT`` or ``chunked``); rowblock
    and vsplit share this tiled kernel, chunked recomputes the logits with cuBLAS (kd_chunked.py)."""
    variant = kernel_variant(variant)
    n = h_s.shape[0]
    dev = h_s.device
    if from_logits:
        gh = torch.zeros(h_s.shape, dtype=h_s.dtype, device=dev)
        gw = None
        need_h, need_w = True, False
    else:
        alloc = torch.empty if variant == "chunked" else torch.zeros  # chunked writes every row of dH
        gh = alloc(h_s.shape, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(w_s.shape, dtype=torch.float32, device=dev) if need_w else None
    if n == 0 or not (need_h or need_w):
        return gh, gw
    args = (h_s, w_s, h_t, w_t, labels, stats, g_ce, g_d, vocab, div, beta, lam, temperature, s_scale, s_cap,
            t_scale, t_cap, ignore_index, need_h, need_w)  # fmt: skip
    if variant == "chunked" and not from_logits:
        kd_bwd_chunked(*args, gh, gw)
    else:
        kd_bwd_tiles(*args, from_logits, gh, gw)
    return gh, gw
