"""The loss API as other trainers use it: autocast, reduction / num_items_in_batch, [B, T, H] with padding and
shift_labels, head biases, float64, create_graph, recompilation, and the validate= value check."""

from __future__ import annotations

import math
import os

import pytest
import torch

from ddk_fast import FusedLinearKDLoss, KDLoss, fused_linear_kd_loss, kd_loss
from ddk_fast.ops.naive import fused_linear_kd_loss_naive, kd_loss_naive
from ddk_fast.ops.params import DIVERGENCES, check_token_values

from .test_loss_reference import make_inputs


def _grads(out, *xs):
    return torch.autograd.grad(out.loss, xs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_autocast_cpu_bf16_forward_backward_matches_fp32(divergence):
    """Under CPU bf16 autocast the loss runs, is fp32, and is within bf16 error of the fp32 result; the
    student hidden states come from an autocast matmul (bf16), as in a mixed-precision model."""
    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=29, hs=16, ht=24, vs=401, vt=410)
    g = torch.Generator().manual_seed(3)
    proj = (torch.randn(16, 16, generator=g) / 4).requires_grad_()
    w = w_s.clone().requires_grad_()
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, kd_weight=0.5, labels=labels)
    ref = fused_linear_kd_loss(h_s @ proj, w, h_t, w_t, **kw)
    ref_grads = _grads(ref, proj, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = h_s @ proj
        assert hidden.dtype == torch.bfloat16
        out = fused_linear_kd_loss(hidden, w, h_t, w_t, **kw)
        got_grads = _grads(out, proj, w)
    assert out.loss.dtype == torch.float32 and out.ce.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == b.dtype == torch.float32  # the inputs' dtypes
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3 * b.abs().max().item())


def test_autocast_kd_loss_from_logits():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=11, vs=300, vt=300)
    s = (h_s @ w_s.T).requires_grad_()
    t = h_t @ w_t.T
    ref = kd_loss(s, t, labels, divergence="jsd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd_loss(s.bfloat16(), t.bfloat16(), labels, divergence="jsd")
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)


def _hand_sums(s, t, labels, temperature, ignore_index=-100):
    """forward KL and CE per token by hand (float64 loops over rows): (sum CE, sum D, count)."""
    ce_sum = d_sum = 0.0
    count = 0
    for i in range(s.shape[0]):
        if labels[i] == ignore_index:
            continue
        si, ti = s[i].double(), t[i].double()
        ce_sum += (torch.logsumexp(si, 0) - si[labels[i]]).item()
        lq = si / temperature - torch.logsumexp(si / temperature, 0)
        lp = ti / temperature - torch.logsumexp(ti / temperature, 0)
        d_sum += (lp.exp() * (lp - lq)).sum().item()
        count += 1
    return ce_sum, d_sum, count


def test_reduction_sum_and_num_items_in_batch_equal_hand_sums():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=23, vs=257, vt=260)
    T, kdw, cew = 2.0, 0.3, 0.7
    ce_sum, d_sum, count = _hand_sums(h_s @ w_s.T, h_t @ w_t[:257].T, labels, T)
    total = cew * ce_sum + kdw * T * T * d_sum
    kw = dict(temperature=T, kd_weight=kdw, ce_weight=cew)
    hs = h_s.clone().requires_grad_()
    mean = fused_linear_kd_loss(hs, w_s, h_t, w_t, labels, **kw)
    (g_mean,) = _grads(mean, hs)
    summed = fused_linear_kd_loss(hs, w_s, h_t, w_t, labels, reduction="sum", **kw)
    (g_sum,) = _grads(summed, hs)
    assert math.isclose(summed.loss.item(), total, rel_tol=1e-5)
    assert math.isclose(mean.loss.item(), total / count, rel_tol=1e-5)
    assert math.isclose(summed.ce.item(), ce_sum / count, rel_tol=1e-5)  # ce / kd stay means
    torch.testing.assert_close(g_sum, g_mean * count, rtol=1e-5, atol=1e-6)
    for items in (40, torch.tensor(40)):
        by_items = fused_linear_kd_loss(hs, w_s, h_t, w_t, labels, num_items_in_batch=items, **kw)
        assert math.isclose(by_items.loss.item(), total / 40, rel_tol=1e-5)
    s = (h_s @ w_s.T).requires_grad_()
    lg = kd_loss(s, h_t @ w_t.T, labels, reduction="sum", **kw)
    assert math.isclose(lg.loss.item(), total, rel_tol=1e-5)
    mod = KDLoss(reduction="sum", **kw)(s, h_t @ w_t.T, labels)
    torch.testing.assert_close(mod.loss, lg.loss)
    assert math.isclose(
        FusedLinearKDLoss(**kw)(h_s, w_s, h_t, w_t, labels, num_items_in_batch=40).loss.item(),
        total / 40,
        rel_tol=1e-5,
    )


