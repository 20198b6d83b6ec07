"""KD loss, fwd+bwd: eager torch vs chunked torch vs torch.compile vs our Triton variants vs Liger, one run.

CPU (one subprocess per variant, so each has its own memory; the names are the ``impl`` column of the CPU
rows; fp32, forward + backward, only the hidden states require grad, heads frozen as in a LoRA/QLoRA head):
- ``naive_eager``: ``fused_linear_kd_loss_naive`` (materialised logits + autograd), CE + forward KL;
- ``naive_compile``: ``torch.compile`` (default mode) of the same function; compile time recorded apart;
- ``chunked_torch``: ``ddk_fast.fused_linear_kd_loss(..., backend="torch")``, CE + forward KL;
- ``chunked_torch_ce_only``: the same with ``kd_weight=0`` (CE only);
- ``torch_linear_ce``: ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``
  defaults (core PyTorch's chunked path), CE only;
- ``naive_ce``: ``F.linear`` + ``F.cross_entropy`` (materialised logits), CE only.
A child builds its inputs, calls the step once (imports, allocator, compile), clears the gradients, runs
``gc.collect()``, reads VmRSS, resets the peak (``5 > /proc/self/clear_refs``), runs ``CPU_CALLS`` timed
calls and reads VmHWM: ``peak_extra_mb`` = (VmHWM - VmRSS before) / 2^20, ``ms`` = median of the timed
calls. glibc returns every block >= 64 KiB to the kernel on free (the harness's child environment), so RSS
follows the live tensors. ``chunked_torch_import`` rows: wall time and RSS growth of ``import torch``, of
``import ddk_fast`` after it, and of the first loss call (fwd + bwd) against the second.
``test_chunked_peak_memory_guard`` (in the CI smoke run) fails when the chunked path's peak extra memory
passes ``GUARD_FACTOR`` x its documented bound (:func:`documented_bound_bytes`).

    python -m bench.bench_kd_loss --run                          # CPU rows -> bench/results/kd_loss.*
    python -m bench.bench_kd_loss --run --shape n2048-h512-v32000 --variant chunked_torch naive_ce
    python -m bench.bench_kd_loss --child --variant chunked_torch --shape n512-h256-v32000 --chunk 128

GPU providers (pytest-benchmark, side by side in one run; the names are the ``impl`` column of the GPU rows):
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

    pytest bench/bench_kd_loss.py --benchmark-disable -q         # smoke (CI): CPU variants once + the guard
    pytest bench/bench_kd_loss.py --benchmark-only -q -m gpu     # GPU run, writes bench/results/kd_loss.*
    python -m bench.gpu.kd_loss_matrix --out DIR                 # the GPU matrix -> DIR/gpu_kd_loss.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.harness import (
    REPO,
    child_env,
    env_info,
    matmul_tflops,
    peak_memory,
    record,
    reset_peak_rss,
    status_kib,
    tflops,
    time_fn,
)
from ddk_fast import fused_linear_kd_loss
from ddk_fast.ops import reference as kd_reference
from ddk_fast.ops.naive import fused_linear_kd_loss_naive
from ddk_fast.ops.reference import fused_linear_kd_loss_reference

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
    raise ValueError(f"provider: expected one of {GPU_PROVIDERS} or 'torch_chunked', got {provider!r}")


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


# ------------------------------------------------------------------------------------------------ CPU

CPU_SHAPES = {  # name: (N, H_s, H_t, V_s, V_t); the issue's CPU shapes, then the guard's
    "n2048-h512-v32000": (2048, 512, 512, 32000, 32000),
    "n2048-h512-v151936": (2048, 512, 512, 151936, 151936),
    "n512-h256-v32000": (512, 256, 256, 32000, 32000),
    "n64-h32-v1271": (64, 32, 48, 1271, 1280),  # the smoke test's: a vocab that is no multiple of a block
}
CPU_RUN_SHAPES = ("n2048-h512-v32000", "n2048-h512-v151936")  # what `--run` measures by default
CPU_VARIANTS = ("naive_eager", "naive_compile", "chunked_torch", "chunked_torch_ce_only", "torch_linear_ce",
                "naive_ce")  # fmt: skip
CPU_CE_ONLY = ("chunked_torch_ce_only", "torch_linear_ce", "naive_ce")
CPU_CALLS = 3  # timed calls after the warm-up (the median is reported)
GUARD_SHAPE = "n512-h256-v32000"
GUARD_CHUNK = 128  # 512 rows -> 4 chunks: the loop, not one tile, is measured
GUARD_FACTOR = 1.5
CHILD_TIMEOUT_S = 3600.0
# "mmap": glibc returns every freed block >= 64 KiB (RSS = live tensors; the guard's and the default rows');
# "glibc": glibc's defaults (freed tiles may stay in the heap: what a user's process shows)
MALLOC_MODES = ("mmap", "glibc")
_CPU_COMPILED = {}


def documented_bound_bytes(n: int, v: int, h: int, chunk: int | None = None) -> int:
    """The chunked CPU path's documented peak extra memory (``fused_linear_kd_loss_reference``'s docstring:
    ~ 6 x chunk_size x V_s x 4 bytes) plus the gradient it returns (``grad_h``, N x H_s x 4 bytes).
    ``ddk_fast.ops.reference.peak_extra_bytes(n, v, h, chunk)`` is used when the library exposes it."""
    chunk = chunk or kd_reference.auto_chunk_size(n, v)
    if hasattr(kd_reference, "peak_extra_bytes"):
        return int(kd_reference.peak_extra_bytes(n, v, h, chunk))
    return 6 * chunk * v * 4 + n * h * 4


def _naive_kd(h_s, w_s, h_t, w_t, labels):
    return fused_linear_kd_loss_naive(h_s, w_s, h_t, w_t, labels, divergence="forward_kl").loss


def cpu_loss_fn(variant: str, chunk: int | None = None):
    """``fn(h_s, w_s, h_t, w_t, labels) -> scalar loss`` of a CPU variant (module docstring)."""
    if variant == "naive_eager":
        return _naive_kd
    if variant == "naive_compile":
        if "naive" not in _CPU_COMPILED:
            _CPU_COMPILED["naive"] = torch.compile(_naive_kd)
        return _CPU_COMPILED["naive"]
    if variant in ("chunked_torch", "chunked_torch_ce_only"):
        kd_weight = 0.0 if variant == "chunked_torch_ce_only" else 1.0
        return lambda h_s, w_s, h_t, w_t, labels: fused_linear_kd_loss(
            h_s, w_s, h_t, w_t, labels, divergence="forward_kl", kd_weight=kd_weight, backend="torch",
            chunk_size=chunk,
        ).loss  # fmt: skip
    if variant == "torch_linear_ce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h_s, w_s, h_t, w_t, labels: F.linear_cross_entropy(h_s, w_s, labels, options=options)
    if variant == "naive_ce":
        return lambda h_s, w_s, h_t, w_t, labels: F.cross_entropy(F.linear(h_s, w_s), labels)
    raise ValueError(f"variant: expected one of {CPU_VARIANTS}, got {variant!r}")


def make_cpu_step(variant: str, shape: str, chunk: int | None = None, seed: int = 0):
    """Inputs of ``CPU_SHAPES[shape]`` (fp32, heads frozen) and a closure doing one fwd + bwd step."""
    n, hs, ht, vs, vt = CPU_SHAPES[shape]
    h_s, w_s, h_t, w_t, labels = make_inputs(n, hs, ht, vs, vt, "float32", "cpu", seed, trainable_head=False)
    fn = cpu_loss_fn(variant, chunk)

    def step():
        h_s.grad = None
        loss = fn(h_s, w_s, h_t, w_t, labels)
        loss.backward()
        return loss.detach()

    step.tensors = (h_s, w_s, h_t, w_t, labels)
    return step


def cpu_child(variant: str, shape: str, calls: int = CPU_CALLS, chunk: int | None = None) -> dict:
    """Runs in the child process (``--child``): warm-up, then the timed calls under a reset VmHWM."""
    step = make_cpu_step(variant, shape, chunk)
    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    step.tensors[0].grad = None  # the base must not hold a gradient the next call frees
    gc.collect()
    base = status_kib("VmRSS")
    reset_peak_rss()
    if status_kib("VmHWM") > base + 1024:
        raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM: cannot measure peak RSS")
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = status_kib("VmHWM")
    return {
        "times_ms": times, "first_call_s": first_s, "base_rss_mb": base / 1024,
        "peak_extra_bytes": max(0, peak - base) * 1024, "loss": float(loss),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def run_cpu_child(variant: str, shape: str, calls: int = CPU_CALLS, chunk: int | None = None,
                  malloc: str = "mmap") -> dict:  # fmt: skip
    """:func:`cpu_child` in a fresh process (``harness.child_env``; ``malloc`` in ``MALLOC_MODES``)."""
    args = ["--child", "--variant", variant, "--shape", shape, "--calls", str(calls)]
    args += ["--chunk", str(chunk)] if chunk else []
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_kd_loss", *args], cwd=REPO, env=child_env(malloc == "mmap"),
        capture_output=True,
        text=True, timeout=CHILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"kd_loss child {variant} {shape} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# `import ddk_fast` and the first loss call, measured in a bare interpreter (nothing of bench/ imported: the
# bench module itself imports ddk_fast). argv: n h v.
_IMPORT_CHILD = r"""
import json, sys, time
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
def mark():
    return time.perf_counter(), kib("VmRSS"), len(sys.modules)
