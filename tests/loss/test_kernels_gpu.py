"""GPU-only tests of the Triton kernels (``pytest -m gpu``; skipped without CUDA by tests/conftest.py).

Each runs once per work-split variant (``rowblock``, ``vsplit``, ``chunked``) at shapes the interpreter cannot
reach: several row blocks and vocabulary splits, vocabularies that are not multiples of any block, a padded
teacher vocabulary (V_t > V_s), bf16 and fp32 inputs, and N * V past 2^31 (int64 offsets). Ground truth: the
float64 naive formula (``ddk_fast/ops/naive.py``) on the same (upcast) inputs; the oracle is the suite's
``|gt - kernel| <= k |gt - plain torch same dtype| + atol``, values and gradients.
"""

from __future__ import annotations

import pytest
import torch

from ddk_fast.backend import triton_import_error
from ddk_fast.losses import fused_linear_kd_loss, kd_loss
from ddk_fast.ops.naive import fused_linear_kd_loss_naive, kd_loss_naive
from ddk_fast.ops.reference import DIVERGENCES

from .test_loss_reference import assert_oracle

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(triton_import_error() is not None, reason=f"{triton_import_error()}"),
]

try:
    from ddk_fast.kernels.variant import VARIANT_ENV, VARIANTS
except ImportError:  # no triton: every test here is skipped
    VARIANTS, VARIANT_ENV = ("chunked",), "DDK_FAST_KD_VARIANT"

FIELDS = ("loss", "ce", "kd", "domain_ce_sum", "domain_kd_sum", "domain_tokens")
BF16_MAX_REL_GRAD_ERR = 1e-2  # gate; the 1e-3 target is measured and reported by the benchmark


@pytest.fixture(autouse=True, params=VARIANTS)
def variant(request, monkeypatch):
    monkeypatch.setenv(VARIANT_ENV, request.param)
    return request.param


def _inputs(n, hs, ht, vs, vt, dtype, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=g, dtype=torch.float64)
    w_s = torch.randn(vs, hs, generator=g, dtype=torch.float64) * (3 / hs**0.5)
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64)
    w_t = torch.randn(vt, ht, generator=g, dtype=torch.float64) * (3 / ht**0.5)
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    domains = torch.randint(0, 3, (n,), generator=g)
    tensors = [x.to("cuda", dtype) for x in (h_s, w_s, h_t, w_t)]
    return tensors, labels.cuda(), domains.cuda()


def _run(fn, tensors, labels, domains, req_w, grad_out=1.7, **kw):
    xs = [t.clone().requires_grad_(i == 0 or (i == 1 and req_w)) for i, t in enumerate(tensors)]
    out = fn(*xs, labels=labels, domain_ids=domains, num_domains=3 if domains is not None else 0, **kw)
    (out.loss * grad_out).backward()
    return out, xs[0].grad, xs[1].grad


def max_rel_err(gt, got) -> float:
    """max |got - gt| / max |gt| (the benchmark's ``max_rel_grad_err``)."""
    gt = gt.double()
    return ((got.double() - gt).abs().max() / gt.abs().max().clamp(min=1e-30)).item()