def test_batched_with_padding_and_shift_equals_flat_call():
    """[B, T, H] with right padding and model-aligned labels (shift_labels=True) == the flat call with
    labels shifted by hand, values and gradients."""
    B, T, H, V = 3, 9, 16, 301
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(B, T, H, generator=g, requires_grad=True)
    h_t = torch.randn(B, T, 20, generator=g)
    w_s = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    w_t = torch.randn(V + 7, 20, generator=g) / 4
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([9, 5, 2])
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    labels = ids.masked_fill(pad, -100)
    dom = torch.tensor([0, 2, 1])[:, None].expand(B, T)
    kw = dict(divergence="skew_reverse_kl", temperature=1.5, num_domains=3)
    a = fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, dom, shift_labels=True, **kw)
    ga = _grads(a, h_s, w_s)
    shifted = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)
    b = fused_linear_kd_loss(
        h_s.reshape(-1, H), w_s, h_t.reshape(-1, 20), w_t, shifted.reshape(-1), dom.reshape(-1), **kw
    )
    gb = _grads(b, h_s, w_s)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert a.domain_tokens.tolist() == [8.0, 1.0, 4.0]  # per row: length - 1 counted tokens
    with pytest.raises(ValueError, match=r"labels: expected shape \[3, 9\]"):
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels[:, :-1])
    with pytest.raises(ValueError, match=r"teacher_hidden: expected shape \[3, 9, \*\]"):
        fused_linear_kd_loss(h_s, w_s, h_t[:2], w_t)


def test_head_biases_match_the_float64_formula():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=19, vs=211, vt=220)
    g = torch.Generator().manual_seed(9)
    b_s = torch.randn(211, generator=g, requires_grad=True)
    b_t = torch.randn(220, generator=g)
    hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    out = fused_linear_kd_loss(hs, ws, h_t, w_t, labels, divergence="jsd", student_bias=b_s, teacher_bias=b_t)
    got = _grads(out, hs, ws, b_s)
    xs = [x.double().detach().requires_grad_() for x in (h_s, w_s, b_s)]
    s = xs[0] @ xs[1].T + xs[2]
    t = h_t.double() @ w_t[:211].double().T + b_t[:211].double()
    gt = kd_loss_naive(s, t, labels, divergence="jsd")
    want = torch.autograd.grad(gt.loss, xs)
    torch.testing.assert_close(out.loss.double(), gt.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"student_bias: expected shape \[211\]"):
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, student_bias=torch.zeros(210))


def test_float64_computes_in_float64_on_the_torch_path():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=13, vs=150, vt=150, dtype=torch.float64)
    hs = h_s.clone().requires_grad_()
    out = fused_linear_kd_loss(hs, w_s, h_t, w_t, labels, divergence="reverse_kl", temperature=2.0)
    assert out.loss.dtype == torch.float64
    (g,) = _grads(out, hs)
    assert g.dtype == torch.float64
    hn = h_s.clone().requires_grad_()
    gt = fused_linear_kd_loss_naive(
        hn, w_s, h_t, w_t, labels, compute_dtype=torch.float64, divergence="reverse_kl", temperature=2.0
    )
    (gn,) = torch.autograd.grad(gt.loss, hn)
    torch.testing.assert_close(out.loss, gt.loss, rtol=1e-12, atol=1e-12)  # fp32 math would miss by ~1e-7
    torch.testing.assert_close(g, gn, rtol=1e-10, atol=1e-12)
    with pytest.raises(
        ValueError, match="backend='triton': expected float32/bfloat16/float16 inputs, got float64"
    ):
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, backend="triton")


def test_create_graph_raises_a_clear_error():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=7, vs=64, vt=64)
    hs = h_s.clone().requires_grad_()
    out = fused_linear_kd_loss(hs, w_s, h_t, w_t, labels)
    with pytest.raises(RuntimeError, match=r"higher-order gradients \(backward with create_graph=True\)"):
        torch.autograd.grad(out.loss, hs, create_graph=True)
    s = (h_s @ w_s.T).requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(kd_loss(s, h_t @ w_t.T, labels).loss, s, create_graph=True)


