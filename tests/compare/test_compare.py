"""The DDK-vs-baselines comparison: `python -m ddk_fast.compare --quick` on the tiny demo assets, its
results.json schema, equal budgets and shared inits, reuse of finished runs, and the summary maths."""

from __future__ import annotations

import json

import pytest

from ddk_fast.compare import (
    ARMS,
    BEST_FIXED_GRID,
    fixed_mix,
    paired_interval,
    score,
    t975,
    weight_oscillation,
)
from ddk_fast.compare.__main__ import main
from ddk_fast.compare.stats import paired, paired_intervals

from .conftest import REPO


def test_quick_comparison_writes_results_report_and_plots(quick):
    root, _, res = quick
    assert set(res) >= {"setting", "seeds", "domains", "teacher_test_ce", "runs", "references"}
    assert res["seeds"] == [0] and res["setting"]["quick"] and res["setting"]["commit"] is not None
    assert res["domains"] == ["code", "docs", "arithmetic", "structured", "logs"]
    arms = [*ARMS, "ddk_nocap", "ddk_minimax"]  # examples/compare.toml: the defaults and the factor variants
    assert [r["arm"] for r in res["runs"]] == arms == res["setting"]["arms"]
    assert set(res["setting"]["arm_configs"]) == set(arms) and res["setting"]["best_fixed_grid"]
    for r in res["runs"]:
        assert r["commit"] is not None and "config" not in r  # the config: once per arm, in the setting
        for key in ("tokens", "test_ce", "gap", "mean_gap", "worst_gap", "weights", "weight_oscillation"):
            assert key in r, key
        assert len(r["gap"]) == 5 and r["worst_gap"] == max(r["gap"])
        assert r["gap"] == pytest.approx([s - t for s, t in zip(r["test_ce"], res["teacher_test_ce"])])
    assert len({r["tokens"] for r in res["runs"]}) == 1  # equal token budget: 8 steps x 4 x 16
    assert res["runs"][0]["tokens"] == 8 * 4 * 16
    by = {r["arm"]: r for r in res["runs"]}
    assert by["uniform"]["weights"][0][1:] == pytest.approx([0.2] * 5)
    static = by["static"]["weights"][0][1:]
    assert static.index(max(static)) == 4  # logs: the largest domain dominates a size-proportional mix
    temp = by["temperature"]["weights"][0][1:]
    assert temp.index(max(temp)) == 4 and max(temp) < max(static)  # size^0.3: flatter
    best = by["best_fixed"]
    assert best["chosen"] in BEST_FIXED_GRID and best["grid_tokens"] == len(BEST_FIXED_GRID) * best["tokens"]
    chosen = min(best["grid"], key=lambda g: (g["val_worst_gap"], g["val_mean_gap"]))
    assert best["chosen"] == chosen["arm"]
    (iv,) = [x for x in res["intervals"] if (x["treatment"], x["baseline"], x["metric"]) ==
             ("ddk", "uniform", "worst_gap")]  # fmt: skip
    assert iv["n"] == 1 and iv["lo"] is None
    assert by["ddk"]["weights"][0][1:] != pytest.approx([0.2] * 5)  # the factor moved the mix
    untrained = res["references"][0]
    assert untrained["arm"] == "untrained" and all(r["mean_gap"] < untrained["mean_gap"] for r in res["runs"])
    report = (root / "out" / "report.md").read_text()
    assert "Paired by seed" in report and "test** split" in report and "chosen on val" in report
    assert "| ddk − best_fixed |" in report
    for png in ("gaps.png", "weights.png"):
        assert (root / "out" / png).stat().st_size > 1000
    # one shared init per seed: a folder the arms load, not one each
    (init,) = (root / "out" / "inits").glob("seed0-*")
    assert (init / "config.json").exists()
    (ddk_run,) = (root / "out" / "runs").glob("ddk-s0-*")
    assert str(init) in (ddk_run / "config.toml").read_text()


def test_finished_runs_are_reused(quick, capsys):
    root, args, res = quick
    (done,) = (root / "out" / "runs").glob("uniform-s0-*/run_result.json")
    mtime = done.stat().st_mtime
    # a sweep over a DDK-only key (one the ddk arm does not pin) reuses the uniform run and trains a second
    # ddk run beside the first
    assert main([*args, "--arms", "ddk,uniform", "--set", "ddk.max_weight=0.9"]) == 0
    again = json.loads((root / "out" / "results.json").read_text())
    by = {r["arm"]: r for r in again["runs"]}
    first = {r["arm"]: r for r in res["runs"]}
    assert by["uniform"]["test_ce"] == first["uniform"]["test_ce"] and done.stat().st_mtime == mtime
    assert len(list((root / "out" / "runs").glob("ddk-s0-*"))) == 2


