"""Public API: validation errors name the argument, backend dispatch, modules, import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ddk_fast.backend as backend_mod
from ddk_fast.errors import BackendUnavailableError
from ddk_fast.losses import FusedLinearKDLoss, KDLoss, KDOutput, fused_linear_kd_loss, kd_loss
from ddk_fast.ops.reference import fused_linear_kd_loss_reference


def _inputs(n=6, hs=8, ht=12, vs=20, vt=24):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, hs, generator=g),
        torch.randn(vs, hs, generator=g),
        torch.randn(n, ht, generator=g),
        torch.randn(vt, ht, generator=g),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"divergence": "kl"}, r"divergence: expected one of .*got 'kl'"),
        ({"temperature": 0.0}, r"temperature: expected a number > 0.0, got 0.0"),
        ({"temperature": float("nan")}, r"temperature: expected a finite number"),
        ({"beta": 1.5}, r"beta: expected a number <= 1.0, got 1.5"),
        ({"kd_weight": -1.0}, r"kd_weight: expected a number >= 0.0, got -1.0"),
        ({"ce_weight": "1"}, r"ce_weight: expected a finite number, got '1'"),
        ({"num_domains": -2}, r"num_domains: expected an int >= 0, got -2"),
        ({"skew_lambda": 1.0}, r"skew_lambda: expected a number in \[0, 1\), got 1.0"),
        ({"scale_by_t2": 1}, r"scale_by_t2: expected a bool, got 1"),
        ({"backend": "cuda"}, r"loss backend: expected one of .*got 'cuda'"),
        ({"chunk_size": 0}, r"chunk_size: expected an int >= 1 or None, got 0"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, r"labels: expected shape \[6\]"),
        ({"labels": torch.zeros(6)}, r"labels: expected an int64 tensor, got torch.float32"),
        (
            {"domain_ids": torch.zeros(6, dtype=torch.long)},
            r"num_domains: expected an int > 0 when domain_ids",
        ),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(*_inputs(), **kwargs)


@pytest.mark.parametrize(
    "idx,bad,match",
    [
        (1, torch.randn(20, 9), r"student_weight: expected shape \[V_s, 8\]"),
        (2, torch.randn(5, 12), r"teacher_hidden: expected 6 rows"),
        (3, torch.randn(24, 11), r"teacher_weight: expected shape \[V_t, 12\]"),
        (3, torch.randn(19, 12), r"teacher_weight: expected V_t >= V_s = 20 .*got V_t = 19"),
        (0, torch.randn(6, 8, 1, 1), r"student_hidden: expected a \[B, T, H\] or \[N, H\] tensor"),
        (2, torch.randn(6, 12, 1), r"teacher_hidden: expected a 2-D tensor"),
        (0, torch.zeros(6, 8, dtype=torch.long), r"student_hidden: expected a floating-point tensor"),
    ],
)
def test_bad_shapes_raise(idx, bad, match):
    args = list(_inputs())
    args[idx] = bad
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(*args)


def test_kd_loss_logits_shape_error():
    with pytest.raises(ValueError, match=r"teacher_logits: expected shape \[4, V_t >= 10\]"):
        kd_loss(torch.randn(4, 10), torch.randn(4, 9))


def test_explicit_triton_without_interpreter_raises_with_fix(monkeypatch):
    monkeypatch.setattr(backend_mod, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backend_mod.resolve_loss_backend("triton", on_cuda=False)


def test_auto_on_cpu_uses_the_reference_and_modules_forward():
    h_s, w_s, h_t, w_t = _inputs()
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    a = fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, divergence="jsd", temperature=2.0)
    b = fused_linear_kd_loss_reference(h_s, w_s, h_t, w_t, labels, divergence="jsd", temperature=2.0)
    c = FusedLinearKDLoss(divergence="jsd", temperature=2.0)(h_s, w_s, h_t, w_t, labels)
    assert isinstance(a, KDOutput)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.loss, c.loss)
    s = h_s @ w_s.T
    d = KDLoss(divergence="jsd", temperature=2.0)(s, h_t @ w_t.T, labels)
    torch.testing.assert_close(d.loss, a.loss, rtol=1e-5, atol=1e-5)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="temperature: expected a number > 0.0"):
        KDLoss(temperature=-1.0)


def test_import_does_not_import_triton_or_touch_cuda():
    code = (
        "import sys, torch; import ddk_fast.losses, ddk_fast.ops.fused_linear_kd; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialised'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )
