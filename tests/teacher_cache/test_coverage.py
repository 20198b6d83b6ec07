"""A cached run never fails mid-way: ``--epochs auto`` caches what the run can draw in the worst case its
mixing allows, training refuses a too-small cache before step 1 naming every short domain, and a version-1
(top-k, pre-``kind``) manifest still opens."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ddk_fast.config import build_config, dump_toml
from ddk_fast.ddk import DomainMixer
from ddk_fast.teacher_cache import open_cache
from ddk_fast.teacher_cache.__main__ import main as cache_main
from ddk_fast.teacher_cache.coverage import sequences_needed, update_steps
from ddk_fast.train import main as train_main

from ..tiny import make_cfg


def _walk(weights_per_window: list[np.ndarray], draws_per_window: list[int]) -> np.ndarray:
    """Sequences per domain drawn by the sampler's largest-deficit walk (window reset at each update)."""
    counts = np.zeros(len(weights_per_window[0]), dtype=np.int64)
    for w, m in zip(weights_per_window, draws_per_window):
        window = np.zeros_like(counts)
        for _ in range(m):
            d = int(np.argmax(w * float(window.sum() + 1) - window))
            window[d] += 1
        counts += window
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_the_bound_holds_for_adversarial_weights(assets, tmp_path, seed):
    rng = random.Random(seed)
    mixing = rng.choice(["ddk", "uniform", "static"])
    over = dict(
        ddk__mixing=mixing,
        ddk__alpha=rng.choice([0.0, 0.5, 0.9, 1.0]),
        ddk__factor=rng.choice(["paper", "excess_loss"]),
        ddk__interval=rng.choice([1, 2, 3, 5]),
        ddk__max_weight=rng.choice([1.0, 0.5]),
        train__max_steps=rng.choice([6, 11, 20]),
        data__batch_size=rng.choice([2, 4]),
        train__grad_accum=rng.choice([1, 3]),
    )
    cfg = make_cfg(assets, tmp_path / "run", **over)
    need = sequences_needed(cfg)
    n = len(cfg.data.domains)
    mixer = DomainMixer(n, mixing, cfg.ddk.alpha, True, [d.weight for d in cfg.data.domains],
                        factor=cfg.ddk.factor, max_weight=cfg.ddk.max_weight)  # fmt: skip
    bounds = np.array(mixer.weight_bounds())
    starts = update_steps(cfg) + [cfg.train.max_steps]
    draws = [(b - a) * cfg.data.batch_size * cfg.train.grad_accum for a, b in zip(starts, starts[1:])]
    for target in range(n):  # every window gives one domain all it can get, the others share the rest
        w = np.full(n, (1 - min(1.0, bounds[target])) / (n - 1))
        w[target] = min(1.0, bounds[target])
        counts = _walk([w] * len(draws), draws)
        assert counts[target] <= need[target], (over, counts, need)


@pytest.mark.parametrize("factor", ["paper", "excess_loss"])
@pytest.mark.parametrize("smoothing", [True, False])
@pytest.mark.parametrize("alpha, max_weight", [(0.5, 1.0), (1.0, 1.0), (0.2, 0.4), (0.9, 0.5)])
def test_ddk_weights_never_exceed_their_bound(factor, smoothing, alpha, max_weight):
    rng = np.random.default_rng(0)
    mixer = DomainMixer(4, "ddk", alpha, smoothing, factor=factor, factor_temperature=0.5,
                        max_weight=max_weight)  # fmt: skip
    bound = mixer.weight_bounds()
    for step in range(40):  # gaps from tiny to several nats, one domain far behind now and then
        teacher = rng.uniform(1, 3, 4)
        student = teacher + rng.exponential(rng.choice([0.01, 0.5, 5.0]), 4)
        w = mixer.update(step, student.tolist(), teacher.tolist())
        assert all(x <= b + 1e-12 for x, b in zip(w, bound)), (w, bound)


def test_ddk_run_from_a_default_cache_finishes(assets, tmp_path):
    """The README's offline-teacher steps with the defaults: cache (--epochs auto), then a DDK run."""
    cfg = make_cfg(assets, tmp_path / "run", train__max_steps=9, ddk__interval=3, ddk__alpha=1.0)
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(cfg))
    out = tmp_path / "cache"
    assert cache_main(["--config", str(path), "--top-k", "8", "--out", str(out)]) == 0
    held = {name: d["sequences"] for name, d in open_cache(out).manifest["domains"].items()}
    assert list(held.values()) == sequences_needed(cfg)
    assert train_main(["--config", str(path), "--set", f"model.teacher_cache={out}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 9


def test_a_too_small_cache_is_refused_before_step_one(assets, tmp_path, capsys):
    cfg = make_cfg(assets, tmp_path / "run", train__max_steps=9)
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(cfg))
    out = tmp_path / "cache"
    assert cache_main(["--config", str(path), "--top-k", "4", "--out", str(out), "--epochs", "0.05"]) == 0
    capsys.readouterr()
    rc = train_main(["--config", str(path), "--set", f"model.teacher_cache={out}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is too small for this run" in err and "--epochs auto" in err
    for name in ("arith", "words", "code"):
        assert f"'{name}' needs up to" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step trained


def test_a_version_1_topk_manifest_still_opens(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", train__max_steps=3)
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(cfg))
    out = tmp_path / "cache"
    assert cache_main(["--config", str(path), "--top-k", "4", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    del m["kind"]
    m["version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    store = open_cache(out)
    assert store.kind == "topk" and store.files["ids"][1] == (4,)


def test_curriculum_counts_each_stage(assets, tmp_path):
    """Explicit stages: a domain added last is needed only for its stage; ranked stages count everywhere."""
    stages = [{"steps": 4, "domains": ["arith", "words"]}, {"steps": 4, "domains": ["code"]}]
    cfg = make_cfg(assets, tmp_path / "run", train__max_steps=8, curriculum__stages=stages,
                   curriculum__replay=0.2)  # fmt: skip
    need = sequences_needed(cfg)
    assert need[2] < need[0]  # code: only the last 4 steps
    ranked = build_config({**_raw(cfg), "curriculum": {"num_stages": 2}})
    assert min(sequences_needed(ranked)) >= max(need[2], 1)


def _raw(cfg) -> dict:
    import tomllib

    raw = tomllib.loads(dump_toml(cfg))
    raw.pop("curriculum", None)
    return raw
