"""Issue 10, "lose nothing under faults": one test (or more) per numbered case, asserting what happens now
(exit code, message, what is kept on disk). Case 11 (sampler states) is in test_sampler_fuzz.py; case 12
(loss inputs) belongs to the loss API's tests.

Most cases fail before any model loads and are checked through ``main()`` in-process (its output is what a
user sees: one line on stderr, no traceback). A few need real checkpoints: one short run (module fixture)
is copied per test and then damaged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddk_fast.config import build_config, dump_toml
from ddk_fast.data import prepare_domains
from ddk_fast.errors import CheckpointWriteError, ConfigError, NonFiniteError, NonFiniteTeacherError, RunError
from ddk_fast.train import main, run
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.nonfinite import TeacherGuard
from ddk_fast.training.runfolder import prepare_run_folder, truncate_metrics
from ddk_fast.training.runlock import RunLock
from ddk_fast.training.trainer import Trainer

from ..tiny import VOCAB, domain_texts, llama_config, make_tokenizer, write_domains

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-assets")
    texts = [t for docs in domain_texts().values() for t in docs]
    make_tokenizer(root / "tok", texts)
    return root, write_domains(root / "data")


def raw_cfg(assets, run_dir, **over) -> dict:
    root, files = assets
    raw = {
        "model": {
            "teacher_config": llama_config(VOCAB + 16),
            "student_from_teacher_layers": [0, 3],
            "tokenizer": str(root / "tok"),
            "student_mode": "lora",
            "lora_r": 4,
        },
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 32,
            "batch_size": 2,
            "val_sequences": 2,
            "cache_dir": str(root / "cache"),
            "prefetch": 0,
        },
        "ddk": {"interval": 2, "eval_batch_size": 4},
        "train": {"max_steps": 4, "lr": 5e-3, "warmup_steps": 1},
        "checkpoint": {"every": 1, "keep_last": 3},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
        "loss": {},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def cfg_of(assets, run_dir, **over):
    return build_config(raw_cfg(assets, run_dir, **over))


def write_toml(cfg, path: Path) -> Path:
    path.write_text(dump_toml(cfg))
    return path


def cli(capsys, config: Path, *args: str) -> tuple[int, str]:
    rc = main(["--config", str(config), *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture(scope="module")
def base_run(assets, tmp_path_factory):
    """A run interrupted after step 3 of 4: checkpoints step 1, 2, 3; metrics rows 1..3."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    t = Trainer(cfg_of(assets, run_dir))
    t.setup()
    t.fit(stop_at=3)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [1, 2, 3]
    return run_dir


