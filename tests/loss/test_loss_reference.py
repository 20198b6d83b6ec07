"""The chunked torch reference against the float64 naive formula (values and gradients).

Oracle (STYLE.md): ``|gt - ref| <= k * |gt - naive_same_dtype| + atol``, gt = the naive formula in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddk_fast.ops.naive import fused_linear_kd_loss_naive, kd_loss_naive
from ddk_fast.ops.reference import DIVERGENCES, fused_linear_kd_loss_reference, kd_loss_reference

K, ATOL = 4.0, 2e-5


def make_inputs(n=37, hs=24, ht=40, vs=1271, vt=1280, seed=0, ignore_frac=0.25, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=g, dtype=torch.float64)
    w_s = torch.randn(vs, hs, generator=g, dtype=torch.float64) / math.sqrt(hs) * 3
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64)
    w_t = torch.randn(vt, ht, generator=g, dtype=torch.float64) / math.sqrt(ht) * 3
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    domains = torch.randint(0, 3, (n,), generator=g)
    return [x.to(dtype) for x in (h_s, w_s, h_t, w_t)], labels, domains


def assert_oracle(gt, got, same_dtype, name, k=K, atol=ATOL):
    gt, got, same_dtype = gt.double(), got.double(), same_dtype.double()
    err = (gt - got).abs()
    bound = k * (gt - same_dtype).abs() + atol * (1 + gt.abs())
    bad = err > bound
    assert not bad.any(), f"{name}: max err {err.max():.3g}, bound at worst {bound[bad].min():.3g}"


def run_linear(fn, tensors, labels, domains, req_w=True, grad_out=1.7, **kw):
    xs = [t.clone().requires_grad_(i == 0 or (i == 1 and req_w)) for i, t in enumerate(tensors)]
    out = fn(*xs, labels=labels, domain_ids=domains, num_domains=3, **kw)
    (out.loss * grad_out).backward()
    return out, xs[0].grad, xs[1].grad


CASES = [(d, t) for d in DIVERGENCES for t in (1.0, 2.5)]


@pytest.mark.parametrize("divergence,temperature", CASES)
def test_fused_linear_reference_matches_float64(divergence, temperature):
    tensors, labels, domains = make_inputs()
    kw = dict(divergence=divergence, temperature=temperature, beta=0.3, kd_weight=0.7, ce_weight=0.4)
    gt, gh, gw = run_linear(
        fused_linear_kd_loss_naive,
        [t.double() for t in tensors],
        labels,
        domains,
        compute_dtype=torch.float64,
        **kw,
    )
    nv, nh, nw = run_linear(fused_linear_kd_loss_naive, tensors, labels, domains, **kw)
    rf, rh, rw = run_linear(fused_linear_kd_loss_reference, tensors, labels, domains, chunk_size=8, **kw)
    for field in ("loss", "ce", "kd", "domain_ce_sum", "domain_kd_sum", "domain_tokens"):
        assert_oracle(getattr(gt, field), getattr(rf, field), getattr(nv, field), field)
    assert_oracle(gh, rh, nh, "grad student_hidden")
    assert_oracle(gw, rw, nw, "grad student_weight")
    assert rf.loss.dtype == torch.float32 and rh.dtype == torch.float32
    assert torch.equal(rf.domain_tokens, torch.bincount(domains[labels != -100], minlength=3).float())


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl"])
def test_logits_reference_matches_float64(divergence):
    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=33, vs=401, vt=417)
    s64 = (h_s.double() @ w_s.double().T).requires_grad_()
    t64 = h_t.double() @ w_t.double().T
    kw = dict(divergence=divergence, temperature=2.5, num_domains=3)
    gt = kd_loss_naive(s64, t64, labels, domains, **kw)
    (gt.loss * 0.3).backward()
    s32 = s64.detach().float().requires_grad_()
    nv = kd_loss_naive(s32, t64.float(), labels, domains, **kw)
    (nv.loss * 0.3).backward()
    s_nc = s64.detach().float().T.contiguous().T.requires_grad_()  # non-contiguous
    assert not s_nc.is_contiguous()
    t_nc = t64.float().T.contiguous().T
    rf = kd_loss_reference(s_nc, t_nc, labels, domains, chunk_size=5, **kw)
    (rf.loss * 0.3).backward()
    assert_oracle(gt.loss, rf.loss, nv.loss, "loss")
    assert_oracle(gt.domain_kd_sum, rf.domain_kd_sum, nv.domain_kd_sum, "domain kd")
    assert_oracle(s64.grad, s_nc.grad, s32.grad, "grad logits")


def test_jsd_beta_limits_are_forward_and_reverse_kl():
    tensors, labels, _ = make_inputs(n=9, vs=100, vt=100)
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = fused_linear_kd_loss_reference(*tensors, labels, divergence="jsd", beta=beta)
        b = fused_linear_kd_loss_reference(*tensors, labels, divergence=other)
        torch.testing.assert_close(a.loss, b.loss)


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    tensors, labels, domains = make_inputs(n=7)
    labels[:] = -100
    out, gh, gw = run_linear(fused_linear_kd_loss_reference, tensors, labels, domains, divergence="jsd")
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    assert torch.count_nonzero(out.domain_tokens) == 0


def test_no_labels_counts_every_token_and_ce_is_zero():
    tensors, _, _ = make_inputs(n=11, vs=64, vt=64)
    a = fused_linear_kd_loss_reference(*tensors, temperature=2.0)
    gt = fused_linear_kd_loss_naive(
        *[t.double() for t in tensors], compute_dtype=torch.float64, temperature=2.0
    )
    assert a.ce.item() == 0.0
    torch.testing.assert_close(a.loss.double(), gt.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, 4.0 * a.kd)  # T^2 scaling


def test_frozen_head_gets_no_weight_grad_and_same_hidden_grad():
    tensors, labels, domains = make_inputs(n=13)
    _, gh1, gw1 = run_linear(fused_linear_kd_loss_reference, tensors, labels, domains, req_w=True)
    _, gh2, gw2 = run_linear(fused_linear_kd_loss_reference, tensors, labels, domains, req_w=False)
    assert gw1 is not None and gw2 is None
    torch.testing.assert_close(gh1, gh2)


def test_padded_teacher_rows_are_never_used():
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=9, vs=300, vt=320)
    a = fused_linear_kd_loss_reference(h_s, w_s, h_t, w_t, labels)
    w_t2 = w_t.clone()
    w_t2[300:] = float("nan")
    b = fused_linear_kd_loss_reference(h_s, w_s, h_t, w_t2, labels)
    torch.testing.assert_close(a.loss, b.loss)


def test_bf16_inputs_keep_fp32_logits_and_grad_dtypes():
    tensors, labels, _ = make_inputs(n=17, dtype=torch.bfloat16)
    out, gh, gw = run_linear(fused_linear_kd_loss_reference, tensors, labels, None)
    gt = fused_linear_kd_loss_naive(*[t.double() for t in tensors], labels, compute_dtype=torch.float64)
    nv = fused_linear_kd_loss_naive(*tensors, labels, compute_dtype=None)  # plain torch in bf16
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert_oracle(gt.loss, out.loss, nv.loss, "bf16 loss", k=1.0)


def test_softcap_and_logit_scale_match_naive():
    tensors, labels, _ = make_inputs(n=10, vs=200, vt=200)
    kw = dict(
        student_softcap=5.0,
        teacher_softcap=7.0,
        student_logit_scale=0.5,
        teacher_logit_scale=1.5,
        divergence="skew_reverse_kl",
        temperature=2.0,
    )
    gt, gh, gw = run_linear(
        fused_linear_kd_loss_naive,
        [t.double() for t in tensors],
        labels,
        None,
        compute_dtype=torch.float64,
        **kw,
    )
    rf, rh, rw = run_linear(fused_linear_kd_loss_reference, tensors, labels, None, chunk_size=3, **kw)
    torch.testing.assert_close(rf.loss.double(), gt.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rh.double(), gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rw.double(), gw, rtol=1e-4, atol=1e-6)


def test_no_grad_forward_matches():
    tensors, labels, _ = make_inputs(n=12)
    a = fused_linear_kd_loss_reference(*tensors, labels, divergence="total_variation")
    with torch.no_grad():
        b = fused_linear_kd_loss_reference(*tensors, labels, divergence="total_variation")
    torch.testing.assert_close(a.loss, b.loss)
    assert not b.loss.requires_grad