@pytest.mark.parametrize("dynamic", [None, True])
def test_twenty_token_counts_compile_at_most_twice(dynamic):
    """Whole graph (fullgraph), default automatic-dynamic shapes or dynamic=True."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    g = torch.Generator().manual_seed(0)
    w_s = torch.randn(97, 8, generator=g, requires_grad=True)
    w_t = torch.randn(97, 12, generator=g)

    @torch.compile(backend=counter, fullgraph=True, dynamic=dynamic)
    def step(h_s, h_t, labels):
        return fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, divergence="jsd").loss

    for n in range(5, 45, 2):  # 20 distinct token counts
        h_s = torch.randn(n, 8, generator=g, requires_grad=True)
        loss = step(h_s, torch.randn(n, 12, generator=g), torch.randint(0, 97, (n,), generator=g))
        loss.backward()
        assert h_s.grad is not None and torch.isfinite(h_s.grad).all()
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 20 token counts"
    torch._dynamo.reset()


def _small():
    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=8, vs=50, vt=50)
    return h_s, w_s, h_t, w_t, labels, domains


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            {"labels": 50},
            r"labels: expected values in \[0, 50\) \(the student vocabulary\) or ignore_index=-100, got 50",
        ),
        ({"labels": -1}, r"labels: expected values in \[0, 50\) .*got -1 \(1 bad labels\)"),
        ({"domain_ids": 3}, r"domain_ids: expected values in \[0, 3\) \(num_domains\), got 3"),
        ({"domain_ids": -2}, r"domain_ids: expected values in \[0, 3\) \(num_domains\), got -2"),
    ],
)
def test_out_of_range_labels_and_domain_ids_raise(bad, match):
    h_s, w_s, h_t, w_t, labels, domains = _small()
    labels, domains = labels.clone(), domains.clone()
    if "labels" in bad:
        labels[3] = bad["labels"]
    else:
        domains[5] = bad["domain_ids"]
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, domains, num_domains=3)
    with pytest.raises(ValueError, match=match):
        kd_loss(h_s @ w_s.T, h_t @ w_t.T, labels, domains, num_domains=3)
    with pytest.raises(ValueError, match=match):  # the CUDA opt-in: same error, one host sync
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, domains, num_domains=3, validate="sync")
    with pytest.raises(RuntimeError, match=r"labels outside \[0, 50\)"):  # the CUDA default: device assert
        check_token_values(labels, domains, 50, 3, -100, sync=False)
    if "labels" in bad:  # validate=False: the old behaviour (clamped), no error
        out = fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, domains, num_domains=3, validate=False)
        assert torch.isfinite(out.loss)


def test_ignore_index_other_than_default_is_not_flagged():
    h_s, w_s, h_t, w_t, labels, _ = _small()
    labels = labels.masked_fill(labels == -100, -1)
    fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, ignore_index=-1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "batchmean"}, r"reduction: expected one of \('mean', 'sum'\), got 'batchmean'"),
        ({"num_items_in_batch": 0}, r"num_items_in_batch: expected a number > 0, got 0"),
        ({"num_items_in_batch": "8"}, r"num_items_in_batch: expected an int, a tensor or None, got '8'"),
        ({"num_items_in_batch": torch.ones(2)}, r"num_items_in_batch: expected a scalar, got shape \[2\]"),
        (
            {"num_items_in_batch": 8, "reduction": "sum"},
            r"num_items_in_batch: expected None with reduction='sum'",
        ),
        ({"validate": "yes"}, r"validate: expected True, False or 'sync', got 'yes'"),
    ],
)
def test_bad_reduction_arguments(kwargs, match):
    h_s, w_s, h_t, w_t, labels, _ = _small()
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, **kwargs)


def test_triton_path_bias_sum_and_batched_match_the_torch_path():
    """The Triton op (interpreted on CPU) with head biases folded into the matmul, reduction='sum' and
    num_items_in_batch, [B, T, H] + shift_labels: same values and gradients as the torch path."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (set by tests/conftest.py)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 2, 5, 16, 401
    h_s = torch.randn(B, T, H, generator=g).to(dev).requires_grad_()
    w_s = (torch.randn(V, H, generator=g) / 4).to(dev).requires_grad_()
    b_s = torch.randn(V, generator=g).to(dev).requires_grad_()
    h_t, w_t = torch.randn(B, T, 24, generator=g).to(dev), (torch.randn(V + 3, 24, generator=g) / 4).to(dev)
    b_t = torch.randn(V + 3, generator=g).to(dev)
    ids = torch.randint(0, V, (B, T), generator=g).to(dev)
    for kw in ({"reduction": "sum"}, {"num_items_in_batch": torch.tensor(7, device=dev)}):
        outs, grads = [], []
        for backend in ("torch", "triton"):
            out = fused_linear_kd_loss(
                h_s, w_s, h_t, w_t, ids, divergence="jsd", temperature=2.0, student_bias=b_s,
                teacher_bias=b_t, shift_labels=True, backend=backend, **kw,
            )  # fmt: skip
            outs.append(out.loss)
            grads.append(torch.autograd.grad(out.loss, (h_s, w_s, b_s)))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
