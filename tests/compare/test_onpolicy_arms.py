"""The on-policy arms of the comparison (issue 21 item 6): their configs, the reuse key of off-policy runs,
the on-policy measure of a finished run (cached), and the paired on-policy − control statistics."""

from __future__ import annotations

import json

import pytest

from ddk_fast.compare import ARM_TABLE, ARMS, arm_overrides, run_key, split_compare_table
from ddk_fast.compare.__main__ import main
from ddk_fast.compare.arms import ONPOLICY_ARMS
from ddk_fast.compare.onpolicy import CACHE, measure_run
from ddk_fast.compare.stats import onpolicy_intervals, paired_interval
from ddk_fast.config import build_config, tomllib
from ddk_fast.errors import ConfigError

from .conftest import REPO

OP = {"prompt_tokens": 8, "max_new_tokens": 8, "seed": 3}


def _raw() -> dict:
    raw = tomllib.loads((REPO / "examples" / "compare.toml").read_text())
    raw.pop("compare")
    return raw


def test_onpolicy_arms_are_opt_in_and_set_fraction_and_keys():
    assert set(ONPOLICY_ARMS) == {"onpolicy_ddk", "onpolicy_uniform", "onpolicy1_ddk", "onpolicy1_uniform"}
    assert not set(ONPOLICY_ARMS) & set(ARMS)  # the default comparison is unchanged
    for arm in ONPOLICY_ARMS:
        spec = ARM_TABLE[arm]
        over = arm_overrides(arm, None, OP)
        assert over["onpolicy"] == {**OP, "fraction": spec.onpolicy}
        assert over["ddk"] == ARM_TABLE[spec.control].sections["ddk"]  # the control's mix, λ apart
        cfg = build_config(
            {**_raw(), **{k: {**_raw().get(k, {}), **v} for k, v in over.items()}}, check_paths=False
        )
        assert cfg.onpolicy.fraction == spec.onpolicy and cfg.onpolicy.prompt_tokens == 8
    assert ARM_TABLE["onpolicy_ddk"].onpolicy == 0.5 and ARM_TABLE["onpolicy1_uniform"].onpolicy == 1.0
    assert "onpolicy" not in arm_overrides("ddk", None, OP)


def test_compare_onpolicy_table_is_validated():
    raw = tomllib.loads((REPO / "examples" / "compare.toml").read_text())
    _, comp = split_compare_table(raw)
    assert comp["onpolicy"]["prompt_tokens"] == 64 and comp["onpolicy"]["max_new_tokens"] == 64
    raw["compare"]["onpolicy"] = {"fraction": 0.5}
    with pytest.raises(ConfigError, match=r"\[compare\] onpolicy: expected a table of the \[onpolicy\] keys"):
        split_compare_table(raw)


def test_reuse_key_ignores_onpolicy_keys_when_off():
    raw = _raw()
    base = run_key(raw)
    assert base == run_key({**raw, "onpolicy": {"prompt_tokens": 64, "max_new_tokens": 64}})
    assert base == run_key({**raw, "onpolicy": {"fraction": 0.0, "seed": 7}})
    on = run_key({**raw, "onpolicy": {"fraction": 0.5, "prompt_tokens": 64, "max_new_tokens": 64}})
    assert on != base
    assert on != run_key({**raw, "onpolicy": {"fraction": 1.0, "prompt_tokens": 64, "max_new_tokens": 64}})
    assert on != run_key({**raw, "onpolicy": {"fraction": 0.5, "prompt_tokens": 32, "max_new_tokens": 64}})


@pytest.fixture(scope="module")
def onpolicy_quick(quick):
    root, args, first = quick
    extra = [f"--set=compare.onpolicy.{k}={v}" for k, v in OP.items()]
    out = root / "onpolicy"
    assert main([*args, *extra, "--arms", "uniform,onpolicy_uniform", "--out", str(out)]) == 0
    return root, args, extra, first, json.loads((out / "results.json").read_text()), out


