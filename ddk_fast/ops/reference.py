"""The one plain-torch reference of the KD loss (CPU path, trainer, tests and benchmarks all import it).

Per token i with student logits ``s_i`` (``[V_s]``), teacher logits ``t_i`` (first ``V_s`` of ``[V_t]``;
teacher rows ``>= V_s`` are vocabulary padding and are never read), temperature ``T``:

    q = softmax(s / T)   (student)        p = softmax(t / T)   (teacher)
    CE_i  = logsumexp(s_i) - s_i[y_i]                     (un-tempered; 0 when no labels are given)
    forward_kl       D = KL(p || q) = sum p (log p - log q)
    reverse_kl       D = KL(q || p)
    jsd (beta)       M = beta p + (1-beta) q,  D = beta KL(p || M) + (1-beta) KL(q || M)
                     (TRL/GKD convention; beta = 0 -> forward_kl and beta = 1 -> reverse_kl, special-cased)
    skew_forward_kl  D = KL(p || lam p + (1-lam) q)        (DistiLLM, lam = skew_lambda, default 0.1)
    skew_reverse_kl  D = KL(q || lam q + (1-lam) p)
    total_variation  D = 1/2 sum |p - q|

    loss = (ce_weight * sum_i CE_i + kd_weight * (T^2 if scale_by_t2 else 1) * sum_i D_i) / divisor

sums over the tokens whose label is not ``ignore_index`` (all tokens without labels); the divisor is their
count (a mean; an all-ignored batch gives loss 0 and zero gradients) unless the caller passes one (1 for
``reduction="sum"``, Hugging Face's ``num_items_in_batch``). Optional per-model logit transforms (after the
matmul and the optional head bias, before T): ``logits = softcap * tanh(scale * raw / softcap)`` (Gemma-2
final-logit soft-capping, Cohere logit scale).

Gradient w.r.t. the tempered student logits z = s/T, g_j = dD/dq_j: ``dD/dz_j = q_j (g_j - sum_k q_k g_k)``:
    forward_kl  q - p
    reverse_kl  q (log q - log p - D)
    jsd         (1-beta) q (log q - log M - KL(q || M))          (since dD/dq_j = (1-beta) log(q_j / M_j))
and the CE gradient is ``softmax(s) - onehot(y)``.

Memory: everything is chunked over tokens (``chunk_size`` rows at a time, default sized so a chunk's
``[chunk, V]`` fp32 tile is ~32 MiB, at least 256 rows); the gradient is computed in the forward pass per
chunk (gradient-in-forward), so autograd saves only the ``[N, H]`` / ``[V, H]`` gradients, never a
``[N, V]`` tensor. On CPU this is cheaper than recomputing the logits in backward: the teacher matmul is done
once (see docs/kernels.md for the measurement). The peak is a few tiles (:func:`peak_extra_bytes`): the
per-chunk math takes its tiles over and frees or overwrites each as soon as it is used. ``kd_weight=0``
skips the teacher head (CE only; D and the domain KD sums are reported as 0).

Precision: logits, softmax and every sum are computed in fp32 whatever the input dtype and whatever the
autocast state (autocast is switched off inside), or in fp64 when any input matrix is fp64; gradients are
returned in the inputs' dtypes.

``torch.compile``: the chunk loop runs inside two ``torch.library.custom_op``s (``ddk_fast::linear_kd_torch``,
``ddk_fast::kd_torch``) with fake implementations, so Dynamo sees one opaque node whose token count is
symbolic: a new N does not recompile (a loop over ``range(0, N, chunk)`` traced by Dynamo would specialise
on N). Eager calls skip the custom op and run a ``torch.autograd.Function`` twin (same forward and
backward): a custom op's first eager call imports torch._dynamo (~900 modules, ~100 MB, seconds), which a
training loop that does not compile never needs. Higher-order gradients are not supported (the gradient is
precomputed): ``create_graph=True`` raises.

The plain formula (materialised logits, autograd), used as the float64 ground truth in the tests and as the
"naive" benchmark provider, is ``ddk_fast/ops/naive.py``: it is a transcription of the math above, not a
second implementation of this chunked reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk_math import (  # noqa: F401  (auto_chunk_size, peak_extra_bytes, check_chunk: re-exported)
    _chunk_terms,
    _finish,
    _inv_divisor,
    _out_from,
    _scalar_fakes,
    _transform,
    _valid_mask,
    auto_chunk_size,
    check_chunk,
    compute_dtype,
    peak_extra_bytes,
)
from .params import (  # noqa: F401  (re-exported: the names used to live here)
    DIVERGENCES,
    KDOutput,
    KDParams,
    check_bias,
    check_linear_shapes,
    check_logits,
    check_tokens,
    make_params,
)

NO_HIGHER_ORDER = (
    "ddk_fast KD loss: higher-order gradients (backward with create_graph=True) are not supported: the "
    "gradient is computed in the forward pass, so a graph of it would be wrong. Call backward without "
    "create_graph, or differentiate ddk_fast.ops.naive.kd_loss_naive instead."
)


# ----------------------------------------------------------------------------------------------------------
# fused linear + KD loss, chunked over tokens
# ----------------------------------------------------------------------------------------------------------


def _linear_kd(h_s, w_s, h_t, w_t, b_s, b_t, labels, domain_ids, divisor, p: KDParams, chunk: int,
               need_h: bool, need_w: bool, need_b: bool):  # fmt: skip
    n = h_s.shape[0]
    v = w_s.shape[0]
    dev = h_s.device
    dt = compute_dtype(h_s, w_s, h_t, w_t)
    w_s32 = w_s.to(dt)  # no copy for fp32 weights; bf16 logits are accumulated and kept in fp32
    w_t32 = w_t[:v].to(dt)
    b_s32 = b_s.to(dt) if b_s is not None else None
    b_t32 = b_t[:v].to(dt) if b_t is not None else None
    chunk = chunk or auto_chunk_size(n, v)
    valid = _valid_mask(labels, n, p.ignore_index, dev)
    ce_rows = torch.empty(n, dtype=dt, device=dev)
    d_rows = torch.empty(n, dtype=dt, device=dev)
    grad_h = torch.empty(h_s.shape, dtype=dt, device=dev) if need_h else h_s.new_empty(0, dtype=dt)
    grad_w = torch.zeros(w_s.shape, dtype=dt, device=dev) if need_w else h_s.new_empty(0, dtype=dt)
    grad_b = torch.zeros(v, dtype=dt, device=dev) if need_b else h_s.new_empty(0, dtype=dt)
    need_grad = need_h or need_w or need_b
    with_teacher = p.kd_weight != 0.0  # CE only: the teacher head is skipped (D reported as 0)
    # 1/divisor is known before the loop (a tensor: no host sync) so each chunk's gradient is final
    inv_div = _inv_divisor(valid, divisor, dt)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        hs = h_s[i:j].to(dt)
        raw_s = hs @ w_s32.T
        if b_s32 is not None:
            raw_s += b_s32
        s, ds = _transform(raw_s, p.student_logit_scale, p.student_softcap)
        tiles = [s]
        del raw_s, s
        if with_teacher:
            raw_t = h_t[i:j].to(dt) @ w_t32.T
            if b_t32 is not None:
                raw_t += b_t32
            tiles.append(_transform(raw_t, p.teacher_logit_scale, p.teacher_softcap)[0])
            del raw_t
        lab = labels[i:j] if labels is not None else None
        ce, d, g = _chunk_terms(tiles, lab, p, need_grad)
        vm = valid[i:j]
        ce_rows[i:j] = torch.where(vm, ce, 0.0)
        d_rows[i:j] = torch.where(vm, d, 0.0)
        if need_grad:
            g.mul_((vm.to(dt) * inv_div)[:, None])
            if ds is not None:
                g.mul_(ds)
            if need_h:
                torch.mm(g, w_s32, out=grad_h[i:j])
            if need_w:
                grad_w.addmm_(g.T, hs)
            if need_b:
                grad_b += g.sum(0)
    return _finish(ce_rows, d_rows, valid, domain_ids, p, inv_div) + (grad_h, grad_w, grad_b)


def _linear_kd_body(h_s, w_s, h_t, w_t, b_s, b_t, labels, domain_ids, divisor, ints, floats, chunk, need_h,
                    need_w, need_b):  # fmt: skip
    with torch.autocast(h_s.device.type, enabled=False):
        return _linear_kd(h_s, w_s, h_t, w_t, b_s, b_t, labels, domain_ids, divisor,
                          KDParams.from_op(ints, floats), chunk, need_h, need_w, need_b)  # fmt: skip


@torch.library.custom_op("ddk_fast::linear_kd_torch", mutates_args=())
def linear_kd_torch_op(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, b_s: Tensor | None, b_t: Tensor | None,
    labels: Tensor | None, domain_ids: Tensor | None, divisor: Tensor | None,
    ints: list[int], floats: list[float], chunk: int, need_h: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, ce, kd, domain_ce_sum, domain_kd_sum, domain_tokens, grad_h, grad_w, grad_b); gradients of
    ``loss`` in the compute dtype, ``[0]`` when not needed."""
    return _linear_kd_body(h_s, w_s, h_t, w_t, b_s, b_t, labels, domain_ids, divisor, ints, floats, chunk,
                           need_h, need_w, need_b)  # fmt: skip


