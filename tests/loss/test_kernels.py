"""Triton kernels against the float64 ground truth (values and gradients).

On a machine without CUDA they run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) on CPU tensors at
small shapes; with CUDA they run compiled. Every test runs once per work-split variant (``rowblock``,
``vsplit``, ``chunked``: ddk_fast/kernels/kd_common.py); on CPU the chunked variant is forced to 16-row chunks
so the small shapes still cross chunk boundaries. The GPU-only tests are in test_kernels_gpu.py.
Oracle: ``|gt - triton| <= k |gt - plain torch same dtype| + atol``.
"""

from __future__ import annotations

import pytest
import torch

from ddk_fast.backend import triton_import_error
from ddk_fast.losses import fused_linear_kd_loss, kd_loss
from ddk_fast.ops.naive import fused_linear_kd_loss_naive, kd_loss_naive
from ddk_fast.ops.reference import DIVERGENCES

from .test_loss_reference import assert_oracle, make_inputs

pytestmark = pytest.mark.skipif(triton_import_error() is not None, reason=f"{triton_import_error()}")

try:
    from ddk_fast.kernels.kd_chunked import CHUNK_ROWS_ENV, DS_SPLIT_ENV
    from ddk_fast.kernels.variant import VARIANT_ENV, VARIANTS, kernel_variant
except ImportError:  # no triton: every test here is skipped
    VARIANTS = ()


@pytest.fixture(autouse=True, params=VARIANTS)
def variant(request, monkeypatch):
    monkeypatch.setenv(VARIANT_ENV, request.param)
    if request.param == "chunked" and not torch.cuda.is_available():
        monkeypatch.setenv(CHUNK_ROWS_ENV, "16")  # several chunks (and a ragged last one) at N = 17..37
    return request.param


FIELDS = ("loss", "ce", "kd", "domain_ce_sum", "domain_kd_sum", "domain_tokens")


def _run(fn, tensors, labels, domains, req_w=True, grad_out=1.7, **kw):
    xs = [t.clone().requires_grad_(i == 0 or (i == 1 and req_w)) for i, t in enumerate(tensors)]
    out = fn(*xs, labels=labels, domain_ids=domains, num_domains=3, **kw)
    (out.loss * grad_out).backward()
    return out, xs[0].grad, xs[1].grad


def _check_linear(device, n=37, vs=1271, vt=1280, req_w=True, transform=None, **kw):
    tensors, labels, domains = make_inputs(n=n, vs=vs, vt=vt)
    tensors = [t.to(device) for t in tensors]
    labels, domains = labels.to(device), domains.to(device)
    if transform is not None:
        tensors, labels = transform(tensors, labels)
    gt, gh, gw = _run(
        fused_linear_kd_loss_naive,
        [t.double() for t in tensors],
        labels,
        domains,
        req_w,
        compute_dtype=torch.float64,
        **kw,
    )
    nv, nh, nw = _run(fused_linear_kd_loss_naive, tensors, labels, domains, req_w, **kw)
    tr, th, tw = _run(fused_linear_kd_loss, tensors, labels, domains, req_w, backend="triton", **kw)
    for f in FIELDS:
        assert_oracle(getattr(gt, f), getattr(tr, f), getattr(nv, f), f)
    assert_oracle(gh, th, nh, "grad student_hidden")
    if req_w:
        assert_oracle(gw, tw, nw, "grad student_weight")
    else:
        assert tw is None
    return tr, th, tw


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_linear_kernel_matches_float64(device, divergence, temperature):
    _check_linear(
        device, divergence=divergence, temperature=temperature, beta=0.3, kd_weight=0.7, ce_weight=0.4
    )


def test_all_ignored_batch_is_zero_not_nan(device):
    def ignore_all(tensors, labels):
        return tensors, torch.full_like(labels, -100)

    out, gh, gw = _check_linear(device, n=9, transform=ignore_all, divergence="jsd")
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_non_contiguous_inputs_and_frozen_head(device):
    def non_contiguous(tensors, labels):
        h_s, w_s, h_t, w_t = tensors
        h_s = h_s.T.contiguous().T  # column-major
        w_t = torch.cat([w_t, w_t], 1)[:, ::2]  # strided columns
        assert not h_s.is_contiguous() and not w_t.is_contiguous()
        return [h_s, w_s, h_t, w_t], labels

    _check_linear(
        device, n=17, vs=401, vt=417, req_w=False, transform=non_contiguous, divergence="reverse_kl"
    )


