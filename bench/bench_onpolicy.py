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

Each row (``bench/results/onpolicy.jsonl``): step median / IQR, ``step_ratio`` = median / the off-policy
median of the same run; the median per step of the time in generation (``gen_ms``), its share of the step
(``gen_share``), the generated tokens/s and the training tokens/s (the step's ``batch x seq_len`` tokens over
the step time outside generation); peak extra RSS of one step (fresh subprocess).

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

import pytest

from bench.harness import REPO, peak_memory_subprocess, record, time_fn

PROVIDERS = {  # name: (fraction, generate_batch_size, use_cache)
    "offpolicy": (0.0, 0, True),
    "onpolicy_f0.5": (0.5, 0, True),
    "onpolicy_f0.5_gbs1": (0.5, 1, True),
    "onpolicy_f0.5_nocache": (0.5, 0, False),
    "onpolicy_f1.0": (1.0, 0, True),
}
SMOKE = ("onpolicy_f0.5",)  # the CI smoke run (--benchmark-disable): one step with generation
ROUNDS = 10
_MEDIANS: dict[str, float] = {}


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
    for dom in raw["data"]["domains"]:
        dom["files"] = [str(a / "corpus" / Path(f).name) for f in dom["files"]]
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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy_bench")
    return root, _assets(root)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_onpolicy_step_cost(benchmark, workspace, provider):
    root, assets = workspace
    if benchmark.disabled and provider not in SMOKE:
        pytest.skip(f"smoke run (--benchmark-disable): only {', '.join(SMOKE)}")
    run_dir = str(root / f"run_{provider}")
    log: list[tuple[float, float]] = []
    step = make_step(str(assets), run_dir, provider, log)
    t = time_fn(benchmark, step, rounds=ROUNDS, warmup=2)
    cfg = step.trainer.cfg
    fraction = PROVIDERS[provider][0]
    assert (log[-1][1] > 0) == (fraction > 0)  # generation ran exactly when on-policy
    if t["median_ms"] is None:
        return
    log = log[-ROUNDS:]  # the timed rounds
    _MEDIANS[provider] = t["median_ms"]
    off = _MEDIANS.get("offpolicy")
    generated = round(fraction * cfg.data.batch_size) * cfg.onpolicy.max_new_tokens if fraction else 0
    tokens = cfg.data.batch_size * cfg.data.seq_len
    gen_s = statistics.median(g for _, g in log)
    mem = peak_memory_subprocess(
        "bench.bench_onpolicy:make_step",
        {"assets": str(assets), "run_dir": run_dir + "_mem", "provider": provider},
    )
    record(
        "onpolicy",
        {
            "provider": provider, **t, "step_ratio": t["median_ms"] / off if off else None,
            "fraction": fraction, "generate_batch_size": PROVIDERS[provider][1],
            "kv_cache": PROVIDERS[provider][2], "gen_ms": gen_s * 1e3,
            "gen_share": statistics.median(g / s for s, g in log),
            "gen_tokens_per_s": generated / gen_s if gen_s else None,
            "train_tokens_per_s": statistics.median(tokens / (s - g) for s, g in log),
            "peak_mem_mb": mem / 2**20, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
            "prompt_tokens": cfg.onpolicy.prompt_tokens, "max_new_tokens": cfg.onpolicy.max_new_tokens,
            "assets": "demo" if os.environ.get("DDK_BENCH_DEMO_DIR") else "tiny demo",
        },
    )  # fmt: skip
