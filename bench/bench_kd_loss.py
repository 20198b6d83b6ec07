"""KD loss, fwd+bwd: eager torch vs chunked torch vs torch.compile vs our Triton variants vs Liger, one run.

Providers (side by side in one run; the names are the ``impl`` column of the GPU rows):
- ``torch_eager``: materialised fp32 logits for all N tokens + autograd (``fused_linear_kd_loss_naive``, what
  TRL / torchtune do);
- ``torch_chunked``: ``fused_linear_kd_loss_reference`` (token chunks, gradient-in-forward);
- ``torch_compile``: ``torch.compile`` of the chunked reference;
- ``ddk_fast_<variant>``: ``fused_linear_kd_loss(backend="triton")`` with ``DDK_FAST_KD_VARIANT=<variant>``
  (``chunked``, ``vsplit``, ``rowblock``: ddk_fast/kernels/kd_common.py); ``ddk_fast_chunked_gif`` is the
  gradient-in-forward prototype ``kd_fwd_bwd_chunked`` (no recomputed GEMMs) behind a benchmark-only autograd
  wrapper, ``ddk_fast_chunked_gif_dssplit`` the same with ``DDK_FAST_KD_DS_SPLIT=1`` (bf16 dS kept as hi + lo
  for dH: accuracy at a FLOP cost).
  CUDA only in timed runs (the interpreter is 40-3000x slower); the CPU dry run of
  bench/gpu/kd_loss_matrix.py runs them interpreted.
- ``liger``: ``liger_kernel.transformers.LigerFusedLinearJSD`` when ``liger_kernel`` is installed (CUDA only).
  It computes the mean generalized JSD over non-ignored tokens and nothing else (no CE term, no T^2 factor),
  so it does slightly less work than the other providers, which also compute CE; its beta 0 / 0.5 / 1 is our
  forward_kl / jsd / reverse_kl (``LIGER_BETA``). ``test_liger_matches_reference`` checks on CUDA that it
  equals our JSD (``ce_weight=0, scale_by_t2=False``), gradients included.

FLOP counts: ``flop_count`` = 2 N V_s (H_s + H_t) + 4 N V_s H_s (both logit matmuls, dH and dW: the
trainable head of the pytest rows); ``flop_floor`` = 2 N V_s (2 H_s + H_t) (both logit matmuls and dH: the
frozen head of the GPU matrix, the issue's floor; recomputation not counted).

    pytest bench/bench_kd_loss.py --benchmark-disable -q         # smoke (CI): every CPU provider runs once
    pytest bench/bench_kd_loss.py --benchmark-only -q            # real run, writes bench/results/kd_loss.*
    python -m bench.gpu.kd_loss_matrix --out DIR                 # the GPU matrix -> DIR/gpu_kd_loss.jsonl
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from bench.harness import matmul_tflops, peak_memory, record, tflops, time_fn
from ddk_fast.ops.naive import fused_linear_kd_loss_naive
from ddk_fast.ops.reference import fused_linear_kd_loss_reference

CPU_SHAPES = {  # name: (N, H_s, H_t, V_s, V_t)
    "cpu-n2048-v32000-h512": (2048, 512, 512, 32000, 32000),
    "cpu-n512-v1271-h256": (512, 256, 384, 1271, 1280),
}
GPU_SHAPES = {  # the issue's shapes; the GPU matrix (bench/gpu/kd_loss_matrix.py) orders and budgets them
    "llama3.2-1b<-3.1-8b-n8192": (8192, 2048, 4096, 128256, 128256),
    "llama3.2-1b<-3.1-8b-n1024": (1024, 2048, 4096, 128256, 128256),
    "llama3.2-1b<-3.1-8b-n4096": (4096, 2048, 4096, 128256, 128256),
    "llama3.2-1b<-3.1-8b-n16384": (16384, 2048, 4096, 128256, 128256),
    "qwen2.5-0.5b<-7b-n8192": (8192, 896, 3584, 151936, 152064),
    "h4096-v128256-n8192": (8192, 4096, 4096, 128256, 128256),
}
# the kernels' switches (kd_common.VARIANT_ENV, kd_chunked.DS_SPLIT_ENV; not imported: that imports triton)
VARIANT_ENV = "DDK_FAST_KD_VARIANT"
DS_SPLIT_ENV = "DDK_FAST_KD_DS_SPLIT"
DDK_PROVIDER_ENV = {  # provider -> the environment the kernels run under
    "ddk_fast_chunked": {VARIANT_ENV: "chunked", DS_SPLIT_ENV: "0"},
    # gradient-in-forward prototype (kd_chunked.kd_fwd_bwd_chunked), with and without the hi + lo bf16 dS
    "ddk_fast_chunked_gif": {VARIANT_ENV: "chunked", DS_SPLIT_ENV: "0"},
    "ddk_fast_chunked_gif_dssplit": {VARIANT_ENV: "chunked", DS_SPLIT_ENV: "1"},
    "ddk_fast_vsplit": {VARIANT_ENV: "vsplit"},
    "ddk_fast_rowblock": {VARIANT_ENV: "rowblock"},
}
DDK_PROVIDERS = tuple(DDK_PROVIDER_ENV)
CPU_PROVIDERS = ("torch_eager", "torch_chunked", "torch_compile")
GPU_PROVIDERS = ("torch_eager", "torch_compile", "liger", *DDK_PROVIDERS)
DIVERGENCE = "jsd"  # the divergence every provider (Liger included) implements
LIGER_BETA = {"forward_kl": 0.0, "jsd": 0.5, "reverse_kl": 1.0}  # the divergences Liger's fused JSD covers
EAGER_LOGIT_COPIES = 6  # [N, V] fp32 tensors torch_eager keeps alive (2 logits, 2 log-probs, probs, grad)
MEMORY_HEADROOM = 0.8  # skip a provider whose estimate passes this fraction of the device memory
_COMPILED = {}


def flop_count(n, hs, ht, vs) -> float:
    return 2.0 * n * vs * (hs + ht) + 4.0 * n * vs * hs


def flop_floor(n, hs, ht, vs) -> float:
    """Forward of both heads + dH (frozen student head): the issue's FLOP floor."""
    return 2.0 * n * vs * (2 * hs + ht)


