"""Both integration examples run offline as a new user would run them (fresh process, repo root)."""

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