@pytest.fixture
def copied(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def steps(run_dir: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")]


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ case 1
def test_1_resume_ignores_an_empty_or_dangling_latest(assets, copied):
    root = copied / "checkpoints"
    (root / "latest").write_text("")
    (root / "step_00000009").mkdir()  # a folder without state.pt, newer than every valid checkpoint
    with (copied / "metrics.jsonl").open("a") as f:  # step 4 was logged, then the run died mid-write
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    assert run(cfg_of(assets, copied), resume=True) == 0
    assert metric_steps(copied) == [1, 2, 3, 4]  # resumed at 3: no duplicate rows, torn line gone
    assert steps(copied) == [2, 3, 4, 9]  # valid older checkpoints kept (keep_last 3); 9 never deleted
    assert ckpt.latest_checkpoint(root).name == "step_00000004"


# ------------------------------------------------------------------------------------------------ case 2
def test_2_corrupt_checkpoints_fall_back_to_the_newest_valid_one(assets, copied, caplog):
    root = copied / "checkpoints"
    state = root / "step_00000003" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    adapter = next((root / "step_00000002" / "adapter").glob("*.safetensors"))
    data = bytearray(adapter.read_bytes())
    data[-10:] = bytes(10)  # same size, other bytes
    adapter.write_bytes(bytes(data))
    cfg = cfg_of(assets, copied)
    folder = prepare_run_folder(cfg, resume=True)
    folder.release()
    assert folder.resume_from.name == "step_00000001"
    reasons = {p.name: r for p, r in folder.rejected}
    assert "truncated" in reasons["step_00000003"] and "checksum" in reasons["step_00000002"]
    assert "skipping checkpoint" in caplog.text and "step_00000003" in caplog.text
    t = Trainer(cfg)
    t.setup()
    assert t.resume(folder.resume_from) and t.step == 1


def test_2_no_valid_checkpoint_exits_2_and_names_each(assets, copied, capsys):
    for _, path in ckpt.list_checkpoints(copied / "checkpoints"):
        (path / "trainable.safetensors").write_bytes(b"x")
    rc, err = cli(capsys, write_toml(cfg_of(assets, copied), copied.parent / "run.toml"), "--resume")
    assert rc == 2
    assert "no valid checkpoint in" in err and "step_00000001: trainable.safetensors has 1 bytes" in err
    assert steps(copied) == [1, 2, 3]  # nothing deleted


# ------------------------------------------------------------------------------------------------ case 3
def test_3_fresh_run_into_a_folder_with_checkpoints_exits_2(assets, copied, capsys):
    rc, err = cli(capsys, write_toml(cfg_of(assets, copied), copied.parent / "run.toml"))
    assert rc == 2 and "already holds 3 checkpoint(s)" in err and "--resume" in err and "--overwrite" in err
    assert steps(copied) == [1, 2, 3]


def test_3_overwrite_clears_only_the_run_files(assets, copied):
    (copied / "notes.txt").write_text("mine")
    folder = prepare_run_folder(cfg_of(assets, copied), overwrite=True)
    folder.release()
    assert not (copied / "checkpoints").exists() and not (copied / "metrics.jsonl").exists()
    assert (copied / "notes.txt").read_text() == "mine"


def _tiny(value: float = 1.0) -> nn.Module:
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_3_pruning_orders_by_step_and_keeps_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 100, _tiny(), {"step": 100}, keep_last=1)  # a longer, older run
    new = ckpt.save_checkpoint(root, 3, _tiny(), {"step": 3}, keep_last=1)
    assert new.exists() and ckpt.verify_checkpoint(new) is None
    assert (root / "latest").read_text().strip() == new.name  # not dangling
    assert (root / "step_00000100").exists()  # another run's newer checkpoint: never deleted silently
    # 9 digits sort before 8 by name: ordering by name pruned the newest checkpoint
    ckpt.save_checkpoint(tmp_path / "c2", 99_999_999, _tiny(), {}, keep_last=1)
    ckpt.save_checkpoint(tmp_path / "c2", 100_000_000, _tiny(), {}, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "c2")] == [100_000_000]