def eager_fits(n: int, vs: int, device) -> bool:
    if torch.device(device).type != "cuda":
        return True
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return n * vs * 4 * EAGER_LOGIT_COPIES <= MEMORY_HEADROOM * total


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


def make_inputs(n, hs, ht, vs, vt, dtype="float32", device="cpu", seed=0, trainable_head=True):
    """(h_s, w_s, h_t, w_t, labels): hidden states at a realistic logit spread, 1 in 9 labels ignored.
    Generated on ``device`` (on a GPU the 0.5-1 G-element heads would take seconds on the CPU)."""
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    h_s = (randn(n, hs) / hs**0.25).to(dt).requires_grad_()
    w_s = (randn(vs, hs) / hs**0.5).to(dt).requires_grad_(trainable_head)
    h_t = (randn(n, ht) / ht**0.25).to(dt)
    w_t = (randn(vt, ht) / ht**0.5).to(dt)
    labels = torch.randint(0, vs, (n,), generator=g, device=device)
    labels[::9] = -100
    return h_s, w_s, h_t, w_t, labels


def loss_fn(provider: str, vs: int, divergence: str, device, beta: float = 0.5, temperature: float = 2.0):
    """``fn(h_s, w_s, h_t, w_t, labels) -> scalar loss`` of a provider."""
    kw = dict(divergence=divergence, beta=beta, temperature=temperature)
    if provider == "torch_eager":
        return lambda *a: fused_linear_kd_loss_naive(*a, **kw).loss
    if provider == "torch_chunked":
        return lambda *a: fused_linear_kd_loss_reference(*a, **kw).loss
    if provider == "torch_compile":
        key = (divergence, beta, temperature)
        if key not in _COMPILED:
            # dynamic shapes: one compile serves every shape of a run (each recompile costs tens of seconds)
            _COMPILED[key] = torch.compile(
                lambda a, b, c, d, y: fused_linear_kd_loss_reference(a, b, c, d, y, **kw).loss, dynamic=True
            )
        return _COMPILED[key]
    if provider.startswith("ddk_fast_chunked_gif"):
        from ddk_fast.ops.reference import make_params

        p = make_params(divergence, beta, temperature)
        return lambda h_s, w_s, h_t, w_t, labels: _ChunkedGradInForward.apply(h_s, w_s, h_t, w_t, labels, p)
    if provider in DDK_PROVIDERS:
        from ddk_fast.losses import fused_linear_kd_loss

        return lambda *a: fused_linear_kd_loss(*a, backend="triton", **kw).loss  # variant: provider_env
    if provider == "liger":
        if divergence not in LIGER_BETA:
            raise ValueError(f"liger: expected a divergence in {tuple(LIGER_BETA)}, got {divergence!r}")
        b = LIGER_BETA[divergence] if divergence != "jsd" else beta
        return liger_jsd(vs, beta=b, temperature=temperature, device=str(device))
    raise ValueError(f"provider: expected one of {CPU_PROVIDERS + GPU_PROVIDERS}, got {provider!r}")