@linear_kd_torch_op.register_fake
def _(h_s, w_s, h_t, w_t, b_s, b_t, labels, domain_ids, divisor, ints, floats, chunk, need_h, need_w, need_b):
    dt = compute_dtype(h_s, w_s, h_t, w_t)
    f = dict(dtype=dt)
    grads = (
        h_s.new_empty(h_s.shape if need_h else (0,), **f),
        h_s.new_empty(w_s.shape if need_w else (0,), **f),
        h_s.new_empty((w_s.shape[0],) if need_b else (0,), **f),
    )
    return _scalar_fakes(h_s, dt, ints[2]) + grads


def _linear_setup(ctx, inputs, output):
    h_s, w_s, _h_t, _w_t, b_s = inputs[:5]
    ctx.save_for_backward(*output[6:9])
    ctx.dtypes = (h_s.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)


def _scaled(g: Tensor, grad_loss: Tensor, dt: torch.dtype) -> Tensor:
    """``g * grad_loss`` in ``dt``; no copy of ``g`` for the usual ``loss.backward()`` (grad_loss == 1 on CPU,
    where reading it costs no device sync): a [V, H] weight gradient is not duplicated."""
    if g.device.type == "cpu" and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return g.to(dt)
    return (g * grad_loss.to(g.dtype)).to(dt)


