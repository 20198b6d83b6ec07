"""The CPU path's cost properties: kd_weight=0 skips the teacher head, the first eager call imports nothing
heavy, tiles are taken over without touching the caller's tensors, and the no-copy backward stays exact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddk_fast import fused_linear_kd_loss, kd_loss
from ddk_fast.ops.naive import fused_linear_kd_loss_naive
from ddk_fast.ops.reference import auto_chunk_size, peak_extra_bytes

from .test_loss_reference import make_inputs

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_weight_zero_is_ce_only_and_never_reads_the_teacher(temperature):
    (h_s, w_s, h_t, w_t), labels, domains = make_inputs(n=37, hs=16, ht=24, vs=301, vt=310)
    h = h_s.clone().requires_grad_()
    w = w_s.clone().requires_grad_()
    kw = dict(labels=labels, domain_ids=domains, num_domains=3, temperature=temperature, kd_weight=0.0,
              ce_weight=0.7, chunk_size=8)  # fmt: skip
    poisoned = torch.full_like(w_t, float("nan"))  # a NaN teacher would make every number NaN if it were read
    out = fused_linear_kd_loss(h, w, h_t, poisoned, **kw)
    g = torch.autograd.grad(out.loss, (h, w))
    ref = fused_linear_kd_loss_naive(h_s.double(), w_s.double().requires_grad_(), h_t.double(), w_t.double(),
                                     **{k: v for k, v in kw.items() if k != "chunk_size"})  # fmt: skip
    assert torch.isfinite(out.loss) and out.kd == 0 and not out.domain_kd_sum.any()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.domain_ce_sum.double(), ref.domain_ce_sum.double(), rtol=1e-5, atol=1e-5)
    h2, w2 = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    ref = fused_linear_kd_loss_naive(h2, w2, h_t.double(), w_t.double(),
                                     **{k: v for k, v in kw.items() if k != "chunk_size"})  # fmt: skip
    for a, b in zip(g, torch.autograd.grad(ref.loss, (h2, w2))):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_kd_loss_from_logits_leaves_the_callers_logits_untouched():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(40, 97, generator=g, requires_grad=True)
    t = torch.randn(40, 97, generator=g)
    s0, t0 = s.detach().clone(), t.clone()
    out = kd_loss(s, t, torch.randint(0, 97, (40,), generator=g), chunk_size=16)
    out.loss.backward()
    assert torch.equal(s.detach(), s0) and torch.equal(t, t0)


def test_scaled_and_repeated_backward_are_exact():
    """The backward returns the saved gradient itself when the incoming gradient is 1: a scaled loss and a
    retained graph backpropagated twice must still accumulate the right values."""
    (h_s, w_s, h_t, w_t), labels, _ = make_inputs(n=21, hs=8, ht=8, vs=50, vt=50)
    w = w_s.clone().requires_grad_()
    out = fused_linear_kd_loss(h_s, w, h_t, w_t, labels=labels)
    (g1,) = torch.autograd.grad(out.loss, w, retain_graph=True)
    out.loss.backward(retain_graph=True)
    out.loss.backward(retain_graph=True)
    (3.0 * out.loss).backward(retain_graph=True)
    torch.testing.assert_close(w.grad, 5.0 * g1)
    (g2,) = torch.autograd.grad(out.loss, w)
    torch.testing.assert_close(g2, g1)


def test_first_eager_call_imports_no_compiler_machinery():
    code = (
        "import sys, torch, ddk_fast\n"
        "h = torch.randn(16, 8, requires_grad=True); w = torch.randn(30, 8)\n"
        "ddk_fast.fused_linear_kd_loss(h, w, h.detach(), w, torch.randint(0, 30, (16,))).loss.backward()\n"
        "ddk_fast.kd_loss(h @ w.T, (h @ w.T).detach()).loss.backward()\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy', 'triton')))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_chunk_default_and_documented_bound():
    assert auto_chunk_size(2048, 32000) == (1 << 23) // 32000  # ~32 MiB tiles
    assert auto_chunk_size(2048, 151936) == 256  # at least 256 rows at large vocabularies
    assert auto_chunk_size(50, 151936) == 50
    bound = peak_extra_bytes(2048, 32000, 512)
    assert bound == 4 * (4 * 262 * 32000 + 2048 * 512 + 8 * 2048)  # 262 = 2**23 // 32000
    assert peak_extra_bytes(2048, 32000, 512, divergence="jsd") > bound
