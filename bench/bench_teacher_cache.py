"""Offline teacher: training step time and memory online vs from a top-k cache vs from a hidden-state cache,
and each cache's bytes per token.

Workload: the demo (``examples/demo.toml``'s run settings: seq_len 128, batch 8, QLoRA student cut from the
teacher's layers 0 and 3, DDK) on CPU. Assets: ``DDK_BENCH_DEMO_DIR`` (e.g. ``.cache/demo``, built by ``python
-m ddk_fast.demo``: the demo's 4-layer teacher) or, unset, the tiny demo assets built here (``--tiny``: hidden
64, vocab 512). Providers, side by side in one run:

* ``online``: :class:`~ddk_fast.training.trainer.Trainer` as usual: teacher forward + student forward/backward
  + the dense fused KD loss;
* ``topk_k{16,64,256}``: a top-k cache (``--kind topk``): student forward/backward + the sparse-teacher loss,
  the cached rows read by the sampler;
* ``hidden_{bfloat16,float32}``: a hidden-state cache (``--kind hidden``): student forward/backward + the
  dense fused loss on the cached hidden states and ``lm_head`` (float32: the online losses).

Rows (``bench/results/teacher_cache.jsonl``): per step median/IQR (one optimizer step of one micro-batch),
``step_ratio`` = median / online median (same run), peak extra RSS of one step (fresh subprocess); rows of
``teacher_cache_size.jsonl``: each cache's bytes on disk per cached token and the writer's teacher tokens/s.

    DDK_BENCH_DEMO_DIR=.cache/demo DDK_BENCH_RESULTS=bench/results OMP_NUM_THREADS=1 \
        .venv/bin/pytest bench/bench_teacher_cache.py --benchmark-only -q -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import REPO, peak_memory_subprocess, record, time_fn

CACHES = {"topk_k16": ("topk", 16, "bfloat16"), "topk_k64": ("topk", 64, "bfloat16"),
          "topk_k256": ("topk", 256, "bfloat16"), "hidden_bfloat16": ("hidden", 0, "bfloat16"),
          "hidden_float32": ("hidden", 0, "float32")}  # fmt: skip
SMOKE = ("topk_k16", "hidden_bfloat16")  # the CI smoke run builds these two
PROVIDERS = ["online", *CACHES]
ROUNDS = 12
STEPS = 40  # the cache covers a run of this many steps (--epochs auto); the timed steps are fewer
_MEDIANS: dict[str, float] = {}


def _assets(root: Path) -> Path:
    if os.environ.get("DDK_BENCH_DEMO_DIR"):
        return Path(os.environ["DDK_BENCH_DEMO_DIR"]).resolve()
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
    raw["data"]["val_sequences"] = 4  # the --tiny assets hold ~9 val sequences per domain; not timed here
    for dom in raw["data"]["domains"]:
        for key in ("files", "val_files", "test_files"):  # .cache/demo/corpus/[val/|test/]<domain>.jsonl
            if key in dom:
                dom[key] = [str(a / Path(f).relative_to(".cache/demo")) for f in dom[key]]
    raw["output"] = {"dir": run_dir, "progress": False, "tensorboard": False}
    raw["train"]["device"] = "cpu"
    raw["train"]["max_steps"] = STEPS
    raw["train"]["warmup_steps"] = 2
    raw["data"]["prefetch"] = 2
    return build_config(raw)


def make_step(assets: str, run_dir: str, cache: str = ""):
    """A zero-argument callable doing one optimizer step (the factory of the subprocess measurement)."""
    from ddk_fast.training.trainer import Trainer

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
    from ddk_fast.teacher_cache.writer import CacheOptions, build_cache

    smoke = bool(pytestconfig.getoption("benchmark_disable"))  # CI smoke run: two small caches
    for name, (kind, k, dtype) in CACHES.items():
        if smoke and name not in SMOKE:
            continue
        out = root / f"cache_{name}"
        cfg = make_config(str(assets), str(root / "writer"))
        t0 = time.perf_counter()
        m = build_cache(cfg, out, CacheOptions(kind=kind, top_k=k or 64, dtype=dtype))
        wall = time.perf_counter() - t0
        tokens = sum(d["sequences"] for d in m["domains"].values()) * m["seq_len"]
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        caches[name] = out
        if smoke:
            continue
        record(
            "teacher_cache_size",
            {"cache": name, "kind": kind, "top_k": k, "dtype": dtype, "tokens": tokens, "bytes": size,
             "bytes_per_token": size / tokens, "hidden_size": m.get("hidden_size"), "writer_seconds": wall,
             "writer_tokens_per_s": tokens / wall, "median_ms": 0.0},
        )  # fmt: skip
    return root, assets, caches


@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_time_and_memory(benchmark, workspace, provider):
    root, assets, caches = workspace
    if provider != "online" and provider not in caches:
        pytest.skip(f"smoke run (--benchmark-disable): only {', '.join(caches)} are built")
    cache = str(caches[provider]) if provider != "online" else ""
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
