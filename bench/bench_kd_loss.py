"""KD loss, fwd+bwd: naive torch vs chunked torch reference vs torch.compile vs Triton vs Liger (GPU).

Providers (side by side in one run):
- ``naive``: materialised fp32 logits for all N tokens + autograd (``fused_linear_kd_loss_naive``, what TRL /
  torchtune do);
- ``chunked``: ``fused_linear_kd_loss_reference`` (token chunks, gradient-in-forward);
- ``compiled``: ``torch.compile`` of the chunked reference;
- ``triton``: ``fused_linear_kd_loss(backend="triton")`` (CUDA only: the interpreter is 40-3000x slower);
- ``liger``: ``liger_kernel.transformers.LigerFusedLinearJSD`` when ``liger_kernel`` is installed (CUDA only).
  It computes the mean generalized JSD over non-ignored tokens and nothing else (no CE term, no T^2 factor),
  so it does slightly less work than the other providers, which also compute CE;
  ``test_liger_matches_reference`` checks on CUDA that it equals our JSD (``ce_weight=0, scale_by_t2=False``),
  gradients included.

Rows (``bench/results/kd_loss.jsonl`` + ``.csv``): median/IQR fwd+bwd time (pytest-benchmark), peak extra
memory (CUDA: max_memory_allocated; CPU: peak RSS of a fresh process, see bench/harness.py), achieved TFLOP/s
from ``flop = 2 N V_s (H_s + H_t) + 4 N V_s H_s`` (two logit matmuls, dH and dW; recompute not counted) and
the dense matmul rate measured in the same run.

    pytest bench/bench_kd_loss.py --benchmark-disable -q         # smoke (CI): every provider runs once
    pytest bench/bench_kd_loss.py --benchmark-only -q            # real run, writes bench/results/kd_loss.*
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import matmul_tflops, peak_memory, record, tflops, time_fn
from ddk_fast.ops.naive import fused_linear_kd_loss_naive
from ddk_fast.ops.reference import fused_linear_kd_loss_reference

CPU_SHAPES = {  # name: (N, H_s, H_t, V_s, V_t)
    "cpu-n2048-v32000-h512": (2048, 512, 512, 32000, 32000),
    "cpu-n512-v1271-h256": (512, 256, 384, 1271, 1280),
}
GPU_SHAPES = {
    "llama3.2-1b<-3.1-8b": (8192, 2048, 4096, 128256, 128256),
    "qwen2.5-0.5b<-7b": (8192, 896, 3584, 151936, 152064),
    "h4096-v128256-n1024": (1024, 4096, 4096, 128256, 128256),
    "h4096-v128256-n8192": (8192, 4096, 4096, 128256, 128256),
}
CPU_PROVIDERS = ("naive", "chunked", "compiled")
GPU_PROVIDERS = ("naive", "chunked", "compiled", "triton", "liger")
DIVERGENCE = "jsd"  # the divergence every provider (Liger included) implements
_COMPILED = {}


def flop_count(n, hs, ht, vs) -> float:
    return 2.0 * n * vs * (hs + ht) + 4.0 * n * vs * hs


def liger_jsd(vs: int, beta: float, temperature: float, device: str, ignore_index: int = -100):
    """Liger's fused ``lm_head`` + generalized JSD as ``fn(h_s, w_s, h_t, w_t, labels) -> scalar loss``.

    Liger's API (``liger_kernel/transformers/fused_linear_jsd.py``, Triton op in
    ``liger_kernel/ops/fused_linear_jsd.py``): ``LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100,
    temperature=1.0)``, ``forward(student_input [N, H_s], student_weight [V, H_s], teacher_input [N, H_t],
    teacher_weight [V, H_t], shift_labels [N] or None)``. Both weights must have the same V, so the teacher's
    padding rows >= V_s are cut off here, as our API does. Its beta: M = beta p + (1-beta) q,
    D = beta KL(p||M) + (1-beta) KL(q||M), p the teacher and q the student (0 = forward KL, 1 = reverse KL):
    TRL's convention and ours, so beta passes unchanged. The loss is sum_i D_i / (non-ignored tokens): no CE
    and no T^2 factor.
    """
    if torch.device(device).type != "cuda":
        raise ValueError(f"liger: expected a CUDA device (Liger's kernels are Triton-only), got {device!r}")
    from liger_kernel.transformers import LigerFusedLinearJSD

    mod = LigerFusedLinearJSD(jsd_beta=beta, ignore_index=ignore_index, temperature=temperature)
    return lambda h_s, w_s, h_t, w_t, labels: mod(h_s, w_s, h_t, w_t[:vs], labels)


def make_step(provider: str, n: int, hs: int, ht: int, vs: int, vt: int, dtype: str = "float32",
              device: str = "cpu", seed: int = 0):  # fmt: skip
    """Build inputs; return a closure doing one fwd+bwd step (module level: the CPU memory child calls it)."""
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    h_s = (torch.randn(n, hs, generator=g) / hs**0.25).to(device, dt).requires_grad_()
    w_s = (torch.randn(vs, hs, generator=g) / hs**0.5).to(device, dt).requires_grad_()
    h_t = (torch.randn(n, ht, generator=g) / ht**0.25).to(device, dt)
    w_t = (torch.randn(vt, ht, generator=g) / ht**0.5).to(device, dt)
    labels = torch.randint(0, vs, (n,), generator=g).to(device)
    labels[::9] = -100
    kw = dict(divergence=DIVERGENCE, beta=0.5, temperature=2.0)

    if provider == "naive":
        fn = lambda: fused_linear_kd_loss_naive(h_s, w_s, h_t, w_t, labels, **kw).loss  # noqa: E731
    elif provider == "chunked":
        fn = lambda: fused_linear_kd_loss_reference(h_s, w_s, h_t, w_t, labels, **kw).loss  # noqa: E731
    elif provider == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(
                lambda a, b, c, d, y: fused_linear_kd_loss_reference(a, b, c, d, y, **kw).loss, dynamic=False
            )
        comp = _COMPILED["fn"]
        fn = lambda: comp(h_s, w_s, h_t, w_t, labels)  # noqa: E731
    elif provider == "triton":
        from ddk_fast.losses import fused_linear_kd_loss

        fn = lambda: fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, backend="triton", **kw).loss  # noqa: E731
    elif provider == "liger":
        loss_fn = liger_jsd(vs, beta=kw["beta"], temperature=kw["temperature"], device=device)
        fn = lambda: loss_fn(h_s, w_s, h_t, w_t, labels)  # noqa: E731
    else:
        raise ValueError(f"provider: expected one of {GPU_PROVIDERS}, got {provider!r}")

    def step():
        h_s.grad = None
        w_s.grad = None
        fn().backward()

    return step


def _bench(benchmark, provider, shape_name, shape, dtype, device, rounds):
    n, hs, ht, vs, vt = shape
    kwargs = dict(provider=provider, n=n, hs=hs, ht=ht, vs=vs, vt=vt, dtype=dtype, device=str(device))
    step = make_step(**kwargs)
    timing = time_fn(benchmark, step, device=device, rounds=rounds, warmup=1)
    mem = None
    if timing["median_ms"] is not None:  # memory and rows only in real runs, not in the smoke test
        mem = peak_memory(step, device, factory="bench.bench_kd_loss:make_step", kwargs=kwargs)
    mm = matmul_tflops(str(device), torch.bfloat16) if timing["median_ms"] is not None else None
    achieved = tflops(flop_count(n, hs, ht, vs), timing["median_ms"])
    row = {
        "bench": "kd_loss_fwd_bwd",
        "provider": provider,
        "shape": shape_name,
        "n": n, "h_s": hs, "h_t": ht, "v_s": vs, "v_t": vt, "dtype": dtype, "divergence": DIVERGENCE,
        **timing,
        "peak_mem_mb": None if mem is None else mem / 2**20,
        "tflops": achieved,
        "matmul_tflops": mm,
        "fraction_of_matmul": None if achieved is None else achieved / mm,
    }  # fmt: skip
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
    record("kd_loss", row, device=device)
    return row


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
def test_kd_loss_cpu(benchmark, provider, shape_name):
    if torch.cuda.is_available():
        pytest.skip("CPU shapes run on CPU-only machines")
    benchmark.group = f"kd_loss {shape_name}"
    _bench(benchmark, provider, shape_name, CPU_SHAPES[shape_name], "float32", torch.device("cpu"), rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
def test_kd_loss_gpu(benchmark, provider, shape_name, dtype):
    if provider == "liger":
        pytest.importorskip("liger_kernel.transformers", reason="liger_kernel is not installed")
    n, hs, ht, vs, vt = GPU_SHAPES[shape_name]
    if provider == "naive" and n * vs * 4 * 6 > 0.8 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("naive fp32 logits do not fit in GPU memory at this shape")
    benchmark.group = f"kd_loss {shape_name}"
    _bench(benchmark, provider, shape_name, GPU_SHAPES[shape_name], dtype, torch.device("cuda"), rounds=10)


@pytest.mark.gpu
def test_liger_matches_reference():
    """The liger provider computes our jsd at the same beta (0.3: a swapped convention would fail), and the
    same gradients."""
    pytest.importorskip("liger_kernel.transformers", reason="liger_kernel is not installed")
    n, hs, ht, vs, vt = 257, 256, 384, 1271, 1280
    g = torch.Generator(device="cpu").manual_seed(0)
    h_s = torch.randn(n, hs, generator=g).cuda().requires_grad_()
    w_s = (torch.randn(vs, hs, generator=g) / hs**0.5).cuda().requires_grad_()
    h_t = torch.randn(n, ht, generator=g).cuda()
    w_t = (torch.randn(vt, ht, generator=g) / ht**0.5).cuda()
    labels = torch.randint(0, vs, (n,), generator=g).cuda()
    labels[::7] = -100
    kw = dict(beta=0.3, temperature=2.0)
    ref = fused_linear_kd_loss_reference(
        h_s, w_s, h_t, w_t, labels, divergence="jsd", ce_weight=0.0, scale_by_t2=False, **kw
    ).loss
    ref_grads = torch.autograd.grad(ref, (h_s, w_s))
    got = liger_jsd(vs, device="cuda", **kw)(h_s, w_s, h_t, w_t, labels)
    got_grads = torch.autograd.grad(got, (h_s, w_s))
    torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-5)