def test_onpolicy_arm_runs_and_every_arm_is_measured(onpolicy_quick):
    root, _, _, first, res, out = onpolicy_quick
    by = {r["arm"]: r for r in res["runs"]}
    assert set(by) == {"uniform", "onpolicy_uniform"}
    # the off-policy run of the first comparison is reused (its key ignores the [onpolicy] keys)
    assert by["uniform"]["test_ce"] == {r["arm"]: r for r in first["runs"]}["uniform"]["test_ce"]
    assert sum(by["onpolicy_uniform"]["onpolicy"]["generated_per_domain"]) == 8 * 2 * 8  # steps x λ·4 x new
    assert by["onpolicy_uniform"]["tokens"] == by["uniform"]["tokens"]  # equal budget: rows of the batch
    for r in res["runs"]:
        assert len(r["cont_ce"]) == 5 and r["cont_ce_mean"] == pytest.approx(sum(r["cont_ce"]) / 5)
        assert all(x > 0 for x in r["cont_ce"])
        assert "raw" not in r and "run_dir" not in r
    ref = res["references"][0]["onpolicy_measure"]
    assert set(ref) >= {"student", "teacher"} and ref["teacher"]["cont_ce_mean"] > 0
    assert res["setting"]["onpolicy_fraction"] == {"uniform": 0.0, "onpolicy_uniform": 0.5}
    rows = {(x["treatment"], x["metric"]) for x in res["onpolicy_intervals"]}
    assert rows == {("onpolicy_uniform", m) for m in ("mean_gap", "worst_gap", "cont_ce_mean")}
    report = (out / "report.md").read_text()
    assert "## On-policy arms" in report and "| onpolicy_uniform − uniform | 1 |" in report
    assert "| teacher's own continuations |" in report


def test_measure_run_is_cached_and_reproducible(onpolicy_quick):
    root, _, _, _, res, _ = onpolicy_quick
    (run,) = (root / "out" / "runs").glob("uniform-s0-*")
    cached = json.loads((run / CACHE).read_text())
    by = {r["arm"]: r for r in res["runs"]}
    assert cached["cont_ce"] == by["uniform"]["cont_ce"]
    raw = json.loads((run / "run_result.json").read_text())["config"]
    (run / CACHE).unlink()
    again = measure_run(raw, run, OP)  # measured afresh from the checkpoint: the same tokens, the same CE
    assert again["cont_ce"] == pytest.approx(cached["cont_ce"], rel=1e-5)
    assert not (run / "onpolicy_measure_tmp").exists()
    other = measure_run(raw, run, {**OP, "seed": 4})  # other sampling noise: another measure, not the cache
    assert other["key"] != again["key"] and other["cont_ce"] != again["cont_ce"]


def test_onpolicy_intervals_pair_each_arm_with_its_control():
    def row(arm, seed, mg, wg, c):
        return {"arm": arm, "seed": seed, "mean_gap": mg, "worst_gap": wg, "cont_ce_mean": c}

    runs = []
    for s in range(3):
        runs += [row("ddk", s, 0.1, 0.3, 2.0 + s), row("onpolicy_ddk", s, 0.1 + 0.01 * s, 0.2, 1.5 + s)]
        runs += [row("uniform", s, 0.2, 0.4, 2.0)]
    runs.append(row("onpolicy1_uniform", 0, 0.3, 0.5, 1.0))  # one seed: no interval
    rows = onpolicy_intervals({"seeds": [0, 1, 2], "runs": runs})
    by = {(r["treatment"], r["baseline"], r["metric"]): r for r in rows}
    assert set(by) == {("onpolicy_ddk", "ddk", m) for m in ("mean_gap", "worst_gap", "cont_ce_mean")} | {
        ("onpolicy1_uniform", "uniform", m) for m in ("mean_gap", "worst_gap", "cont_ce_mean")
    }
    c = by[("onpolicy_ddk", "ddk", "cont_ce_mean")]
    assert c["diffs"] == pytest.approx([-0.5] * 3) and c["verdict"] == "lower"
    mg = by[("onpolicy_ddk", "ddk", "mean_gap")]
    assert mg["diffs"] == pytest.approx([0.0, 0.01, 0.02])
    assert mg == {**mg, **paired_interval(mg["diffs"])} and mg["verdict"] == "no detectable difference"
    one = by[("onpolicy1_uniform", "uniform", "worst_gap")]
    assert one["n"] == 1 and one["lo"] is None and one["diffs"] == pytest.approx([0.1])