n, h, v = map(int, sys.argv[1:4])
m0 = mark()
import torch
m1 = mark()
import ddk_fast
m2 = mark()
g = torch.Generator().manual_seed(0)
h_s = (torch.randn(n, h, generator=g) / h**0.25).requires_grad_()
w_s, w_t = torch.randn(v, h, generator=g) / h**0.5, torch.randn(v, h, generator=g) / h**0.5
h_t = torch.randn(n, h, generator=g) / h**0.25
labels = torch.randint(0, v, (n,), generator=g)
def call():
    h_s.grad = None
    ddk_fast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, backend="torch").loss.backward()
m3 = mark()
call()
m4 = mark()
call()
m5 = mark()
d = lambda a, b: {"s": b[0] - a[0], "rss_mb": (b[1] - a[1]) / 1024, "modules": b[2] - a[2]}
print(json.dumps({"import_torch": d(m0, m1), "import_ddk_fast": d(m1, m2), "first_call": d(m3, m4),
                  "second_call": d(m4, m5)}))
"""


def run_import_child(shape: str) -> dict:
    n, hs, _, vs, _ = CPU_SHAPES[shape]
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHILD, str(n), str(hs), str(vs)], cwd=REPO, env=child_env(),
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"import-cost child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _shape_cols(shape: str) -> dict:
    n, hs, ht, vs, vt = CPU_SHAPES[shape]
    return {"shape": shape, "N": n, "H_s": hs, "H_t": ht, "V_s": vs, "V_t": vt, "dtype": "float32"}


def _stamp(row: dict) -> dict:
    env = env_info("cpu")
    return {**row, "machine": env["device"], "commit": env["git_sha"]}


def run_cpu(
    shapes=CPU_RUN_SHAPES, variants=CPU_VARIANTS, calls: int = CPU_CALLS, malloc="mmap"
) -> list[dict]:
    """Every variant at every shape, one child each, rows appended to bench/results/kd_loss.{jsonl,csv}."""
    rows = []
    for shape in shapes:
        if "chunked_torch" in variants and malloc == "mmap":
            load = _loadavg()
            cost = run_import_child(shape)
            row = {"bench": "kd_loss_cpu_import", "impl": "chunked_torch_import", **_shape_cols(shape),
                   "load_before": load, "load_after": _loadavg()}  # fmt: skip
            for part, vals in cost.items():
                row.update({f"{part}_{k}": v for k, v in vals.items()})
            rows.append(record("kd_loss", _stamp(row), force=True))
            print(json.dumps(row), flush=True)
        for variant in variants:
            load = _loadavg()
            res = run_cpu_child(variant, shape, calls, malloc=malloc)
            ms = statistics.median(res["times_ms"])
            n, hs, _, vs, _ = CPU_SHAPES[shape]
            row = {
                "bench": "kd_loss_cpu", "impl": variant, **_shape_cols(shape), "ms": ms,
                "peak_extra_mb": res["peak_extra_bytes"] / 2**20,
                "compile_s": res["first_call_s"] - ms / 1e3 if variant == "naive_compile" else None,
                "first_call_s": res["first_call_s"], "times_ms": res["times_ms"], "rounds": calls,
                "loss": res["loss"], "base_rss_mb": res["base_rss_mb"], "ce_only": variant in CPU_CE_ONLY,
                "documented_bound_mb": documented_bound_bytes(n, vs, hs) / 2**20
                if variant.startswith("chunked_torch") else None,
                "load_before": load, "load_after": _loadavg(), "malloc": malloc,
            }  # fmt: skip
            rows.append(record("kd_loss", _stamp(row), force=True))
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", action="store_true", help="measure every variant, one child each; record rows")
    mode.add_argument("--child", action="store_true", help="(internal) measure one variant, print JSON")
    ap.add_argument("--variant", nargs="+", choices=CPU_VARIANTS, default=list(CPU_VARIANTS))
    ap.add_argument("--shape", nargs="+", choices=list(CPU_SHAPES), default=list(CPU_RUN_SHAPES))
    ap.add_argument("--calls", type=int, default=CPU_CALLS)
    ap.add_argument("--malloc", choices=MALLOC_MODES, default="mmap", help="see MALLOC_MODES")
    ap.add_argument("--chunk", type=int, default=None, help="chunk_size of the chunked variants (child only)")
    a = ap.parse_args(argv)
    if a.child:
        if len(a.variant) != 1 or len(a.shape) != 1:
            raise SystemExit("--child: expected exactly one --variant and one --shape")
        print(json.dumps(cpu_child(a.variant[0], a.shape[0], a.calls, a.chunk)))
    else:
        run_cpu(a.shape, a.variant, a.calls, a.malloc)


def test_cpu_variants_agree():
    """Smoke (CI): every CPU variant runs once at a tiny shape; KD variants agree with each other and
    CE-only variants with each other, loss and grad_h."""
    out = {}
    for variant in CPU_VARIANTS:
        step = make_cpu_step(variant, "n64-h32-v1271", chunk=16)
        loss = step()
        out[variant] = (loss, step.tensors[0].grad.clone())
        assert step.tensors[1].grad is None, f"{variant}: the frozen head got a gradient"
    for group in (("naive_eager", "naive_compile", "chunked_torch"), CPU_CE_ONLY):
        for v in group[1:]:
            torch.testing.assert_close(out[v][0], out[group[0]][0], rtol=1e-5, atol=1e-6, msg=f"{v} loss")
            torch.testing.assert_close(out[v][1], out[group[0]][1], rtol=1e-4, atol=1e-6, msg=f"{v} grad_h")


def test_chunked_peak_memory_guard():
    """The chunked path's peak extra memory (one child, >= 4 chunks) stays within GUARD_FACTOR x its
    documented bound. Memory is reproducible; time is not, so nothing here asserts a time."""
    n, hs, _, vs, _ = CPU_SHAPES[GUARD_SHAPE]
    assert -(-n // GUARD_CHUNK) >= 4
    res = run_cpu_child("chunked_torch", GUARD_SHAPE, calls=1, chunk=GUARD_CHUNK)
    bound = documented_bound_bytes(n, vs, hs, GUARD_CHUNK)
    measured = res["peak_extra_bytes"]
    assert measured <= GUARD_FACTOR * bound, (
        f"chunked_torch at {GUARD_SHAPE}, chunk_size {GUARD_CHUNK}: peak extra memory measured "
        f"{measured / 2**20:.1f} MB > {GUARD_FACTOR} x the documented bound {bound / 2**20:.1f} MB "
        f"(= {GUARD_FACTOR * bound / 2**20:.1f} MB; bound: bench.bench_kd_loss.documented_bound_bytes)"
    )


if __name__ == "__main__":
    main()