def _linear_backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(NO_HIGHER_ORDER)
    out = [None] * 15
    for k, (g, dt) in enumerate(zip(ctx.saved_tensors, ctx.dtypes)):
        if ctx.needs_input_grad[(0, 1, 4)[k]] and g.numel():
            out[(0, 1, 4)[k]] = _scaled(g, grad_loss, dt)
    return tuple(out)


linear_kd_torch_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _eager_twin(name: str, body, setup, backward) -> type[torch.autograd.Function]:
    """The eager twin of a custom op: the same forward, setup and backward as a ``torch.autograd.Function``.
    A custom op's first eager call imports torch._dynamo (~900 modules, ~100 MB, seconds); eager callers do
    not need that, so :func:`linear_kd_torch` / :func:`kd_torch` take the twin unless torch.compile traces."""

    def forward(ctx, *args):
        res = body(*args)
        setup(ctx, args, res)
        ctx.mark_non_differentiable(*res[1:])
        return res

    def twin_backward(ctx, grad_loss, *_unused):
        return backward(ctx, grad_loss)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(twin_backward)})  # fmt: skip


_LinearKDFunction = _eager_twin("_LinearKDFunction", _linear_kd_body, _linear_setup, _linear_backward)


def fused_linear_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    params: KDParams | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divisor: torch.Tensor | None = None,
    **extras,
) -> KDOutput:
    """Plain-torch fused ``lm_head`` + KD loss, chunked over tokens (the CPU path; see the module docstring).

    Shapes: ``student_hidden`` [N, H_s], ``student_weight`` [V_s, H_s], ``teacher_hidden`` [N, H_t],
    ``teacher_weight`` [V_t >= V_s, H_t], ``labels``/``domain_ids`` [N] int64, biases [V_s] / [V_t]. Any float
    dtype; logits are computed and kept in fp32 (fp64 for fp64 inputs). Gradients: ``student_hidden``,
    ``student_weight`` and ``student_bias`` when they require grad; the teacher gets none. ``divisor``: 0-d
    tensor replacing the token count of the mean. ``extras``: ``skew_lambda``, ``student_logit_scale``,
    ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap``. Peak extra memory: at most
    :func:`peak_extra_bytes` (forward_kl: 4 fp32 ``[chunk_size, V_s]`` tiles plus the gradients; 3 tiles with
    ``kd_weight=0``, which skips the teacher head; 8 for the other divergences).
    """
    p = params or make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains, **extras
    )
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_bias("student_bias", student_bias, student_weight)
    check_bias("teacher_bias", teacher_bias, teacher_weight)
    check_tokens(student_hidden.shape[0], labels, domain_ids, p.num_domains, student_hidden.device)
    return linear_kd_torch(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, domain_ids, p,
        student_bias=student_bias, teacher_bias=teacher_bias, divisor=divisor, chunk=check_chunk(chunk_size),
    )  # fmt: skip


