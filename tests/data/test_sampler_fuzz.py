"""Corrupt sampler states never crash the process (issue: the C++ core segfaulted on a huge seq_index).

The fuzzing runs in a subprocess (tests/sampler_fuzz_worker.py) so that a segfault fails this test
instead of killing pytest. With ``DDK_FAST_REQUIRE_EXT=1`` (CI) the C++ backend must be among those fuzzed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddk_fast.backend import sampler_ext_import_error
from ddk_fast.data import DomainSampler, TokenShard

REPO = Path(__file__).resolve().parents[2]
N = 250  # states per backend (random and mutated), plus N raw arrays into the C++ core


def test_fuzzed_states_never_crash_either_backend(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DDK_FAST_SAMPLER_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "data" / "sampler_fuzz_worker.py"), str(tmp_path), str(N)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    want = ["numpy"] + (
        ["cpp", "cpp_core"]
        if sampler_ext_import_error() is None or os.environ.get("DDK_FAST_REQUIRE_EXT") == "1"
        else []
    )
    assert sorted(report) == sorted(want)
    for name, counts in report.items():
        assert counts["accepted"] + counts["rejected"] == N, name
        assert counts["rejected"] > N // 4, (name, counts)  # most mutations are caught
        assert counts["accepted"] > 0, (name, counts)  # the unmutated state still loads


@pytest.fixture
def sampler(tmp_path):
    docs = [np.arange(1, 6), np.arange(1, 9)]
    shards = [TokenShard.write(tmp_path / f"d{i}", docs, vocab_size=100) for i in range(2)]
    return DomainSampler(shards, [1, 1], seq_len=4, batch_size=2, sep_token_id=0, backend="numpy")


def test_unnormalised_weights_in_a_state_are_rejected(sampler):
    state = sampler.state_dict()
    state["weights"] = [3.0, 1.0]
    with pytest.raises(ValueError, match=r"weights: expected numbers that sum to 1, got sum 4.0"):
        sampler.load_state_dict(state)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("seq_index", [2**62, 0], r"seq_index: expected 2 integers in \[0, "),
        ("seq_index", [1.5, 0], r"seq_index: expected 2 integers"),
        ("window_counts", [-1, 0], r"window_counts: expected 2 integers"),
        ("seq_len", "4", r"seq_len: expected an integer >= 0"),
        ("weights", [float("nan"), 1.0], r"weights: expected finite numbers"),
        ("batches", None, r"batches: expected an integer"),
    ],
)
def test_each_state_field_is_validated(sampler, key, value, match):
    before = sampler.state_dict()
    state = dict(before, **{key: value})
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == before  # unchanged


def test_overflowing_weights_are_a_value_error(sampler):
    with pytest.raises(ValueError, match=r"weights: expected numbers whose sum is finite"):
        sampler.set_weights([1e308, 1e308])
