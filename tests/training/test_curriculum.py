"""Progressive distillation (``[curriculum]``): the stage table (steps, fractions, ranked splits, the pocl
preset), stage switches at the right steps, inactive domains never sampled, DDK over the active domains
against a hand computation with the replay floor, the stage's loss config reaching the loss, exact resume
mid-stage (explicit and ranked stages), curriculum off / one full stage = unchanged, and the config errors."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from ddk_fast.config import build_config, dump_toml
from ddk_fast.ddk import (
    DEFAULT_MIN_WEIGHT,
    excess_loss_discrepancy,
    floor_weights,
    smooth_excess_loss_weights,
)
from ddk_fast.errors import ConfigError
from ddk_fast.models import objective as objective_mod
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.curriculum import POCL_TEMPERATURES, Curriculum, split_ranked
from ddk_fast.training.trainer import Trainer

from ..tiny import make_cfg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAMES = ["arith", "words", "code"]  # the order of the tiny fixture's domains

# three stages, one domain each; stage 3 starts at step 5, not a multiple of the DDK interval (2)
THREE = dict(
    train__max_steps=7,
    ddk__interval=2,
    checkpoint__every=2,
    curriculum__replay=0.6,
    curriculum__stages=[
        {"steps": 2, "domains": ["arith"], "temperature": 2.0},
        {"steps": 3, "domains": ["words"], "kd_weight": 0.5},
        {"steps": 1, "domains": ["code"]},  # runs to max_steps (2 steps)
    ],
)
# two stages ranked by the initial student's validation CE
RANKED = dict(
    train__max_steps=6,
    ddk__interval=2,
    checkpoint__every=2,
    curriculum__order="student_ce",
    curriculum__stages=[{"steps": 3, "temperature": 1.5}, {"fraction": 0.5}],
)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(cfg, stop_at=None, resume=False):
    """Train; returns (trainer, [(step, temperature, kd_weight, scale_by_t2) of every KD loss call])."""
    calls = []
    real = objective_mod.fused_linear_kd_loss
    t = Trainer(cfg)

    def spy(*args, **kw):
        calls.append((t.step, kw["temperature"], kw["kd_weight"], kw["scale_by_t2"]))
        return real(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objective_mod, "fused_linear_kd_loss", spy)
        t.setup()
        if resume:
            t.resume()
        t.result = t.fit(stop_at=stop_at)
    return t, calls


@pytest.fixture(scope="module")
def three(assets, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("three")
    t, calls = _train(make_cfg(assets, run_dir, **THREE))
    return t, calls, _rows(run_dir)


@pytest.fixture(scope="module")
def ranked(assets, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("ranked")
    t, _ = _train(make_cfg(assets, run_dir, **RANKED))
    return t, _rows(run_dir)


# ----------------------------------------------------------------------------------------------- the table
def test_stage_table_from_steps_and_fractions(assets, tmp_path):  # noqa: F811
    cfg = make_cfg(
        assets,
        tmp_path,
        train__max_steps=10,
        curriculum__stages=[
            {"steps": 3, "domains": ["code"], "temperature": 1.5},
            {"fraction": 0.5, "domains": ["arith"]},
            {"steps": 1, "domains": ["words"], "kd_weight": 0.5},
        ],
    )
    cur = Curriculum(cfg, NAMES)
    assert [(s.start, s.end) for s in cur.stages] == [(0, 3), (3, 8), (8, 10)]  # the last runs to the end
    assert [s.domains for s in cur.stages] == [[2], [0], [1]]
    assert [cur.active(s) for s in cur.stages] == [[2], [0, 2], [0, 1, 2]]
    assert [cur.stage_at(k).index for k in range(10)] == [1, 1, 1, 2, 2, 2, 2, 2, 3, 3]
    assert [k for k in range(10) if cur.is_boundary(k)] == [3, 8]
    losses = [cur.loss_config(s, cfg.loss) for s in cur.stages]
    assert [(x.temperature, x.kd_weight) for x in losses] == [(1.5, 0.2), (1.0, 0.2), (1.0, 0.5)]
    assert cfg.loss.temperature == 1.0  # the run's [loss] is never changed
    # fractions round down, after removing float noise (0.29 * 100 = 28.999999999999996)
    cfg = make_cfg(
        assets, tmp_path, train__max_steps=100, curriculum__stages=[{"fraction": 0.29}, {"steps": 2}]
    )
    assert [(s.start, s.end) for s in Curriculum(cfg, NAMES).stages] == [(0, 29), (29, 100)]


def test_ranked_split_and_order():
    assert split_ranked([4, 3, 2, 1, 0], 3) == [[4, 3], [2, 1], [0]]
    assert split_ranked([0, 1, 2], 3) == [[0], [1], [2]]


@pytest.mark.parametrize(
    ("order", "expected"),
    [("teacher_ce", [[1, 2], [0]]), ("student_ce", [[0, 2], [1]]), ("config", [[0, 1], [2]])],
)
def test_ranking_by_order(assets, tmp_path, order, expected):  # noqa: F811
    cfg = make_cfg(assets, tmp_path, curriculum__num_stages=2, curriculum__order=order)
    cur = Curriculum(cfg, NAMES)
    assert [(s.start, s.end) for s in cur.stages] == [(0, 3), (3, 6)]
    assert cur.needs_ranking == (order != "config")
    if cur.needs_ranking:
        cur.rank([2.0, 0.5, 1.0], [1.0, 3.0, 1.0])  # student: a tie between 0 and 2 keeps config order
    assert [s.domains for s in cur.stages] == expected


def test_pocl_preset(assets, tmp_path):  # noqa: F811
    root, files = assets
    four = dict(files, code2=files["code"])  # the preset needs >= 4 domains
    cfg = make_cfg(
        (root, four), tmp_path, train__max_steps=10, loss__scale_by_t2=False, curriculum__preset="pocl"
    )
    cur = Curriculum(cfg, list(four))
    assert cfg.curriculum.order == "teacher_ce" and cur.needs_ranking
    assert [(s.start, s.end) for s in cur.stages] == [(0, 2), (2, 4), (4, 6), (6, 10)]
    losses = [cur.loss_config(s, cfg.loss) for s in cur.stages]
    assert [x.temperature for x in losses] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    assert list(POCL_TEMPERATURES) == [x.temperature for x in losses]
    assert all(x.scale_by_t2 for x in losses) and all(x.kd_weight == cfg.loss.kd_weight for x in losses)
    cur.rank([3.0, 1.0, 2.0, 0.5], None)
    assert [s.domains for s in cur.stages] == [[3], [1], [2], [0]]


@pytest.mark.parametrize("which", ["pocl", "stages"])
def test_config_round_trips_through_toml(assets, tmp_path, which):  # noqa: F811
    over = {"curriculum__preset": "pocl", "curriculum__replay": 0.3} if which == "pocl" else THREE
    if which == "pocl":
        root, files = assets
        assets = (root, dict(files, code2=files["code"]))
    cfg = make_cfg(assets, tmp_path, **over)
    again = build_config(tomllib.loads(dump_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()
    assert again.curriculum.enabled


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_sampler_never_draws_a_zero_weight_domain(tmp_path, backend):
    from ddk_fast.backend import sampler_ext_import_error
    from ddk_fast.data import DomainSampler, TokenShard

    if (
        backend == "cpp"
        and sampler_ext_import_error() is not None
        and os.environ.get("DDK_FAST_REQUIRE_EXT") != "1"
    ):
        pytest.skip(sampler_ext_import_error())
    rng = np.random.default_rng(0)
    shards = [
        TokenShard.write(tmp_path / f"d{d}", [rng.integers(0, 50, size=20) for _ in range(5)], vocab_size=50)
        for d in range(4)
    ]
    s = DomainSampler(shards, [0.0, 0.7, 0.0, 0.3], seq_len=8, batch_size=3, sep_token_id=60, backend=backend)
    seen = np.concatenate([s.next_batch()["domain_ids"][:, 0] for _ in range(50)])
    assert set(seen.tolist()) == {1, 3}
    s.set_weights([1e-300, 0.0, 1.0, 0.0])  # a tiny weight may be drawn; exactly 0 never
    seen = np.concatenate([s.next_batch()["domain_ids"][:, 0] for _ in range(50)])
    assert 1 not in seen and 3 not in seen


# ----------------------------------------------------------------------------------------------- training
def test_stages_switch_at_the_right_steps(three):
    t, _, rows = three
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 2, 3, 3]
    assert [r["temperature"] for r in rows] == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [r["kd_weight"] for r in rows] == [0.2, 0.2, 0.5, 0.5, 0.5, 0.2, 0.2]
    # an update at every interval and at the start of stage 3 (step 5, re-measured there)
    assert [h["step"] for h in t.mixer.history] == [0, 2, 4, 5, 6]
    assert [h["step"] for h in t.eval_history][:5] == [0, 2, 4, 5, 6]


def test_inactive_domains_are_never_sampled(three):
    _, _, rows = three
    for r in rows:
        active = {1: [0], 2: [0, 1], 3: [0, 1, 2]}[r["stage"]]
        for i in range(3):
            if i in active:
                assert r["weights"][i] > 0
            else:
                assert r["weights"][i] == 0.0 and r["domain_tokens"][i] == 0, (r["step"], i)
    assert rows[0]["domain_tokens"][0] == 4 * 32  # stage 1: the whole batch is arith
    assert rows[-1]["domain_tokens"][2] > 0


def _floor(w, earlier, replay):
    e = sum(w[i] for i in earlier)
    if e >= replay:
        return list(w)
    return [x * replay / e if i in earlier else x * (1 - replay) / (1 - e) for i, x in enumerate(w)]


def test_ddk_weights_over_the_active_domains_with_the_replay_floor(three):
    t, _, _ = three
    h = {x["step"]: x for x in t.mixer.history}
    assert h[0]["weights"] == [1.0, 0.0, 0.0] and h[2 - 2]["weights"] == h[0]["weights"]

    def sub(step, idx):
        return [h[step]["student_loss"][i] for i in idx], [h[step]["teacher_loss"][i] for i in idx]

    def scatter(w, idx):
        out = [0.0, 0.0, 0.0]
        for i, x in zip(idx, w.tolist()):
            out[i] = x
        return out

    # stage 2 starts at step 2: r_0 over {arith, words} (excess-loss factor, alpha 0.5, tau 0.5), code 0
    w2 = _floor(scatter(excess_loss_discrepancy(*sub(2, [0, 1]), 0.5, 0.5), [0, 1]), [0], 0.6)
    assert h[2]["weights"] == pytest.approx(w2, abs=1e-12) and h[2]["weights"][2] == 0.0
    assert h[2]["weights"][0] == pytest.approx(0.6)  # the floor binds: arith alone would get less
    # step 4, same stage: Eq. 2 from the stage's previous weights
    w4 = smooth_excess_loss_weights([w2[0], w2[1]], *sub(4, [0, 1]), 0.5, 0.5)
    assert h[4]["weights"] == pytest.approx(_floor(scatter(w4, [0, 1]), [0], 0.6), abs=1e-12)
    # step 5, stage 3: smoothing restarts from r_0 over all three; arith + words keep >= 0.6
    # (three active domains: the min_weight floor of the excess-loss factor applies, 1e-3 by default)
    r0 = floor_weights(excess_loss_discrepancy(*sub(5, [0, 1, 2]), 0.5, 0.5), DEFAULT_MIN_WEIGHT)
    w5 = _floor(r0.tolist(), [0, 1], 0.6)
    assert h[5]["weights"] == pytest.approx(w5, abs=1e-12)
    w6 = floor_weights(smooth_excess_loss_weights(w5, *sub(6, [0, 1, 2]), 0.5, 0.5), DEFAULT_MIN_WEIGHT)
    assert h[6]["weights"] == pytest.approx(_floor(w6.tolist(), [0, 1], 0.6), abs=1e-12)
    for x in t.mixer.history:
        assert sum(x["weights"]) == pytest.approx(1.0, abs=1e-12)
        if x["step"] >= 2:
            assert x["weights"][0] + (x["weights"][1] if x["step"] >= 5 else 0) >= 0.6 - 1e-12


def test_stage_loss_config_reaches_the_loss(three):
    _, calls, _ = three
    by_step = {}
    for step, temp, kd, t2 in calls:
        by_step.setdefault(step, set()).add((temp, kd, t2))
    expected = {0: 2.0, 1: 2.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}
    kd = {0: 0.2, 1: 0.2, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.2, 6: 0.2}
    assert sorted(by_step) == list(range(7))
    for step, seen in by_step.items():
        assert seen == {(expected[step], kd[step], True)}, step


def test_report_has_the_curriculum_table(three):
    from ddk_fast.training.report import write_report

    t, _, _ = three
    result = t.result
    assert [s["active"] for s in result.curriculum] == [["arith"], ["arith", "words"], NAMES]
    text = write_report(result, t.names).read_text()
    assert "| stage | steps | domains active | T | kd_weight |" in text
    assert "| 1 | 1-2 | arith | 2 (T² scaled) | 0.2 |" in text
    assert "| 3 | 6-7 | arith, words, code | 1 (T² scaled) | 0.2 |" in text
    assert (t.run_dir / "domain_weights.png").stat().st_size > 0


@pytest.mark.parametrize("stop_at", [3, 5])  # resume from step 2 (stage 2's first) / 4 (mid stage 2)
def test_resume_mid_stage_is_exact(assets, tmp_path, three, stop_at):  # noqa: F811
    t_full, _, reference = three
    cfg = make_cfg(assets, tmp_path / "cut", **THREE)
    _train(cfg, stop_at=stop_at)
    resumed, _ = _train(make_cfg(assets, tmp_path / "cut", **THREE), resume=True)
    assert resumed.mixer.history == t_full.mixer.history
    rows = _rows(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(1, 8))
    for a, b in zip(reference, rows):
        for key in ("stage", "temperature", "kd_weight", "weights", "batch_fingerprint", "domain_tokens"):
            assert a[key] == b[key], (a["step"], key)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_ranked_stages_and_their_resume(assets, tmp_path, ranked):  # noqa: F811
    t_full, reference = ranked
    student0 = t_full.eval_history[0]["student_loss"]
    order = sorted(range(3), key=lambda i: (student0[i], i))
    cur = t_full.schedule.curriculum
    assert [s.domains for s in cur.stages] == [order[:2], order[2:]]
    first = [r for r in reference if r["stage"] == 1]
    assert len(first) == 3 and all(r["domain_tokens"][order[2]] == 0 for r in first)
    assert [r["temperature"] for r in reference] == [1.5] * 3 + [1.0] * 3
    _train(make_cfg(assets, tmp_path / "cut", **RANKED), stop_at=5)  # checkpoint of step 4, mid stage 2
    state = torch.load(
        ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints") / "state.pt", weights_only=False
    )
    assert [s["domains"] for s in state["curriculum"]["stages"]] == [
        [NAMES[i] for i in order[:2]],
        [NAMES[order[2]]],
    ]
    resumed, _ = _train(make_cfg(assets, tmp_path / "cut", **RANKED), resume=True)
    assert [s.domains for s in resumed.schedule.curriculum.stages] == [s.domains for s in cur.stages]
    rows = _rows(tmp_path / "cut")
    for a, b in zip(reference[4:], rows[4:]):
        assert (a["weights"], a["batch_fingerprint"], a["stage"]) == (
            b["weights"],
            b["batch_fingerprint"],
            b["stage"],
        )
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_resume_with_another_table_is_refused(assets, tmp_path, three):  # noqa: F811
    from ddk_fast.errors import RunError

    _train(make_cfg(assets, tmp_path / "cut", **THREE), stop_at=3)
    other = dict(
        THREE,
        curriculum__stages=[{"steps": 3, "domains": ["arith"]}, {"steps": 4, "domains": ["words", "code"]}],
    )
    t = Trainer(make_cfg(assets, tmp_path / "cut", **other))
    t.setup()
    with pytest.raises(RunError, match="curriculum"):
        t.resume()
    t = Trainer(
        make_cfg(assets, tmp_path / "cut", **{k: v for k, v in THREE.items() if "curriculum" not in k})
    )
    t.setup()
    with pytest.raises(RunError, match=r"\[curriculum\]"):
        t.resume()


def test_off_and_one_full_stage_change_nothing(assets, tmp_path):  # noqa: F811
    base = {"train__max_steps": 3, "ddk__interval": 2}
    runs = {
        "off": {},
        "none": {"curriculum__preset": "none", "curriculum__replay": 0.5},
        "one": {
            "curriculum__stages": [{"steps": 3, "domains": NAMES}]
        },  # the active-subset path, all domains
    }
    rows, states = {}, {}
    for name, over in runs.items():
        t, _ = _train(make_cfg(assets, tmp_path / name, **base, **over))
        rows[name] = _rows(tmp_path / name)
        states[name] = t.state()
    for name in ("none", "one"):
        for a, b in zip(rows["off"], rows[name]):
            for key in ("loss", "ce", "kd", "weights", "domain_ce", "batch_fingerprint", "grad_norm"):
                assert a[key] == b[key], (name, key)
    assert "stage" not in rows["off"][0] and "stage" not in rows["none"][0] and rows["one"][0]["stage"] == 1
    assert "curriculum" not in states["off"] and "curriculum" not in states["none"]
    assert states["off"]["mixer"] == states["none"]["mixer"] == states["one"]["mixer"]


# ----------------------------------------------------------------------------------------------- errors
def _stage(**kw):
    return dict({"steps": 2}, **kw)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        (
            {"stages": [_stage(), _stage(steps=5)]},
            r"\[curriculum.stages\[1\]\] steps: expected at most 4 steps.*got 5",
        ),
        (
            {"stages": [{"fraction": 0.6}, {"fraction": 0.6}]},
            r"stages\[1\]\] fraction: expected fractions of train.max_steps summing to at most 1",
        ),
        (
            {"stages": [_stage(steps=4), {"fraction": 0.5}]},
            r"\[curriculum.stages\[1\]\] fraction: expected at most 2 steps.*got 0.5",
        ),
        (
            {"stages": [_stage(domains=["arith"]), _stage(domains=["maths"])]},
            r"stages\[1\]\] domains: expected a \[\[data.domains\]\] name.*got 'maths'",
        ),
        (
            {"stages": [_stage(domains=["arith", "code"]), _stage(domains=["words", "code"])]},
            r"stages\[1\]\] domains: expected a domain not already added by stage 1, got 'code'",
        ),
        (
            {"stages": [_stage(domains=["arith", "code"]), _stage()]},
            r"stages\[1\]\] domains: expected domain names in every stage or in none",
        ),
        (
            {"stages": [_stage(domains=["arith"]), _stage(domains=["code"])]},
            r"\[curriculum\] stages: expected every .* got \['words'\]",
        ),
        (
            {"stages": [_stage(fraction=0.5)]},
            r"stages\[0\]\] steps: expected steps or fraction, not both, got 2",
        ),
        (
            {"stages": [{"temperature": 2.0}]},
            r"stages\[0\]\] steps: expected steps >= 1 or a fraction > 0.*got 0",
        ),
        (
            {"stages": [{"fraction": 0.1}]},
            r"stages\[0\]\] fraction: expected a fraction giving at least 1.*got 0.1",
        ),
        ({"num_stages": 4}, r"\[curriculum\] num_stages: expected at most 3 stages.*got 4"),
        (
            {"stages": [_stage(), _stage(), _stage()], "num_stages": 2},
            r"\[curriculum\] num_stages: expected 0 with",
        ),
        ({"stages": [{"steps": 1}] * 4}, r"\[curriculum\] stages: expected at most 3 stages.*got 4"),
        ({"preset": "pocl"}, r"\[curriculum\] preset: expected at most 3 stages.*got 'pocl'"),
        (
            {"preset": "pocl", "stages": [_stage()]},
            r"\[curriculum\] stages: expected no \[\[curriculum.stages\]\]",
        ),
        ({"replay": 1.0}, r"\[curriculum\] replay: expected a number in \[0, 1\), got 1.0"),
        ({"replay": -0.1}, r"\[curriculum\] replay: expected a number in \[0, 1\), got -0.1"),
        (
            {"stages": [_stage(temperature=0.01)]},
            r"stages\[0\]\] temperature: expected 0 \(inherit.*got 0.01",
        ),
        ({"stages": [_stage(temperature=200)]}, r"stages\[0\]\] temperature: expected .*100.0\], got 200"),
        ({"stages": [_stage(kd_weight=-0.5)]}, r"stages\[0\]\] kd_weight: expected -1 \(inherit.*got -0.5"),
        (
            {"stages": [_stage(kd_weight=0.0)], "ce_weight": 0.0},
            r"stages\[0\]\] kd_weight: expected > 0 with",
        ),
        ({"order": "random"}, r"\[curriculum\] order: expected one of .*got 'random'"),
        ({"stages": [_stage(step=3)]}, r"stages\[0\]\] step: expected no such key"),
    ],
)
def test_config_errors(assets, tmp_path, over, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        over = dict(over)
        loss = {"loss__ce_weight": over.pop("ce_weight")} if "ce_weight" in over else {}
        make_cfg(assets, tmp_path, **loss, **{f"curriculum__{k}": v for k, v in over.items()})


def test_static_mixing_needs_positive_weights_and_small_runs_refuse_more_stages(assets, tmp_path):  # noqa: F811
    root, files = assets
    with pytest.raises(
        ConfigError, match=r"\[data.domains\[1\]\] weight: expected a weight > 0 with \[curriculum\]"
    ):
        cfg = make_cfg(assets, tmp_path, ddk__mixing="static", curriculum__num_stages=2)
        raw = cfg.to_dict()
        raw["data"]["domains"][1]["weight"] = 0.0
        build_config(raw)
    with pytest.raises(ConfigError, match=r"\[train\] max_steps: expected at least 3 .*got 2"):
        make_cfg(assets, tmp_path, train__max_steps=2, train__warmup_steps=0, curriculum__num_stages=3)


def test_cli_exits_2_before_models_load(assets, tmp_path):  # noqa: F811
    from ddk_fast.train import main

    cfg = make_cfg(assets, tmp_path / "run")
    text = dump_toml(cfg) + '\n[[curriculum.stages]]\nsteps = 2\ndomains = ["arith", "nope"]\n'
    text = text.replace("stages = []\n", "")
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    assert not (tmp_path / "run").exists()