def test_no_labels_and_softcap(device):
    def drop_labels(tensors, labels):
        return tensors, None

    _check_linear(
        device, n=20, vs=300, vt=300, transform=drop_labels, divergence="jsd", temperature=2.0,
        student_softcap=4.0, teacher_softcap=6.0, student_logit_scale=0.8,
    )  # fmt: skip


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "total_variation"])
def test_kd_loss_from_logits_kernel(device, divergence):
    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=33, vs=1271, vt=1300)
    s64 = (h_s.double() @ w_s.double().T).to(device)
    t64 = (h_t.double() @ w_t.double().T).to(device)
    labels, domains = labels.to(device), domains.to(device)
    kw = dict(divergence=divergence, temperature=2.5, num_domains=3, beta=0.7)
    res = []
    for fn, s, t, extra in (
        (kd_loss_naive, s64, t64, {}),
        (kd_loss_naive, s64.float(), t64.float(), {}),
        (kd_loss, s64.float().T.contiguous().T, t64.float(), {"backend": "triton"}),
    ):
        s = s.detach().requires_grad_()
        out = fn(s, t, labels, domains, **kw, **extra)
        (out.loss * 0.5).backward()
        res.append((out, s.grad))
    (gt, gg), (nv, ng), (tr, tg) = res
    for f in FIELDS:
        assert_oracle(getattr(gt, f), getattr(tr, f), getattr(nv, f), f)
    assert_oracle(gg, tg, ng, "grad logits")


def test_bf16_kernel_no_worse_than_torch_bf16(device):
    tensors, labels, domains = make_inputs(n=24, vs=512, vt=512)
    tb = [t.to(device, torch.bfloat16) for t in tensors]
    labels = labels.to(device)
    gt = fused_linear_kd_loss_naive(
        *[t.double() for t in tb], labels, compute_dtype=torch.float64, divergence="jsd"
    )
    nv = fused_linear_kd_loss_naive(*tb, labels, compute_dtype=None, divergence="jsd")  # all-bf16 torch
    xs = [t.clone().requires_grad_(i == 0) for i, t in enumerate(tb)]
    tr = fused_linear_kd_loss(*xs, labels, divergence="jsd", backend="triton")
    tr.loss.backward()
    assert xs[0].grad.dtype == torch.bfloat16 and torch.isfinite(xs[0].grad.float()).all()
    assert_oracle(gt.loss, tr.loss, nv.loss, "bf16 loss", k=1.0)


def test_triton_path_under_torch_compile(device):
    tensors, labels, domains = make_inputs(n=16, vs=200, vt=210)
    tensors = [t.to(device) for t in tensors]
    labels = labels.to(device)

    def step(h_s, w_s, h_t, w_t):
        return fused_linear_kd_loss(
            h_s, w_s, h_t, w_t, labels, divergence="reverse_kl", backend="triton"
        ).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_(i < 2) for i, t in enumerate(tensors)]
    ys = [t.clone().requires_grad_(i < 2) for i, t in enumerate(tensors)]
    a = compiled(*xs)
    a.backward()
    b = step(*ys)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xs[0].grad, ys[0].grad)
    torch.testing.assert_close(xs[1].grad, ys[1].grad)


