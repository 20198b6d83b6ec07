"""Offline teacher: training step time and memory from a teacher cache vs the online teacher, and cache size.

Workload: the demo's tiny assets (``python -m ddk_fast.demo --tiny``: a 4-layer Llama teacher, hidden 64,
vocab 512; the student is its layers 0 and 3, QLoRA), the demo's run settings (seq_len 128, batch 8), on CPU.
Providers, side by side in one run:

* ``online``: :class:`~ddk_fast.trainer.Trainer` as usual: teacher forward + student forward/backward +
  the dense fused KD loss;
* ``cached_k{16,64,256}``: the same trainer with ``[model] teacher_cache`` (top-k cache written by
  ``ddk_fast.teacher_cache``): student forward/backward + the sparse-teacher loss, the cached rows read by the
  sampler.

Rows (``bench/results/teacher_cache.jsonl``): per step median/IQR (one optimizer step of one micro-batch),
``step_ratio`` = median / online median (same run), peak extra RSS of one step (fresh subprocess), and per k
the cache's bytes on disk per million cached tokens and the writer's teacher tokens/s.

    DDK_BENCH_RESULTS=bench/results .venv/bin/pytest bench/bench_teacher_cache.py --benchmark-only -q -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import REPO, peak_memory_subprocess, record, time_fn

TOP_KS = (16, 64, 256)
PROVIDERS = ["online"] + [f"cached_k{k}" for k in TOP_KS]
ROUNDS = 12
# the tiny corpus is a few thousand tokens per domain: cache enough passes for every step of the run
EPOCHS = 6
_MEDIANS: dict[str, float] = {}


def _assets(root: Path) -> Path:
    out = root / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ddk_fast.demo", "--tiny", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return out


def make_config(assets: str, run_dir: str, cache: str = ""):
    import tomllib

    from ddk_fast.config import build_config

    raw = tomllib.loads((REPO / "examples" / "demo.toml").read_text())
    a = Path(assets)
    raw["model"]["teacher"] = str(a / "teacher")
    raw["model"]["teacher_cache"] = cache
    raw["data"]["cache_dir"] = str(a / "shards")
    for dom in raw["data"]["domains"]:
        dom["files"] = [str(a / "corpus" / Path(f).name) for f in dom["files"]]
    raw["output"] = {"dir": run_dir, "progress": False, "tensorboard": False}
    raw["train"]["device"] = "cpu"
    raw["data"]["prefetch"] = 2
    return build_config(raw)


def make_step(assets: str, run_dir: str, cache: str = ""):
    """A zero-argument callable doing one optimizer step (the factory of the subprocess measurement)."""
    from ddk_fast.trainer import Trainer

    t = Trainer(make_config(assets, run_dir, cache))
    t.setup()
    t.update_weights()
    batches = t._batches()
    return lambda: t.train_step(batches)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pytestconfig):
    root = tmp_path_factory.mktemp("teacher_cache_bench")
    assets = _assets(root)
    caches = {}
    from ddk_fast.teacher_cache.writer import build_cache

    smoke = bool(pytestconfig.getoption("benchmark_disable"))  # CI smoke run: one small cache
    for k in TOP_KS[:1] if smoke else TOP_KS:
        out = root / f"cache_k{k}"
        cfg = make_config(str(assets), str(root / "writer"))
        t0 = time.perf_counter()
        m = build_cache(cfg, out, k, epochs=EPOCHS)
        wall = time.perf_counter() - t0
        tokens = sum(d["sequences"] for d in m["domains"].values()) * m["seq_len"]
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        caches[k] = out
        if smoke:
            continue
        record(
            "teacher_cache_size",
            {"top_k": k, "tokens": tokens, "bytes": size, "mb_per_million_tokens": size / tokens,
             "writer_seconds": wall, "writer_tokens_per_s": tokens / wall, "median_ms": 0.0},
        )  # fmt: skip
    return root, assets, caches


@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_time_and_memory(benchmark, workspace, provider):
    root, assets, caches = workspace
    k = 0 if provider == "online" else int(provider.split("_k")[1])
    if k and k not in caches:
        pytest.skip(f"smoke run (--benchmark-disable): only k = {min(caches)} is built")
    cache = str(caches[k]) if k else ""
    run_dir = str(root / f"run_{provider}")
    step = make_step(str(assets), run_dir, cache)
    t = time_fn(benchmark, step, rounds=ROUNDS, warmup=2)
    if t["median_ms"] is None:
        return
    _MEDIANS[provider] = t["median_ms"]
    online = _MEDIANS.get("online")
    mem = peak_memory_subprocess(
        "bench.bench_teacher_cache:make_step",
        {"assets": str(assets), "run_dir": run_dir + "_mem", "cache": cache},
    )
    record(
        "teacher_cache",
        {"provider": provider, **t, "step_ratio": t["median_ms"] / online if online else None,
         "peak_mem_mb": mem / 2**20, "seq_len": 128, "batch_size": 8},
    )  # fmt: skip
