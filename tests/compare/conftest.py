"""The quick comparison every compare test module shares (built once per session: a demo and 8-step runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddk_fast.compare.__main__ import main
from ddk_fast.demo.__main__ import prepare_demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    demo = prepare_demo(root / "demo", tiny=True, progress=False)
    text = (REPO / "examples" / "compare.toml").read_text().replace(".cache/demo", str(demo["out"]))
    cfg = root / "compare.toml"
    cfg.write_text(text)
    args = [
        "--config", str(cfg), "--quick", "--work", str(root / "out"),
        "--set", "data.seq_len=16", "--set", "data.batch_size=4", "--set", "data.val_sequences=2",
        "--set", "data.test_sequences=3", "--set", "compare.quick_steps=8",
    ]  # fmt: skip
    assert main(args) == 0
    return root, args, json.loads((root / "out" / "results.json").read_text())