def test_launchers_agree_across_variants(device, variant):
    """The launchers' raw outputs (stats, per-row CE / D, domain sums, fp32 dH / dW) match the rowblock
    variant's; ``variant=`` overrides the environment."""
    from ddk_fast.kernels.variant import kd_bwd, kd_fwd

    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=29, vs=1271, vt=1300)
    h_s, w_s, h_t, w_t, labels, domains = (x.to(device) for x in (h_s, w_s, h_t, w_t, labels, domains))
    scalars = (1271, 2, 0.3, 0.1, 2.0, 1.0, 0.0, 1.0, 0.0, -100)
    g_ce = torch.rand(29, device=device)
    g_d = torch.rand(29, device=device)
    res = {}
    for v in ("rowblock", variant):
        fwd = kd_fwd(h_s, w_s, h_t, w_t, labels, domains, *scalars, 3, False, variant=v)
        bwd = kd_bwd(h_s, w_s, h_t, w_t, labels, fwd[0], g_ce, g_d, *scalars, True, True, False, variant=v)
        res[v] = (*fwd, *bwd)
    for a, b in zip(res["rowblock"], res[variant]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_variant_switch_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv(VARIANT_ENV, "bogus")
    with pytest.raises(ValueError, match="DDK_FAST_KD_VARIANT / variant: expected one of"):
        kernel_variant()
    assert kernel_variant("vsplit") == "vsplit"


def test_chunked_ds_split_brings_bf16_grad_to_the_rounding_floor(device, variant, monkeypatch):
    """bf16 inputs, chunked variant: dS rounded to bf16 before the cuBLAS dH costs ~3x the error of rounding
    the gradient itself; DDK_FAST_KD_DS_SPLIT=1 (dS = hi + lo) brings dH back to that floor."""
    if variant != "chunked":
        pytest.skip("the dS split is a chunked-variant option")
    tensors, labels, _ = make_inputs(n=40, hs=64, ht=64, vs=1271, vt=1280)
    tb = [t.to(device, torch.bfloat16) for t in tensors]
    labels = labels.to(device)
    h64 = tb[0].double().requires_grad_()
    gt = fused_linear_kd_loss_naive(h64, *[t.double() for t in tb[1:]], labels, compute_dtype=torch.float64)
    (g64,) = torch.autograd.grad(gt.loss, h64)

    def rel_err(split: str) -> float:
        monkeypatch.setenv(DS_SPLIT_ENV, split)
        h = tb[0].clone().requires_grad_()
        out = fused_linear_kd_loss(h, *tb[1:], labels, backend="triton")
        (g,) = torch.autograd.grad(out.loss, h)
        return ((g.double() - g64).norm() / g64.norm()).item()

    floor = ((g64.bfloat16().double() - g64).norm() / g64.norm()).item()
    plain, split = rel_err("0"), rel_err("1")
    assert split < 1.3 * floor < plain, (floor, plain, split)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_chunked_gradient_in_forward_launcher(device, variant, divergence):
    """kd_fwd_bwd_chunked (forward and gradients from the same logits, no recompute) against float64: the
    loss assembled from its per-row outputs and its gradients at grad_output 1, domain sums included."""
    if variant != "chunked":
        pytest.skip("a chunked-variant launcher")
    from ddk_fast.kernels.kd_chunked import kd_fwd_bwd_chunked
    from ddk_fast.ops.fused_linear_kd import DIV_CODES

    tensors, labels, domains = make_inputs(n=37, vs=1271, vt=1280)
    h_s, w_s, h_t, w_t = (t.to(device) for t in tensors)
    labels, domains = labels.to(device), domains.to(device)
    kw = dict(divergence=divergence, temperature=2.5, beta=0.3, kd_weight=0.7, ce_weight=0.4)
    gt, gh, gw = _run(
        fused_linear_kd_loss_naive, [t.double() for t in (h_s, w_s, h_t, w_t)], labels, domains, grad_out=1.0,
        compute_dtype=torch.float64, **kw,
    )  # fmt: skip
    nv, nh, nw = _run(fused_linear_kd_loss_naive, [h_s, w_s, h_t, w_t], labels, domains, grad_out=1.0, **kw)
    kd_scale = 0.7 * 2.5**2
    stats, ce, d, dce, dkd, dtok, th, tw = kd_fwd_bwd_chunked(
        h_s, w_s, h_t, w_t, labels, domains, 1271, DIV_CODES[divergence], 0.3, 0.1, 2.5, 1.0, 0.0, 1.0, 0.0,
        -100, 3, 0.4, kd_scale, True, True,
    )  # fmt: skip
    count = (labels != -100).sum().clamp(min=1)
    loss = 0.4 * ce.sum() / count + kd_scale * d.sum() / count
    assert_oracle(gt.loss, loss, nv.loss, "loss")
    for name, a, b, c in (("dce", gt.domain_ce_sum, dce, nv.domain_ce_sum), ("dkd", gt.domain_kd_sum, dkd,
                          nv.domain_kd_sum), ("grad h", gh, th, nh), ("grad w", gw, tw, nw)):  # fmt: skip
        assert_oracle(a, b, c, name)
    torch.testing.assert_close(dtok, gt.domain_tokens.float())


def test_autotune_caches_a_config_and_changes_no_result(device, variant, monkeypatch):
    """DDK_FAST_KD_AUTOTUNE=1: each launcher times its candidate blocks once per key (into scratch outputs),
    caches the fastest, and the results equal the untuned ones."""
    from ddk_fast.kernels import kd_common
    from ddk_fast.kernels.variant import kd_bwd, kd_fwd

    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=21, vs=300, vt=300)
    h_s, w_s, h_t, w_t, labels, domains = (x.to(device) for x in (h_s, w_s, h_t, w_t, labels, domains))
    scalars = (300, 2, 0.3, 0.1, 2.0, 1.0, 0.0, 1.0, 0.0, -100)
    g_ce, g_d = torch.rand(21, device=device), torch.rand(21, device=device)

    def launch():
        fwd = kd_fwd(h_s, w_s, h_t, w_t, labels, domains, *scalars, 3, False)
        return (*fwd, *kd_bwd(h_s, w_s, h_t, w_t, labels, fwd[0], g_ce, g_d, *scalars, True, True, False))

    monkeypatch.setenv(kd_common.AUTOTUNE_ENV, "0")
    plain = launch()
    monkeypatch.setattr(kd_common, "_TUNED", {})
    monkeypatch.setenv(kd_common.AUTOTUNE_ENV, "1")
    tuned = launch()
    assert {k[0] for k in kd_common._TUNED} == {"fwd", "bwd"}
    for a, b in zip(plain, tuned):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
