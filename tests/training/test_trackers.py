"""[output] report_to (issue 19, item 9): tensorboard and wandb get the scalars of metrics.jsonl, per-domain
ones included. wandb is an optional extra (in the dev extra, so CI runs this); WANDB_MODE=offline writes a
local run, read back here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddk_fast.config import build_config, dump_toml
from ddk_fast.errors import ConfigError
from ddk_fast.train import main, run
from ddk_fast.training.metrics import tracker_scalars
from ddk_fast.training.runfolder import check_trackers

from ..tiny import make_cfg


def _cfg(assets, run_dir, report_to):
    cfg = make_cfg(assets, run_dir, train__max_steps=3, checkpoint__every=10)
    cfg.output.report_to = report_to
    cfg.output.tensorboard = True
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_the_metrics_scalars_per_domain(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert run(_cfg(assets, run_dir, ["tensorboard"])) == 0
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = _rows(run_dir)
    names = ["arith", "words", "code"]
    want = tracker_scalars(rows[-1], names)
    assert {"loss", "ce", "kd", "domain_ce/arith", "domain_kd/code", "weights/words"} <= set(want)
    assert set(want) == tags
    for key in ("loss", "domain_ce/words"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert events[-1].value == pytest.approx(want[key], rel=1e-6)


def test_wandb_offline_run_gets_the_same_scalars(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'ddk_fast[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = _cfg(assets, run_dir, ["wandb"])
    cfg.output.wandb_project = "ddk-test"
    assert run(cfg) == 0
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = log.read_bytes()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id in log.name
    for row in _rows(run_dir):
        for key, value in tracker_scalars(row, ["arith", "words", "code"]).items():
            assert key.encode() in data, key
            assert json.dumps(value).encode() in data, (key, value)  # the value as wandb stores it (JSON)
    assert not (run_dir / "tensorboard").exists()  # only what report_to names


def test_report_to_wandb_without_wandb_installed_exits_2(assets, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = _cfg(assets, tmp_path / "run", ["tensorboard", "wandb"])
    with pytest.raises(
        ConfigError, match=r"\[output\] report_to: expected trackers that are installed.*wandb"
    ):
        check_trackers(cfg)
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(cfg))
    assert main(["--config", str(config)]) == 2
    assert "pip install 'ddk_fast[wandb]'" in capsys.readouterr().err


def test_tensorboard_false_still_turns_tensorboard_off():
    cfg = build_config(
        {
            "model": {"teacher_config": {"model_type": "llama"}, "student_config": {"model_type": "llama"},
                      "tokenizer": "t"},
            "data": {"domains": [{"name": "a", "files": ["x.jsonl"]}]},
            "output": {"tensorboard": False, "report_to": ["tensorboard", "wandb"]},
        },
        check_paths=False,
    )  # fmt: skip
    assert cfg.output.trackers == ["wandb"]
