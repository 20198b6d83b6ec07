"""The examples run offline as a new user would run them (fresh process, repo root), and every example
config is valid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_plain_loop_example_learns():
    kd = [float(x) for x in re.findall(r"kd ([0-9.]+)", _run("examples/plain_loop.py"))]
    assert len(kd) == 20 and kd[-1] < kd[0]


@pytest.mark.slow
def test_hf_trainer_example_runs_with_grad_accumulation(tmp_path):
    out = _run("examples/hf_trainer_distill.py", "--steps", "6", "--grad-accum", "2", "--out", str(tmp_path))
    start, end = map(float, re.search(r"start ([0-9.]+) end ([0-9.]+)", out).groups())
    assert end < start


def test_every_example_config_is_valid():
    from ddk_fast.compare import split_compare_table
    from ddk_fast.config import build_config, tomllib

    for path in sorted((REPO / "examples").glob("*.toml")):
        raw, _ = split_compare_table(tomllib.loads(path.read_text()))
        build_config(raw, check_paths=False)  # a ConfigError names the file's bad key


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> dict:
    """The tiny demo assets, built once for the example runs of this module."""
    from ddk_fast.demo.__main__ import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), tiny=True, progress=False)


@pytest.mark.slow
def test_akd_example_runs_and_its_report_shows_all_three_parts(tmp_path, tiny_demo):
    """examples/akd.toml as `make akd` runs it (prompt search, then training), on the tiny demo assets."""
    demo = tiny_demo
    cfg = tmp_path / "akd.toml"
    cfg.write_text((REPO / "examples" / "akd.toml").read_text().replace(".cache/demo", str(demo["out"])))
    prompts, run = tmp_path / "prompts.json", tmp_path / "run"
    small = [
        "--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "data.val_sequences=2",
        "--set", "data.test_sequences=2", "--set", "teacher_prompt.budget=3",
        "--set", "teacher_prompt.dev_sequences=2", "--set", "teacher_prompt.max_prefix_tokens=16",
        "--set", "ddk.interval=2", "--set", "train.max_steps=10", "--set", "train.warmup_steps=1",
        "--set", "checkpoint.every=5", "--set", "output.progress=false", "--set", "output.tensorboard=false",
        "--set", f'teacher_prompt.out="{prompts}"', "--set", f'teacher_prompt.use="{prompts}"',
        "--set", f'output.dir="{run}"',
    ]  # fmt: skip
    _run("-m", "ddk_fast.prompts", "--config", str(cfg), *small)
    assert prompts.exists()
    _run("-m", "ddk_fast.train", "--config", str(cfg), *small)
    report = (run / "report.md").read_text()
    assert "Hidden-state loss" in report and "Teacher prompts" in report
    assert "| stage | steps | domains active | T | kd_weight |" in report
    assert (run / "final").is_dir()


@pytest.mark.slow
def test_onpolicy_example_runs_and_reports_the_generated_tokens(tmp_path, tiny_demo):
    """examples/onpolicy.toml as `make onpolicy` runs it (`python -m ddk_fast.train`), on the tiny demo assets
    and a short run: the student generates half of each step's rows, the report has the on-policy table."""
    import json

    demo = tiny_demo
    cfg = tmp_path / "onpolicy.toml"
    cfg.write_text((REPO / "examples" / "onpolicy.toml").read_text().replace(".cache/demo", str(demo["out"])))
    run = tmp_path / "run"
    small = [
        "--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "data.val_sequences=2",
        "--set", "data.test_sequences=2", "--set", "onpolicy.prompt_tokens=16",
        "--set", "onpolicy.max_new_tokens=16", "--set", "ddk.interval=3", "--set", "train.max_steps=6",
        "--set", "train.warmup_steps=1", "--set", "checkpoint.every=3", "--set", "output.progress=false",
        "--set", "output.tensorboard=false", "--set", f'output.dir="{run}"',
    ]  # fmt: skip
    _run("-m", "ddk_fast.train", "--config", str(cfg), *small)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(sum(r["domain_onpolicy_tokens"]) == 2 * 16 and r["onpolicy_kd"] > 0 for r in rows)
    report = (run / "report.md").read_text()
    assert "## On-policy distillation" in report and "continuation CE (test)" in report
    assert (run / "final" / "adapter_config.json").exists()