class _ChunkedGradInForward(torch.autograd.Function):
    """Benchmark-only autograd wrapper of the gradient-in-forward prototype ``kd_fwd_bwd_chunked`` (the op
    layer, ddk_fast/ops/, would own this if the GPU run says it wins): the forward computes the loss and its
    gradients at grad_output 1; the backward scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, p):
        from ddk_fast.kernels.kd_chunked import kd_fwd_bwd_chunked
        from ddk_fast.ops.fused_linear_kd import DIV_CODES

        labels = labels.long().contiguous()
        out = kd_fwd_bwd_chunked(
            h_s.detach(), w_s.detach(), h_t.detach(), w_t.detach(), labels, None, w_s.shape[0],
            DIV_CODES[p.divergence], p.beta, p.skew_lambda, p.temperature, p.student_logit_scale,
            p.student_softcap, p.teacher_logit_scale, p.teacher_softcap, p.ignore_index, 0, p.ce_weight,
            p.kd_scale, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        ce, d, grad_h, grad_w = out[1], out[2], out[6], out[7]
        count = (labels != p.ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_s.dtype, w_s.dtype)
        return (p.ce_weight * ce.sum() + p.kd_scale * d.sum()) / count

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad).to(ctx.dtypes[0])
        gw = None if grad_w is None else (grad_w * grad).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None


@contextlib.contextmanager
def provider_env(provider: str):
    """The kernels' switches (``DDK_FAST_KD_VARIANT``, ``DDK_FAST_KD_DS_SPLIT``; read at every launch, forward
    and backward) set for a ddk_fast provider for the duration; a no-op for the other providers."""
    env = DDK_PROVIDER_ENV.get(provider, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_step(provider: str, n: int, hs: int, ht: int, vs: int, vt: int, dtype: str = "float32",
              device: str = "cpu", seed: int = 0, divergence: str = DIVERGENCE,
              trainable_head: bool = True):  # fmt: skip
    """Build inputs; return a closure doing one fwd+bwd step (module level: the CPU memory child calls it)."""
    h_s, w_s, h_t, w_t, labels = make_inputs(n, hs, ht, vs, vt, dtype, device, seed, trainable_head)
    fn = loss_fn(provider, vs, divergence, device)

    def step():
        h_s.grad = None
        w_s.grad = None
        with provider_env(provider):
            fn(h_s, w_s, h_t, w_t, labels).backward()

    step.tensors = (h_s, w_s, h_t, w_t, labels)
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
    if provider == "torch_eager" and not eager_fits(n, vs, "cuda"):
        pytest.skip("eager fp32 logits do not fit in GPU memory at this shape")
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