def test_reuse_takes_matching_runs_of_an_earlier_results_json(quick, tmp_path, capsys):
    root, args, res = quick
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(res))  # the fixture's own results (other tests rewrite out/results.json)
    runs = root / "out" / "runs"
    before = {p.parent.name: p.stat().st_mtime for p in runs.glob("*/run_result.json")}
    out = tmp_path / "out"
    common = [*args, "--out", str(out), "--reuse", str(earlier), "--arms", "uniform,best_fixed,ddk_nocap"]
    common += ["--set", "ddk.factor_temperature=0.7"]  # a new ddk_nocap run; the fixed mixes never read it
    assert main(common) == 0
    again = json.loads((out / "results.json").read_text())
    by = {r["arm"]: r for r in again["runs"]}
    first = {r["arm"]: r for r in res["runs"]}
    for arm in ("uniform", "best_fixed"):  # taken from the file, not from a run folder or a new run
        assert by[arm]["test_ce"] == first[arm]["test_ce"] and by[arm]["reused_from"] == str(earlier)
    assert by["best_fixed"]["chosen"] == first["best_fixed"]["chosen"]
    after = {p.parent.name: p.stat().st_mtime for p in runs.glob("*/run_result.json")}
    assert all(after[k] == v for k, v in before.items())  # nothing trained again
    (new,) = set(after) - set(before)
    assert new.startswith("ddk_nocap-s0-") and "reused_from" not in by["ddk_nocap"]
    assert again["setting"]["reused_runs"] == 2
    assert by["ddk_nocap"]["weights"][0][1:] != pytest.approx([0.2] * 5)
    # a row whose settings differ from the run's is not taken (here: its hash altered)
    stale = json.loads(earlier.read_text())
    for r in stale["runs"]:
        r["settings_hash"] = "0" * 16
    earlier.write_text(json.dumps(stale))
    assert main(common) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["setting"]["reused_runs"] == 0
    assert not any(r.get("reused_from") for r in again["runs"])
    (tmp_path / "bad.json").write_text("{}")
    capsys.readouterr()
    assert main([*common, "--reuse", str(tmp_path / "bad.json")]) == 2
    assert "--reuse" in capsys.readouterr().err


