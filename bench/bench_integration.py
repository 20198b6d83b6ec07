"""What the drop-in integration and the ``validate=`` check cost, measured against the direct call.

- ``integration``: one fwd+bwd step of a tiny-but-not-trivial Llama pair through
  ``ddk_fast.integrations.transformers.distill_loss`` (head lookup, label shift and padding mask done for the
  caller) against the same step written by hand (decoders, shift, flatten, ``fused_linear_kd_loss``).
  Target: <= 3 % overhead.
- ``validate``: ``fused_linear_kd_loss`` fwd+bwd with ``validate=True`` (labels / domain ids range check: one
  fused reduction; on CUDA a device-side assert) and, on CUDA, ``validate="sync"`` (the ValueError path: one
  host sync) against ``validate=False``, plus the check alone in microseconds.

The two sides of each comparison run interleaved in one process (A B, B A, ...; the order alternates), so
load on a shared machine hits both alike; the row carries both medians, their ratio and the median of the
per-pair ratios. Rows: ``bench/results/integration.jsonl`` (+ ``.csv``).

    pytest bench/bench_integration.py --benchmark-disable -q     # smoke (CI): each side runs once
    pytest bench/bench_integration.py --benchmark-only -q -s     # real run, writes the rows
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from bench.harness import record, sync
from ddk_fast import fused_linear_kd_loss
from ddk_fast.integrations.transformers import distill_loss, head_spec
from ddk_fast.ops.params import check_token_values

# small on CPU: many short rounds resolve a few per cent on a shared, noisy machine; few long ones do not
CPU_MODEL = dict(vocab=4096, hidden_s=128, hidden_t=192, layers_s=2, layers_t=2, batch=4, seq=128)
GPU_MODEL = dict(vocab=32768, hidden_s=1024, hidden_t=2048, layers_s=4, layers_t=8, batch=8, seq=1024)
CPU_LOSS = dict(n=2048, h=256, v=8192)
GPU_LOSS = dict(n=8192, h=2048, v=128256)


def _llama(vocab, hidden, layers, seed, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads)  # fmt: skip
    return LlamaForCausalLM(cfg).to(device, dtype)


def make_integration_steps(vocab, hidden_s, hidden_t, layers_s, layers_t, batch, seq, device="cpu",
                           dtype=torch.float32):  # fmt: skip
    """``{"direct": step, "distill_loss": step}``: the same fwd+bwd, by hand and through the integration."""
    student = _llama(vocab, hidden_s, layers_s, 0, device, dtype)
    teacher = _llama(vocab, hidden_t, layers_t, 1, device, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2 :] = 0  # one padded row
    b = {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=ids).items()}
    kw = dict(divergence="jsd", beta=0.5, temperature=2.0, kd_weight=0.5, ce_weight=1.0)

    def direct():
        # use_cache=False as distill_loss does (the default builds a KV cache nobody reads)
        kw_in = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        s = student.model(**kw_in).last_hidden_state
        with torch.no_grad():
            t = teacher.model(**kw_in).last_hidden_state
        labels = b["labels"].masked_fill(b["attention_mask"] == 0, -100)
        labels = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], 1).reshape(-1)
        loss = fused_linear_kd_loss(s.reshape(-1, hidden_s), student.lm_head.weight, t.reshape(-1, hidden_t),
                                    teacher.lm_head.weight, labels, **kw).loss  # fmt: skip
        loss.backward()
        student.zero_grad(set_to_none=True)

    def integrated():
        distill_loss(student, teacher, b, **kw).loss.backward()
        student.zero_grad(set_to_none=True)

    def lookups():  # the integration's only work the direct step does not do (labels: both shift and mask)
        head_spec(student), head_spec(teacher)

    assert head_spec(student)["softcap"] == 0.0  # the direct step applies no logit transform either
    return {"direct": direct, "distill_loss": integrated, "lookups": lookups}


def make_validate_steps(n, h, v, device="cpu", dtype=torch.float32):
    """``{False: step, True: step, "sync": step}``: fused_linear_kd_loss fwd+bwd per ``validate`` mode, and
    ``"check_only"``: the default check alone."""
    g = torch.Generator().manual_seed(0)
    h_s = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype).requires_grad_()
    w_s = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    h_t = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype)
    w_t = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    dom = torch.randint(0, 4, (n,), generator=g).to(device)

    def step(validate):
        def fn():
            out = fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, dom, num_domains=4, validate=validate)
            out.loss.backward()
            h_s.grad = w_s.grad = None

        return fn

    def check_only():
        check_token_values(labels, dom, v, 4, -100, sync=labels.device.type == "cpu")

    return {False: step(False), True: step(True), "sync": step("sync"), "check_only": check_only}


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread on CPU: on a shared 2-core box, two threads fighting other jobs swung the same
    step by 2x between rounds; one thread resolves a few per cent (the rows record ``threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _interleaved(benchmark, a, b, device, rounds):
    """Run ``a`` and ``b`` alternately (order flipped every round) under pytest-benchmark; per-side times."""
    times = {"a": [], "b": []}
    flip = [False]

    def pair():
        order = (("b", b), ("a", a)) if flip[0] else (("a", a), ("b", b))
        flip[0] = not flip[0]
        for name, fn in order:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(pair, rounds=rounds, warmup_rounds=1, iterations=1)
    if getattr(benchmark, "disabled", False):
        return None
    ta, tb = times["a"][1:], times["b"][1:]  # the warm-up pair is dropped
    return {
        "median_a_ms": statistics.median(ta) * 1e3,
        "median_b_ms": statistics.median(tb) * 1e3,
        "ratio": statistics.median(tb) / statistics.median(ta),
        "pair_ratio_median": statistics.median(y / x for x, y in zip(ta, tb)),
        "ratio_min": min(tb) / min(ta),  # best case of each side: the least disturbed by other load
        "rounds": len(ta),
    }


def _device_cases():
    """(device, model shape, loss shape, dtype, (integration rounds, validate rounds))."""
    return [("cpu", CPU_MODEL, CPU_LOSS, torch.float32, (61, 15))] + (
        [("cuda", GPU_MODEL, GPU_LOSS, torch.bfloat16, (50, 50))] if torch.cuda.is_available() else []
    )


@pytest.mark.parametrize("case", _device_cases(), ids=lambda c: c[0])
def test_integration_overhead(benchmark, case):
    device, model, _, dtype, rounds = case
    steps = make_integration_steps(**model, device=device, dtype=dtype)
    benchmark.group = "integration overhead"
    res = _interleaved(benchmark, steps["direct"], steps["distill_loss"], device, rounds[0])
    if res is None:
        return
    t0 = time.perf_counter()
    for _ in range(1000):
        steps["lookups"]()
    lookup_us = (time.perf_counter() - t0) / 1000 * 1e6
    row = {"bench": "integration_overhead", "a": "direct", "b": "distill_loss", **model, "dtype": str(dtype),
           **res, "head_lookups_us": lookup_us}  # fmt: skip
    record("integration", row, device=device, force=True)  # force: the row has two medians, no median_ms
    print(f"\n{device} distill_loss / direct = {res['ratio']:.4f} (pairs: {res['pair_ratio_median']:.4f}, "
          f"min: {res['ratio_min']:.4f}); "
          f"head lookups {lookup_us:.1f} us")  # fmt: skip


@pytest.mark.parametrize("mode", [True, "sync"], ids=["validate=True", "validate=sync"])
@pytest.mark.parametrize("case", _device_cases(), ids=lambda c: c[0])
def test_validate_cost(benchmark, case, mode):
    device, _, loss, dtype, rounds = case
    if mode == "sync" and device == "cpu":
        pytest.skip("on CPU validate='sync' is validate=True (no device to synchronise)")
    steps = make_validate_steps(**loss, device=device, dtype=dtype)
    benchmark.group = "validate cost"
    res = _interleaved(benchmark, steps[False], steps[mode], device, rounds[1])
    if res is None:
        steps["check_only"]()
        return
    sync(device)
    t0 = time.perf_counter()
    for _ in range(100):
        steps["check_only"]()
    sync(device)
    check_us = (time.perf_counter() - t0) / 100 * 1e6
    row = {"bench": "validate_cost", "a": "validate=False", "b": f"validate={mode!r}", **loss,
           "dtype": str(dtype), **res, "check_only_us": check_us}  # fmt: skip
    record("integration", row, device=device, force=True)
    print(f"\n{device} validate={mode!r} / False = {res['ratio']:.4f}; the check alone {check_us:.1f} us")