def _check(tensors, labels, domains, req_w=True, cache=None, **kw):
    dtype = tensors[0].dtype
    if cache is None or cache.get(dtype) is None:
        gt, gh, gw = _run(
            fused_linear_kd_loss_naive, [t.double() for t in tensors], labels, domains, req_w,
            compute_dtype=torch.float64, **kw,
        )  # fmt: skip
        same = None if dtype != torch.float32 else torch.float32  # bf16: all-bf16 torch (logits rounded)
        nv, nh, nw = _run(
            fused_linear_kd_loss_naive, tensors, labels, domains, req_w, compute_dtype=same, **kw
        )
        if cache is not None:
            cache[dtype] = (gt, gh, gw, nv, nh, nw)
    else:
        gt, gh, gw, nv, nh, nw = cache[dtype]
    tr, th, tw = _run(fused_linear_kd_loss, tensors, labels, domains, req_w, backend="triton", **kw)
    k = 1.0 if dtype != torch.float32 else 4.0
    for f in FIELDS:
        assert_oracle(getattr(gt, f), getattr(tr, f).float(), getattr(nv, f).float(), f, k=k, atol=1e-5)
    assert_oracle(gh, th.float(), nh.float(), "grad student_hidden", k=k, atol=1e-5)
    errs = [max_rel_err(gh, th)]
    if req_w:
        assert_oracle(gw, tw.float(), nw.float(), "grad student_weight", k=k, atol=1e-5)
        errs.append(max_rel_err(gw, tw))
    else:
        assert tw is None
    return tr, th, max(errs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_fp32(divergence):
    tensors, labels, domains = _inputs(300, 256, 384, 4099, 4160, torch.float32)
    _, _, err = _check(
        tensors, labels, domains, divergence=divergence, temperature=2.0, beta=0.3, kd_weight=0.7,
        ce_weight=0.4,
    )  # fmt: skip
    assert err < 1e-4


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_inputs(divergence):
    tensors, labels, domains = _inputs(512, 512, 768, 8191, 8256, torch.bfloat16)
    _, th, err = _check(tensors, labels, domains, divergence=divergence, temperature=1.0)
    assert th.dtype == torch.bfloat16
    assert err < BF16_MAX_REL_GRAD_ERR, f"max relative grad error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_logit_scale_no_labels(dtype):
    tensors, _, _ = _inputs(200, 256, 256, 3001, 3001, dtype)
    _check(
        tensors, None, None, divergence="jsd", temperature=2.0, student_softcap=4.0, teacher_softcap=6.0,
        student_logit_scale=0.8, teacher_logit_scale=1.1,
    )  # fmt: skip


def test_all_ignored_frozen_head_non_contiguous():
    tensors, labels, domains = _inputs(100, 128, 192, 2047, 2100, torch.float32, ignore_frac=0.0)
    h_s, w_s, h_t, w_t = tensors
    h_s = h_s.T.contiguous().T
    w_t = torch.cat([w_t, w_t], 1)[:, ::2]
    out, th, _ = _check([h_s, w_s, h_t, w_t], labels, domains, req_w=False, divergence="reverse_kl")
    out, th, _ = _check(
        [h_s, w_s, h_t, w_t], torch.full_like(labels, -100), domains, req_w=False, divergence="reverse_kl"
    )
    assert out.loss.item() == 0.0 and torch.count_nonzero(th) == 0


@pytest.mark.parametrize("divergence", ["forward_kl", "total_variation"])
def test_kd_loss_from_logits(divergence):
    tensors, labels, domains = _inputs(257, 64, 64, 5000, 5100, torch.float32)
    h_s, w_s, h_t, w_t = (t.double() for t in tensors)
    s64, t64 = h_s @ w_s.T, h_t @ w_t.T
    kw = dict(divergence=divergence, temperature=2.5, num_domains=3, beta=0.7)
    res = []
    for fn, s, t, extra in (
        (kd_loss_naive, s64, t64, {}),
        (kd_loss_naive, s64.float(), t64.float(), {}),
        (kd_loss, s64.float(), t64.float(), {"backend": "triton"}),
    ):
        s = s.detach().requires_grad_()
        out = fn(s, t, labels, domains, **kw, **extra)
        (out.loss * 0.5).backward()
        res.append((out, s.grad))
    (gt, gg), (nv, ng), (tr, tg) = res
    for f in FIELDS:
        assert_oracle(getattr(gt, f), getattr(tr, f), getattr(nv, f), f, k=4.0, atol=1e-5)
    assert_oracle(gg, tg, ng, "grad logits", k=4.0, atol=1e-5)


def test_offsets_past_2_31(variant):
    """Logits [16,800, 128,256] (N * V > 2^31, the KD loss from logits): the last rows equal the same rows
    computed alone (a 32-bit ``row * stride`` would wrap and read other rows). The fused-linear kernels index
    [N, H] and [V, H] tensors (< 2^31 elements at these shapes) and chunks of logits: this is where it
    bites."""
    from ddk_fast.kernels.variant import kd_bwd, kd_fwd

    n, vs, tail = 16_800, 128_256, 48
    assert n * vs > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    # fp32 (8.6 GB each): a bf16 gradient could differ by one rounding between the two summation orders
    s = torch.randn(n, vs, device="cuda", generator=g) * 3
    t = torch.randn(n, vs, device="cuda", generator=g) * 3
    labels = torch.randint(0, vs, (n,), device="cuda", generator=g)
    domains = torch.randint(0, 3, (n,), device="cuda", generator=g)
    dummy = s.new_empty((0,))
    scalars = (vs, 0, 0.5, 0.1, 1.0, 1.0, 0.0, 1.0, 0.0, -100)
    g_ce = torch.rand(n, device="cuda", generator=g)
    g_d = torch.rand(n, device="cuda", generator=g)

    def launch(sl):
        fwd = kd_fwd(s[sl], dummy, t[sl], dummy, labels[sl], domains[sl], *scalars, 3, True, variant=variant)
        gs, _ = kd_bwd(
            s[sl], dummy, t[sl], dummy, labels[sl], fwd[0], g_ce[sl], g_d[sl], *scalars, True, False, True,
            variant=variant,
        )  # fmt: skip
        return fwd[0][:, -tail:], fwd[1][-tail:], fwd[2][-tail:], gs[-tail:]

    full = launch(slice(None))
    alone = launch(slice(n - tail, n))
    for name, a, b in zip(("stats", "ce", "d", "grad_logits"), full, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


_GROUND_TRUTH = {}  # dtype -> float64 results, shared by the three variants (the fp64 GEMMs dominate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_realistic_head_shapes(dtype):
    """N 1024, H 2048 / 4096 (1B <- 8B heads), V 32,775 / 32,832: the loss and dH against float64."""
    tensors, labels, _ = _inputs(1024, 2048, 4096, 32768 + 7, 32768 + 64, dtype, ignore_frac=1 / 7)
    tensors[0] = tensors[0] / 2048**0.25  # logits of a realistic spread
    tensors[2] = tensors[2] / 4096**0.25
    _, _, err = _check(
        tensors, labels, None, req_w=False, cache=_GROUND_TRUTH, divergence="jsd", temperature=2.0
    )
    assert err < (BF16_MAX_REL_GRAD_ERR if dtype == torch.bfloat16 else 1e-4)


def test_chunked_ds_split_reaches_bf16_rounding_floor(variant, monkeypatch):
    """bf16, chunked, DDK_FAST_KD_DS_SPLIT=1: dH within 1.3x of what rounding the float64 dH to bf16 gives."""
    if variant != "chunked":
        pytest.skip("the dS split is a chunked-variant option")
    monkeypatch.setenv("DDK_FAST_KD_DS_SPLIT", "1")
    tensors, labels, _ = _inputs(1024, 2048, 4096, 32768 + 7, 32768 + 64, torch.bfloat16, ignore_frac=1 / 7)
    tensors[0] = tensors[0] / 2048**0.25
    tensors[2] = tensors[2] / 4096**0.25
    h64 = tensors[0].double().requires_grad_()
    gt = fused_linear_kd_loss_naive(
        h64, *[t.double() for t in tensors[1:]], labels, compute_dtype=torch.float64, divergence="jsd"
    )
    (g64,) = torch.autograd.grad(gt.loss, h64)
    h = tensors[0].clone().requires_grad_()
    out = fused_linear_kd_loss(h, *tensors[1:], labels, backend="triton", divergence="jsd")
    (g,) = torch.autograd.grad(out.loss, h)
    floor = ((g64.bfloat16().double() - g64).norm() / g64.norm()).item()
    err = ((g.double() - g64).norm() / g64.norm()).item()
    assert err < 1.3 * floor, (err, floor)


def test_autotuned_configs_give_the_same_results(variant, monkeypatch):
    """The GPU tuner's candidate blocks (DDK_FAST_KD_AUTOTUNE=1, fresh cache) give the default blocks'
    results."""
    from ddk_fast.kernels import kd_common

    tensors, labels, domains = _inputs(700, 512, 768, 20011, 20032, torch.bfloat16)
    res = []
    for tune in ("0", "1"):
        monkeypatch.setenv(kd_common.AUTOTUNE_ENV, tune)
        monkeypatch.setattr(kd_common, "_TUNED", {})
        res.append(
            _run(fused_linear_kd_loss, tensors, labels, domains, True, backend="triton", divergence="jsd")
        )
    (a, ah, aw), (b, bh, bw) = res
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ah.float(), bh.float(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(aw.float(), bw.float(), rtol=2e-2, atol=1e-4)