def test_bad_compare_table_is_a_config_error(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text((REPO / "examples" / "compare.toml").read_text().replace('"ddk_minimax",', '"nonsense",'))
    assert main(["--config", str(cfg), "--quick"]) == 2
    assert "[compare] arms: expected one of ddk" in capsys.readouterr().err


def test_summary_maths():
    assert weight_oscillation([[0, 0.5, 0.5], [10, 0.7, 0.3], [20, 0.5, 0.5]]) == pytest.approx(0.2)
    assert weight_oscillation([[0, 0.5, 0.5]]) == 0.0
    row = score({"test_ce": [3.0, 2.0], "test_tokens": [30, 10], "weights": []}, [2.5, 1.0])
    assert row["gap"] == [0.5, 1.0] and row["worst_gap"] == 1.0
    assert row["mean_gap"] == pytest.approx((0.5 * 30 + 1.0 * 10) / 40)
    res = {
        "seeds": [0, 1],
        "runs": [
            {"arm": "ddk", "seed": 0, "mean_gap": 1.0, "worst_gap": 2.0, "weight_oscillation": 0.1},
            {"arm": "ddk", "seed": 1, "mean_gap": 1.0, "worst_gap": 2.0, "weight_oscillation": 0.1},
            {"arm": "uniform", "seed": 0, "mean_gap": 1.1, "worst_gap": 2.5, "weight_oscillation": 0.0},
            {"arm": "uniform", "seed": 1, "mean_gap": 0.9, "worst_gap": 1.5, "weight_oscillation": 0.0},
        ],
    }
    assert paired(res, "ddk", "uniform", "worst_gap") == pytest.approx([-0.5, 0.5])
    rows = paired_intervals(res)
    assert [(r["treatment"], r["baseline"], r["metric"]) for r in rows] == [
        ("ddk", "uniform", "mean_gap"),
        ("ddk", "uniform", "worst_gap"),
    ]
    assert rows[1]["verdict"] == "no detectable difference"


def test_goal_check_reads_the_upper_ends_of_every_interval():
    from ddk_fast.compare.report import goal_lines
    from ddk_fast.compare.stats import goal_check

    def runs(arm, worst, mean):
        return [
            {"arm": arm, "seed": k, "worst_gap": w, "mean_gap": m}
            for k, (w, m) in enumerate(zip(worst, mean))
        ]

    base = [1.0, 1.2, 0.9, 1.1]
    res = {"seeds": [0, 1, 2, 3], "runs": runs("uniform", base, base) + runs("static", base, base)
           + runs("temperature", base, base)
           + runs("ddk", [b - 0.05 for b in base], base)  # lower worst gap everywhere, same mean: met
           + runs("ddk_nocap", [b + d for b, d in zip(base, (0.02, -0.01, 0.03, 0.0))], base)}  # fmt: skip
    res["intervals"] = paired_intervals(res)
    got = {r["arm"]: r for r in goal_check(res)}
    assert got["ddk"]["met"] is True and got["ddk_nocap"]["met"] is False
    assert [c["baseline"] for c in got["ddk"]["checks"]] == ["uniform", "static", "temperature", "uniform"]
    assert got["ddk_nocap"]["checks"][0]["hi"] > 0.01  # mean +0.01, sd 0.018: upper end ~ +0.039
    text = "\n".join(goal_lines(res))
    assert "| ddk | -0.0500 | -0.0500 | -0.0500 | +0.0000 | yes |" in text and "| ddk_nocap |" in text


def test_paired_t_interval_by_hand():
    # d = (-0.1, -0.3, -0.2, -0.4, -0.5): mean -0.3, sd = sqrt(0.1 / 4) = 0.158114, n = 5, t_{0.975,4} = 2.776
    # half width = 2.776 * 0.158114 / sqrt(5) = 0.196293 -> [-0.496293, -0.103707]: below 0, "lower"
    iv = paired_interval([-0.1, -0.3, -0.2, -0.4, -0.5])
    assert iv["mean"] == pytest.approx(-0.3) and iv["sd"] == pytest.approx(0.1581139, rel=1e-6)
    assert iv["lo"] == pytest.approx(-0.496293, abs=1e-6) and iv["hi"] == pytest.approx(-0.103707, abs=1e-6)
    assert iv["verdict"] == "lower"
    # an interval that covers 0 detects nothing; one above 0 says "higher"
    assert paired_interval([0.1, -0.1, 0.05])["verdict"] == "no detectable difference"
    assert paired_interval([0.2, 0.3, 0.25, 0.22])["verdict"] == "higher"
    assert t975(1) == 12.706 and t975(4) == 2.776 and 1.96 < t975(200) < 1.98
    with pytest.raises(ValueError, match="df: expected an integer >= 1"):
        t975(0)


def test_fixed_mixes_of_the_new_arms():
    sizes = [100.0, 100.0, 50.0, 50.0, 700.0]
    assert fixed_mix("static", sizes) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.7])
    w = [x**0.3 for x in sizes]
    assert fixed_mix("temperature", sizes) == pytest.approx([x / sum(w) for x in w])
    assert fixed_mix("temperature", sizes, exponent=0.0) == pytest.approx([0.2] * 5)
    gap0 = [0.5, 2.0, 0.1, 1.0, 0.3]  # docs has the largest step-0 gap, structured the second
    assert fixed_mix("gap_top1", sizes, gap0) == pytest.approx([0.15, 0.4, 0.15, 0.15, 0.15])
    assert fixed_mix("gap_top2", sizes, gap0) == pytest.approx([0.4 / 3, 0.3, 0.4 / 3, 0.3, 0.4 / 3])
    assert fixed_mix("uniform", sizes) is None and fixed_mix("ddk", sizes) is None
    with pytest.raises(ValueError, match="gap_top1: needs the step-0 val gap"):
        fixed_mix("gap_top1", sizes)
    assert set(BEST_FIXED_GRID) == {"uniform", "static", "temperature", "gap_top1", "gap_top2"}


def test_best_fixed_is_chosen_on_val_not_test():
    from ddk_fast.compare import best_fixed_row

    def row(val, test):
        return {"val_ce": val, "teacher_val_ce": [1.0, 1.0], "test_ce": test, "tokens": 10, "weights": []}

    members = {
        "uniform": row([1.5, 1.6], [1.0, 1.0]),  # worst val gap 0.6, best on test
        "static": row([1.2, 1.3], [9.0, 9.0]),  # worst val gap 0.3: chosen, although worst on test
        "temperature": row([1.3, 1.3], [2.0, 2.0]),  # worst 0.3 too, but a higher mean val gap
        "gap_top1": row([2.0, 1.0], [1.0, 1.0]),
        "gap_top2": row([1.0, 2.0], [1.0, 1.0]),
    }
    best = best_fixed_row(members, BEST_FIXED_GRID)
    assert best["arm"] == "best_fixed" and best["chosen"] == "static" and best["test_ce"] == [9.0, 9.0]
    assert best["grid_tokens"] == 50 and [g["arm"] for g in best["grid"]] == list(BEST_FIXED_GRID)


