"""A tiny end-to-end DDK run on CPU (QLoRA student, inline Llama teacher with a padded vocab), resume
equality, the non-finite-loss guard and crash-safe checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from ddk_fast.errors import TrainingStopped
from ddk_fast.train import run
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.trainer import Trainer

from ..tiny import make_cfg


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_writes_report_plots_checkpoints(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run")
    assert run(cfg) == 0
    out = tmp_path / "run"
    for name in ("report.md", "domain_weights.png", "domain_losses.png", "config.toml", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(abs(sum(r["weights"]) - 1) < 1e-9 for r in rows)
    # weights change at the interval boundary (step 3) and are DDK's, not uniform
    assert rows[0]["weights"] != [1 / 3] * 3 and rows[3]["weights"] != rows[2]["weights"]
    assert (out / "final" / "adapter_config.json").exists()  # peft format
    assert (out / "final" / "tokenizer_config.json").exists()
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000006"
    report = (out / "report.md").read_text()
    for name in ("arith", "words", "code"):
        assert f"| {name} |" in report


def test_resume_gives_the_same_batches_weights_and_losses(assets, tmp_path):
    full = make_cfg(assets, tmp_path / "full")
    t = Trainer(full)
    t.setup()
    t.fit()
    reference = _rows(tmp_path / "full")
    ref_params = {n: p.detach().clone() for n, p in t.student.named_parameters() if p.requires_grad}

    cut = make_cfg(assets, tmp_path / "cut")
    t1 = Trainer(cut)
    t1.setup()
    t1.fit(stop_at=4)  # "crash" after step 4: the checkpoint of step 3 is the latest
    assert ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_00000003"

    t2 = Trainer(make_cfg(assets, tmp_path / "cut"))
    t2.setup()
    assert t2.resume() and t2.step == 3
    t2.fit()
    resumed = _rows(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference[3:], resumed[3:]):
        assert a["batch_fingerprint"] == b["batch_fingerprint"]
        assert a["weights"] == b["weights"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    for n, p in t2.student.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, ref_params[n], rtol=1e-5, atol=1e-7), n


def test_non_finite_losses_are_skipped_then_stop_the_run(assets, tmp_path, monkeypatch):
    cfg = make_cfg(assets, tmp_path / "nan", train__max_bad_steps=2, train__max_steps=6)
    t = Trainer(cfg)
    t.setup()
    real = t._loss
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        out = real(batch)
        if calls["n"] in (2,) or calls["n"] >= 5:  # one isolated NaN, then NaNs forever
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(t, "_loss", flaky)
    with pytest.raises(TrainingStopped, match=r"2 consecutive non-finite losses"):
        t.fit()
    assert t.bad_total == 3 and t.step == 3
    assert ckpt.latest_checkpoint(tmp_path / "nan" / "checkpoints").name == "step_00000003"


def test_crash_while_saving_keeps_the_previous_checkpoint(assets, tmp_path, monkeypatch):
    t = Trainer(make_cfg(assets, tmp_path / "crash"))
    t.setup()
    t.fit(stop_at=3)
    root = tmp_path / "crash" / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_00000003"

    def boom(*a, **k):
        raise OSError("disk full")

    t.step = 4
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root).name == "step_00000003"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), t.student)
    assert state["step"] == 3


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "skew_forward_kl", "total_variation"])
def test_every_configured_divergence_trains(assets, tmp_path, divergence):
    cfg = make_cfg(
        assets,
        tmp_path / divergence,
        loss__divergence=divergence,
        train__max_steps=2,
        ddk__interval=2,
        checkpoint__every=2,
    )
    t = Trainer(cfg)
    t.setup()
    t.fit()
    rows = _rows(tmp_path / divergence)
    assert len(rows) == 2 and all(r["kd"] > 0 and r["kd"] == r["kd"] for r in rows)


def test_test_split_never_steers_ddk_and_is_reported(assets, tmp_path, monkeypatch):
    """Every loss the mixer receives is a val-split measurement; the test split is scored once, at the end."""
    import ddk_fast.training.schedule as schedule_mod  # the one measurement path

    calls = []  # (kind, losses) in call order
    real_sums = schedule_mod.score_sets  # the scorer of training/scoring.py

    def spy(model, val_sets, *args, **kw):
        out = real_sums(model, val_sets, *args, **kw)
        kind = "test" if val_sets is trainer.test_sets else "val" if val_sets is trainer.val_sets else "?"
        calls.append((kind, schedule_mod.mean_losses(out)))
        return out

    monkeypatch.setattr(schedule_mod, "score_sets", spy)
    cfg = make_cfg(assets, tmp_path / "run", data__test_sequences=3)
    trainer = Trainer(cfg)
    trainer.setup()
    result = trainer.fit()
    kinds = [k for k, _ in calls]
    assert "?" not in kinds and kinds[-2:] == ["test", "test"]  # teacher then student, after the last step
    assert "test" not in kinds[:-2]
    val_outputs = [o for k, o in calls if k == "val"]
    for h in trainer.mixer.history:  # each update's inputs are exactly val-split measurements
        assert h["student_loss"] in val_outputs and h["teacher_loss"] in val_outputs
    test_outputs = [o for k, o in calls if k == "test"]
    assert result.teacher_test_losses == test_outputs[0] and result.test_losses == test_outputs[1]
    assert all(h["student_loss"] != result.test_losses for h in trainer.mixer.history)
    assert trainer.test_sets[0]["input_ids"].shape == (3, 32)
    from ddk_fast.training.report import write_report

    report = write_report(result, trainer.names).read_text()
    assert "student test" in report and "never steers anything" in report and "Test gap: mean" in report
