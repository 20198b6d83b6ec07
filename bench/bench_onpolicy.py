"""On-policy distillation's cost: an optimizer step with and without the student's generation, and where its
time goes.

Workload: ``examples/onpolicy.toml``'s run settings on the demo (seq_len 128, batch 8, prompts of 64 tokens
continued by 64, QLoRA student cut from the teacher's layers 0 and 3, generalised JSD), on CPU. Assets:
``DDK_BENCH_DEMO_DIR`` (e.g. ``.cache/demo``, built by ``python -m ddk_fast.demo``) or, unset, the tiny demo
assets built here. Providers, side by side in one run (each one optimizer step of one micro-batch):

* ``offpolicy``: ``[onpolicy] fraction = 0`` (the plain DDK step);
* ``onpolicy_f0.5``: half of the 8 rows generated, the 4 prompts in one ``generate`` call (batched);
* ``onpolicy_f0.5_gbs1``: the same, one prompt per ``generate`` call (unbatched);
* ``onpolicy_f0.5_nocache``: the same, batched, without the KV cache (the whole prefix recomputed for
  every new token: what the cache saves);
* ``onpolicy_f1.0``: every row generated.

The providers are built in one process and stepped in turn, ``ROUNDS`` rounds (a shared machine's load
hits all of them alike). Each row (``bench/results/onpolicy.jsonl``): step median / IQR, ``step_ratio`` =
median / the off-policy median, ``paired_step_ratio`` = the median over rounds of the ratio to the
off-policy step of the same round; the median per step of the time in generation (``gen_ms``), its share
of the step (``gen_share``), the generated tokens/s and the training tokens/s (the step's ``batch x
seq_len`` tokens over the step time outside generation); peak extra RSS of one step (fresh subprocess).

    DDK_BENCH_DEMO_DIR=.cache/demo OMP_NUM_THREADS=1 \
        .venv/bin/pytest bench/bench_onpolicy.py --benchmark-only -q -s
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import REPO, peak_memory_subprocess, record

PROVIDERS = {  # name: (fraction, generate_batch_size, use_cache)
    "offpolicy": (0.0, 0, True),
    "onpolicy_f0.5": (0.5, 0, True),
    "onpolicy_f0.5_gbs1": (0.5, 1, True),
    "onpolicy_f0.5_nocache": (0.5, 0, False),
    "onpolicy_f1.0": (1.0, 0, True),
}
SMOKE = ("onpolicy_f0.5",)  # the CI smoke run (--benchmark-disable): one step with generation
ROUNDS, WARMUP = 15, 2


def _assets(root: Path) -> Path:
    if os.environ.get("DDK_BENCH_DEMO_DIR"):
        return Path(os.environ["DDK_BENCH_DEMO_DIR"]).resolve()
    out = root / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ddk_fast.demo", "--tiny", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return out


def make_config(assets: str, run_dir: str, provider: str):
    import tomllib

    from ddk_fast.config import build_config

    fraction, gbs, _ = PROVIDERS[provider]
    raw = tomllib.loads((REPO / "examples" / "onpolicy.toml").read_text())
    a = Path(assets)
    raw["model"]["teacher"] = str(a / "teacher")
    raw["data"]["cache_dir"] = str(a / "shards")
    raw["data"]["val_sequences"] = 4  # the --tiny assets hold ~9 val sequences per domain; not timed here
    for dom in raw["data"]["domains"]:
        for key in ("files", "val_files", "test_files"):  # .cache/demo/corpus/[val/|test/]<domain>.jsonl
            if key in dom:
                dom[key] = [str(a / Path(f).relative_to(".cache/demo")) for f in dom[key]]
    raw["onpolicy"].update(fraction=fraction, generate_batch_size=gbs)
    raw["output"] = {"dir": run_dir, "progress": False, "tensorboard": False}
    raw["train"].update(device="cpu", max_steps=1000, warmup_steps=2)
    return build_config(raw)


def make_step(assets: str, run_dir: str, provider: str, log: list | None = None):
    """A zero-argument callable doing one optimizer step (the factory of the subprocess measurement);
    ``log`` gets (step seconds, generation seconds) per call."""
    from ddk_fast.training.trainer import Trainer

    t = Trainer(make_config(assets, run_dir, provider))
    t.setup()
    t.onpolicy.spec = dataclasses.replace(t.onpolicy.spec, use_cache=PROVIDERS[provider][2])
    t.update_weights()
    batches = t._batches()

    def step():
        g0, t0 = t.onpolicy.gen_seconds, time.perf_counter()
        t.train_step(batches)
        if log is not None:
            log.append((time.perf_counter() - t0, t.onpolicy.gen_seconds - g0))

    step.trainer = t
    return step


def _row(provider: str, times: list[tuple[float, float]], off: list[tuple[float, float]], cfg) -> dict:
    """One result row from the interleaved rounds' (step seconds, generation seconds)."""
    fraction, gbs, cache = PROVIDERS[provider]
    steps = [s for s, _ in times]
    q1, _, q3 = statistics.quantiles(steps, n=4)
    gen = statistics.median(g for _, g in times)
    generated = round(fraction * cfg.data.batch_size) * cfg.onpolicy.max_new_tokens
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {
        "provider": provider, "median_ms": statistics.median(steps) * 1e3, "iqr_ms": (q3 - q1) * 1e3,
        "min_ms": min(steps) * 1e3, "rounds": len(times),
        "step_ratio": statistics.median(steps) / statistics.median(s for s, _ in off),
        "paired_step_ratio": statistics.median(a[0] / b[0] for a, b in zip(times, off)),
        "fraction": fraction, "generate_batch_size": gbs, "kv_cache": cache, "gen_ms": gen * 1e3,
        "gen_share": statistics.median(g / s for s, g in times),
        "gen_tokens_per_s": generated / gen if gen else None,
        "train_tokens_per_s": statistics.median(tokens / (s - g) for s, g in times),
        "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
        "prompt_tokens": cfg.onpolicy.prompt_tokens, "max_new_tokens": cfg.onpolicy.max_new_tokens,
        "assets": "demo" if os.environ.get("DDK_BENCH_DEMO_DIR") else "tiny demo",
    }  # fmt: skip


def test_onpolicy_step_cost(benchmark, tmp_path):
    """Every provider built in one process, then ``ROUNDS`` rounds that step each provider once in turn (so
    the load of a shared machine hits all alike); the smoke run (``--benchmark-disable``) steps one
    on-policy provider once."""
    assets = _assets(tmp_path)
    names = list(SMOKE) if benchmark.disabled else list(PROVIDERS)
    logs = {p: [] for p in names}
    steps = {p: make_step(str(assets), str(tmp_path / f"run_{p}"), p, logs[p]) for p in names}

    def one_round():
        for p in names:
            steps[p]()

    # pytest-benchmark times the rounds (all providers); the per-provider statistics come from the logs
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    for p in names:  # generation ran exactly when on-policy
        assert (logs[p][-1][1] > 0) == (PROVIDERS[p][0] > 0), p
    if benchmark.disabled:
        return
    off = logs["offpolicy"][WARMUP:]
    for p in names:
        row = _row(p, logs[p][WARMUP:], off, steps[p].trainer.cfg)
        row["peak_mem_mb"] = (
            peak_memory_subprocess(
                "bench.bench_onpolicy:make_step",
                {"assets": str(assets), "run_dir": str(tmp_path / f"mem_{p}"), "provider": p},
            )
            / 2**20
        )
        record("onpolicy", row)