def linear_kd_torch(h_s, w_s, h_t, w_t, labels, domain_ids, p: KDParams, *, student_bias=None,
                    teacher_bias=None, divisor=None, chunk: int = 0) -> KDOutput:  # fmt: skip
    """The torch path of ``fused_linear_kd_loss`` on inputs the caller has already checked (no validation
    here: the public functions validate once). Eager calls run the autograd.Function; under torch.compile
    the custom op (one opaque node, symbolic token count)."""
    grad_on = torch.is_grad_enabled()
    args = (
        h_s, w_s, h_t.detach(), w_t.detach(), student_bias,
        teacher_bias.detach() if teacher_bias is not None else None, labels, domain_ids, divisor,
        p.op_ints(), p.op_floats(), chunk, grad_on and h_s.requires_grad, grad_on and w_s.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return _out_from(linear_kd_torch_op(*args))
    return _out_from(_LinearKDFunction.apply(*args))


# ----------------------------------------------------------------------------------------------------------
# KD loss from logits a user already has, chunked over tokens
# ----------------------------------------------------------------------------------------------------------


def _kd(s_all, t_all, labels, domain_ids, divisor, p: KDParams, chunk: int, need_grad: bool):
    n, v = s_all.shape
    dev = s_all.device
    dt = compute_dtype(s_all, t_all)
    chunk = chunk or auto_chunk_size(n, v)
    valid = _valid_mask(labels, n, p.ignore_index, dev)
    ce_rows = torch.empty(n, dtype=dt, device=dev)
    d_rows = torch.empty(n, dtype=dt, device=dev)
    grad = torch.empty(s_all.shape, dtype=s_all.dtype, device=dev) if need_grad else s_all.new_empty(0)
    inv_div = _inv_divisor(valid, divisor, dt)
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        # copies: _chunk_terms overwrites its tiles, and these would be views of the caller's fp32 logits
        s, ds = _transform(s_all[i:j].to(dt, copy=True), p.student_logit_scale, p.student_softcap)
        tiles = [s]
        del s
        if p.kd_weight != 0.0:
            tiles.append(
                _transform(t_all[i:j, :v].to(dt, copy=True), p.teacher_logit_scale, p.teacher_softcap)[0]
            )
        lab = labels[i:j] if labels is not None else None
        ce, d, g = _chunk_terms(tiles, lab, p, need_grad)
        vm = valid[i:j]
        ce_rows[i:j] = torch.where(vm, ce, 0.0)
        d_rows[i:j] = torch.where(vm, d, 0.0)
        if need_grad:
            g.mul_((vm.to(dt) * inv_div)[:, None])
            if ds is not None:
                g.mul_(ds)
            grad[i:j] = g
    return _finish(ce_rows, d_rows, valid, domain_ids, p, inv_div) + (grad,)


def _kd_body(s, t, labels, domain_ids, divisor, ints, floats, chunk, need_grad):
    with torch.autocast(s.device.type, enabled=False):
        return _kd(s, t, labels, domain_ids, divisor, KDParams.from_op(ints, floats), chunk, need_grad)


@torch.library.custom_op("ddk_fast::kd_torch", mutates_args=())
def kd_torch_op(
    s: Tensor, t: Tensor, labels: Tensor | None, domain_ids: Tensor | None, divisor: Tensor | None,
    ints: list[int], floats: list[float], chunk: int, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, ce, kd, domain sums x3, grad of loss w.r.t. s in s's dtype or ``[0]``)."""
    return _kd_body(s, t, labels, domain_ids, divisor, ints, floats, chunk, need_grad)


@kd_torch_op.register_fake
def _(s, t, labels, domain_ids, divisor, ints, floats, chunk, need_grad):
    return _scalar_fakes(s, compute_dtype(s, t), ints[2]) + (s.new_empty(s.shape if need_grad else (0,)),)


def _kd_setup(ctx, inputs, output):
    ctx.save_for_backward(output[6])


def _kd_backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(NO_HIGHER_ORDER)
    (grad,) = ctx.saved_tensors
    gs = _scaled(grad, grad_loss, grad.dtype) if ctx.needs_input_grad[0] and grad.numel() else None
    return (gs,) + (None,) * 8


kd_torch_op.register_autograd(_kd_backward, setup_context=_kd_setup)


_KDFunction = _eager_twin("_KDFunction", _kd_body, _kd_setup, _kd_backward)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int = 0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    params: KDParams | None = None,
    *,
    divisor: torch.Tensor | None = None,
    **extras,
) -> KDOutput:
    """KD loss from logits: ``student_logits`` [N, V_s] (gets a gradient in its own dtype),
    ``teacher_logits`` [N, V_t >= V_s] (columns >= V_s ignored, no gradient). Chunked over tokens."""
    p = params or make_params(
        divergence, beta, temperature, kd_weight, ce_weight, scale_by_t2, ignore_index, num_domains, **extras
    )
    check_logits(student_logits, teacher_logits)
    check_tokens(student_logits.shape[0], labels, domain_ids, p.num_domains, student_logits.device)
    return kd_torch(
        student_logits, teacher_logits, labels, domain_ids, p, divisor=divisor, chunk=check_chunk(chunk_size)
    )


def kd_torch(s, t, labels, domain_ids, p: KDParams, *, divisor=None, chunk: int = 0) -> KDOutput:
    """The torch path of ``kd_loss`` on checked inputs (see :func:`linear_kd_torch`)."""
    args = (
        s, t.detach(), labels, domain_ids, divisor, p.op_ints(), p.op_floats(), chunk,
        torch.is_grad_enabled() and s.requires_grad,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return _out_from(kd_torch_op(*args))
    return _out_from(_KDFunction.apply(*args))