# ------------------------------------------------------------------------------------------------ case 4
def test_4_a_second_run_in_the_same_folder_exits_2_naming_the_pid(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = write_toml(cfg_of(assets, run_dir), tmp_path / "run.toml")
    with RunLock(run_dir):
        rc, err = cli(capsys, config)
    assert rc == 2 and f"in use by another run (PID {os.getpid()})" in err
    assert not (run_dir / "checkpoints").exists()


def test_4_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = f"from ddk_fast.training.runlock import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
    code += "print('ok', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert proc.stdout.readline().strip() == "ok"
        with pytest.raises(RunError, match=f"PID {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    RunLock(tmp_path).acquire().release()  # kill -9 released it


# ------------------------------------------------------------------------------------------------ case 5
def test_5_student_init_is_rebuilt_when_the_student_config_changes(assets, tmp_path, caplog):
    from ddk_fast.models.loading import load_student, load_teacher

    caplog.set_level(logging.INFO, logger="ddk_fast")
    cfg = cfg_of(assets, tmp_path, model__student_mode="full")
    dev = torch.device("cpu")
    teacher = load_teacher(cfg.model, dev, torch.float32, 0)
    load_student(cfg.model, lambda: teacher, dev, torch.float32, tmp_path, 0)
    layers = lambda: json.loads((tmp_path / "student_init" / "config.json").read_text())["num_hidden_layers"]
    assert layers() == 2
    cfg2 = cfg_of(assets, tmp_path, model__student_mode="full", model__student_from_teacher_layers=[0, 1, 3])
    student = load_student(cfg2.model, lambda: teacher, dev, torch.float32, tmp_path, 0)
    assert layers() == 3 and student.config.num_hidden_layers == 3
    assert "rebuilding" in caplog.text
    caplog.clear()
    load_student(cfg2.model, lambda: teacher, dev, torch.float32, tmp_path, 0)
    assert "reusing" in caplog.text and "rebuilding" not in caplog.text
    # another teacher (same layers): rebuilt as well
    cfg3 = cfg_of(
        assets,
        tmp_path,
        model__student_mode="full",
        model__student_from_teacher_layers=[0, 1, 3],
        model__teacher_config=llama_config(VOCAB + 16, hidden=32),
    )
    teacher3 = load_teacher(cfg3.model, dev, torch.float32, 0)
    student3 = load_student(cfg3.model, lambda: teacher3, dev, torch.float32, tmp_path, 0)
    assert student3.config.hidden_size == 32


# ------------------------------------------------------------------------------------------------ case 6
class _NaNGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_6_a_finite_loss_with_a_nan_gradient_is_skipped(assets, tmp_path, monkeypatch):
    t = Trainer(cfg_of(assets, tmp_path / "run", train__max_steps=3))
    t.setup()
    real, calls = t._loss, {"n": 0}

    def nan_grad_once(batch):
        calls["n"] += 1
        out = real(batch)
        return out._replace(loss=_NaNGrad.apply(out.loss)) if calls["n"] == 2 else out

    monkeypatch.setattr(t, "_loss", nan_grad_once)
    t.fit()
    assert t.bad_total == 1 and t.step == 3
    for n, p in t.student.named_parameters():
        assert torch.isfinite(p).all(), n
    tensors = ckpt.load_file(
        str(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainable.safetensors")
    )
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_6_non_finite_weights_are_never_saved(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, _tiny(), {"step": 1}, keep_last=2)
    with pytest.raises(NonFiniteError, match=r"step 2: 1 trainable parameter\(s\) are not finite.*weight"):
        ckpt.save_checkpoint(root, 2, _tiny(float("nan")), {"step": 2}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1] and not list(root.glob("*.tmp"))
    assert ckpt.latest_checkpoint(root).name == "step_00000001"


# ------------------------------------------------------------------------------------------------ case 7
def test_7_a_non_finite_teacher_gets_its_own_error(assets, tmp_path):
    t = Trainer(cfg_of(assets, tmp_path / "run"))
    t.setup()
    with torch.no_grad():
        t.teacher.model.get_decoder().norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteTeacherError, match=r"step 0: the teacher's validation loss is not finite on "
                       r"domain arith, words, code; the fault is in the teacher"):  # fmt: skip
        t.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_7_teacher_guard_names_step_and_domain():
    guard = TeacherGuard(["a", "b", "c"])
    hidden = torch.zeros(2, 3, 4)
    dom = np.array([[0, 0, 0], [2, 2, 2]])
    guard.start_step()
    guard.observe(5, hidden, dom, torch.as_tensor(dom).reshape(-1))  # first forward on a and c: finite
    hidden[0, 1, 2] = float("inf")
    guard.start_step()
    guard.observe(6, hidden, dom, torch.as_tensor(dom).reshape(-1))  # seen domains: no host read
    with pytest.raises(NonFiniteTeacherError, match=r"step 6: .*not finite in a step whose loss was not "
                       r"finite, on domain a \(1 tokens\)"):  # fmt: skip
        guard.check(6)
    hidden = torch.full((1, 2, 4), float("nan"))
    with pytest.raises(
        NonFiniteTeacherError, match=r"step 7: .*at its first forward on the domain, on domain b"
    ):
        guard.start_step()
        guard.observe(7, hidden, np.array([[1, 1]]), torch.tensor([1, 1]))


def test_7_cli_exits_3_on_a_non_finite_teacher(assets, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(llama_config(VOCAB + 16))
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    with torch.no_grad():
        teacher.get_output_embeddings().weight.fill_(float("inf"))
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = cfg_of(assets, tmp_path / "run", model__teacher=str(tmp_path / "teacher"), model__teacher_config={})
    rc, err = cli(capsys, write_toml(cfg, tmp_path / "run.toml"))
    assert rc == 3 and "training stopped: step 0: the teacher's validation loss is not finite" in err


# ------------------------------------------------------------------------------------------------ case 8
class Dom:
    def __init__(self, name, files, text_field="text"):
        self.name, self.files, self.text_field = name, files, text_field


def test_8_bad_records_are_counted_and_stop_the_run(assets, tmp_path, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets[0] / "tok")
    good = [json.dumps({"text": t}) + "\n" for t in domain_texts()["words"]]
    path = tmp_path / "web.jsonl"
    lines = [x.encode() for x in good[:6] + ['{"body": "no text field"}\n'] + good[6:20]]
    lines += [b'{"text": "\xff\xfe not utf-8"}\n']  # line 22
    lines += [x.encode() for x in good[20:30] + ['{"text": ""}\n'] + good[30:]]
    path.write_bytes(b"".join(lines))
    args = dict(seq_len=16, val_sequences=2)
    with pytest.raises(ConfigError, match=r"expected at most \[data\] max_bad_records = 0.0 of a file's "
                       r"records bad, got \".*web.jsonl:7: no field 'text'\".*3 of 63 records bad.*"
                       r"1 without a string field 'text', 1 empty, 1 undecodable"):  # fmt: skip
        prepare_domains([Dom("web", [str(path)])], tok, tmp_path / "cache", **args)
    out = prepare_domains([Dom("web", [str(path)])], tok, tmp_path / "cache", max_bad_records=0.05, **args)
    (faults,) = out[0].faults
    assert (faults.records, faults.missing_field, faults.empty, faults.undecodable) == (63, 1, 1, 1)
    assert "skipped 3 of 63 records bad" in caplog.text
    with pytest.raises(ConfigError, match=r"max_bad_records = 0.01"):  # the cached shards are checked too
        prepare_domains([Dom("web", [str(path)])], tok, tmp_path / "cache", max_bad_records=0.01, **args)


# ------------------------------------------------------------------------------------------------ case 9
def _teacher_cfg(assets, tmp_path, folder: Path):
    return cfg_of(assets, tmp_path / "run", model__teacher=str(folder), model__teacher_config={})


def test_9_empty_teacher_folder_exits_2(assets, tmp_path, capsys):
    (tmp_path / "teacher").mkdir()
    rc, err = cli(
        capsys, write_toml(_teacher_cfg(assets, tmp_path, tmp_path / "teacher"), tmp_path / "r.toml")
    )
    assert rc == 2 and "[model] teacher: expected a Hugging Face model folder" in err
    assert "the folder is empty" in err and len(err.strip().splitlines()) == 1


def test_9_corrupt_teacher_folder_exits_2(assets, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(llama_config(VOCAB + 16))
    AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).save_pretrained(
        tmp_path / "teacher"
    )
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a truncated copy
    config = write_toml(_teacher_cfg(assets, tmp_path, tmp_path / "teacher"), tmp_path / "r.toml")
    rc, err = cli(capsys, config)
    assert rc == 2 and "model.safetensors: 5000 bytes, its header needs" in err and "truncated" in err
    (tmp_path / "teacher" / "config.json").write_text("{not json")
    rc, err = cli(capsys, config)
    assert rc == 2 and "config.json is not valid JSON" in err


def test_9_resume_after_lora_r_changed_exits_2(assets, copied, capsys):
    config = write_toml(cfg_of(assets, copied), copied.parent / "run.toml")
    rc, err = cli(capsys, config, "--resume", "--set", "model.lora_r=8")
    assert rc == 2 and "[model] lora_r: expected 4 as in checkpoint" in err and "got 8" in err
    # the load itself also checks shapes, naming the tensor
    t = Trainer(cfg_of(assets, copied, model__lora_r=8))
    t.setup()
    with pytest.raises(RunError, match=r"lora_A.*has shape \[4, \d+\] in the checkpoint but \[8, \d+\] here"):
        t.resume(copied / "checkpoints" / "step_00000003")


def test_9_read_only_run_folder_exits_2(assets, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    config = write_toml(cfg_of(assets, run_dir), tmp_path / "r.toml")
    if os.geteuid() == 0:  # root writes through mode bits: refuse the write the way a read-only mount does
        import ddk_fast.training.runfolder as rf

        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(rf, "open", refuse, raising=False)
    else:
        run_dir.chmod(0o555)
    try:
        rc, err = cli(capsys, config)
    finally:
        run_dir.chmod(0o755)
    assert rc == 2 and "[output] dir: expected a folder this user can create and write" in err


def test_9_disk_full_while_writing_a_checkpoint_exits_2_and_keeps_the_previous(
    assets, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    config = write_toml(cfg_of(assets, run_dir, train__max_steps=2), tmp_path / "r.toml")
    real, calls = torch.save, {"n": 0}

    def full_at_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(torch, "save", full_at_second)
    rc, err = cli(capsys, config)
    assert rc == 2
    assert "disk full while writing checkpoint step_00000002" in err
    assert f"the previous checkpoint {run_dir / 'checkpoints' / 'step_00000001'} is kept" in err
    assert steps(run_dir) == [1] and not list((run_dir / "checkpoints").glob("*.tmp"))


def test_9_disk_full_in_save_checkpoint_is_an_oserror_too(tmp_path, monkeypatch):
    root = tmp_path / "c"
    ckpt.save_checkpoint(root, 1, _tiny(), {}, keep_last=2)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointWriteError, match=r"disk full .*step_00000001 is kept") as info:
        ckpt.save_checkpoint(root, 2, _tiny(), {}, keep_last=2)
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "model.attn_implementation=flash_attention_2",
            "[model] attn_implementation: expected sdpa or eager here",
        ),
        ("model.attn_implementation=flash", "[model] attn_implementation: expected one of 'sdpa'"),
        ("data.domains[x].weight=1", "--set: expected section.key=value"),
        ("loss.temperature.x=1", "--set: expected a path through tables"),
        ("loss.skew_lambda=1.0", "[loss] skew_lambda: expected a number in [0, 1)"),
        ("loss.temperature=1e-30", "[loss] temperature: expected a number in [0.05, 100.0]"),  # case 10
    ],
)
def test_9_10_bad_settings_exit_2_before_any_model_loads(assets, tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    rc, err = cli(capsys, write_toml(cfg_of(assets, run_dir), tmp_path / "r.toml"), "--set", override)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (run_dir / "student_init").exists()  # stopped before building any model


def test_10_temperature_bounds_explain_why():
    with pytest.raises(ConfigError, match=r"T² scales the KD term to ~0"):
        build_config({"loss": {"temperature": 1e-30}, "model": {}, "data": {}}, check_paths=False)


# ------------------------------------------------------------------------------------------------ helpers
def test_truncate_metrics_keeps_rows_up_to_the_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5')
    assert truncate_metrics(p, 2) == 3
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]