def test_akd_arms_add_their_sections_and_need_them():
    from ddk_fast.compare import AKD_ARMS, arm_overrides, run_key
    from ddk_fast.config import tomllib
    from ddk_fast.errors import ConfigError

    akd = {"hidden": {"weight": 0.5}, "curriculum": {"replay": 0.3}, "teacher_prompt": {"budget": 4}}
    assert arm_overrides("akd_hidden", akd) == {"ddk": {"mixing": "uniform"}, "hidden": {"weight": 0.5}}
    both = arm_overrides("akd_ddk", akd)
    assert both["ddk"]["mixing"] == "ddk" and set(both) == {"ddk", "hidden", "curriculum", "teacher_prompt"}
    assert set(arm_overrides("akd", akd)) - {"ddk"} == set(akd) and "akd_prompts" in AKD_ARMS
    with pytest.raises(ConfigError, match=r"\[compare\] akd: expected a \[compare.akd.hidden\] table"):
        arm_overrides("akd_hidden", {"curriculum": {}})
    # an AKD section that is off is not part of a run's identity: finished baseline runs stay valid
    raw = tomllib.loads((REPO / "examples" / "compare.toml").read_text())
    raw.pop("compare")
    assert run_key(raw) == run_key({**raw, "hidden": {"weight": 0.0, "loss": "cosine"}})
    assert run_key(raw) != run_key({**raw, "hidden": {"weight": 0.5}})
    assert run_key(raw) == run_key({**raw, "curriculum": {"replay": 0.5}, "teacher_prompt": {"budget": 3}})
    assert run_key(raw) != run_key({**raw, "curriculum": {"preset": "pocl"}})


def test_akd_arms_run_with_one_shared_prompt_search(quick):
    root, args, _ = quick
    akd = [
        "--set", "compare.akd.hidden.weight=0.5",
        "--set", "compare.akd.teacher_prompt.budget=3",
        "--set", "compare.akd.teacher_prompt.dev_sequences=2",
        "--set", "compare.akd.teacher_prompt.max_prefix_tokens=32",
        "--set", 'compare.akd.curriculum.preset="none"', "--set", "compare.akd.curriculum.num_stages=2",
    ]  # fmt: skip
    assert (
        main([*args, *akd, "--arms", "akd_prompts,uniform,akd_hidden,akd_ddk", "--out", str(root / "akd")])
        == 0
    )
    res = json.loads((root / "akd" / "results.json").read_text())
    assert [r["arm"] for r in res["runs"]] == ["akd_prompts", "uniform", "akd_hidden", "akd_ddk"]
    (prompts,) = (root / "out" / "prompts").glob("*/prompts.json")  # searched once, reused by the arm
    for arm in ("akd_prompts", "akd_ddk"):
        (run,) = (root / "out" / "runs").glob(f"{arm}-s0-*")
        assert str(prompts) in (run / "config.toml").read_text()
    ddk = {r["arm"]: r["weights"] for r in res["runs"]}["akd_ddk"]
    assert ddk[0][1:].count(0.0) >= 2  # stage 1 of 2: the harder domains are not drawn yet
    by = {r["arm"]: r for r in res["runs"]}
    assert by["akd_hidden"]["test_ce"] != by["uniform"]["test_ce"]
    # gaps are against the plain teacher, whichever arm comes first
    assert by["akd_prompts"]["teacher_prompts"] == str(prompts) and not by["uniform"]["teacher_prompts"]
    assert res["teacher_test_ce"] == by["uniform"]["teacher_test_ce"]
    report = (root / "akd" / "report.md").read_text()
    assert "AKD arms, paired by seed" in report and "| akd_hidden − uniform |" in report


def test_old_demo_assets_are_refused_with_the_rebuild_command(tmp_path, capsys):
    """Assets from before the held-out files (a corpus folder with a stamp but no val/ or test/): exit 2,
    naming the command that rebuilds them."""
    old = tmp_path / "demo"
    (old / "teacher").mkdir(parents=True)
    (old / "corpus").mkdir()
    (old / "corpus" / ".stamp.json").write_text('{"step": "corpus", "version": 2}\n')
    for d in ("code", "docs", "arithmetic", "structured", "logs"):
        (old / "corpus" / f"{d}.jsonl").write_text('{"text": "x"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text((REPO / "examples" / "compare.toml").read_text().replace(".cache/demo", str(old)))
    assert main(["--config", str(cfg), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "val_files" in err and f"python -m ddk_fast.demo --out {old}" in err
