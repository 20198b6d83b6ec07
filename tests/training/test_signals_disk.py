"""Issue 19, items 6 and 10: signals, full disks, safe state loading.

* SIGINT / SIGTERM finish the step, write its checkpoint, say where to resume and exit 130 / 143; the
  resumed run is bit-identical to an uninterrupted one; a second signal stops at once.
* A checkpoint write that fails on a full disk is reported as a full disk (exit 2, the previous checkpoint
  kept) whatever the writer raises -- on a real 840 KiB tmpfs when this machine lets the test mount one
  (root), and simulated (torch.save raising its RuntimeError) everywhere.
* ``state.pt`` is loaded with ``weights_only=True``: a pickled object is refused, never run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ddk_fast.config import build_config, dump_toml
from ddk_fast.errors import CheckpointWriteError
from ddk_fast.train import main, run
from ddk_fast.training import checkpoint as ckpt
from ddk_fast.training.trainer import Trainer

from ..tiny import VOCAB, domain_texts, llama_config, make_tokenizer, write_domains

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    make_tokenizer(root / "tok", [t for docs in domain_texts().values() for t in docs])
    return root, write_domains(root / "data")


def raw(assets, run_dir, **over) -> dict:
    root, files = assets
    out = {
        "model": {
            "teacher_config": llama_config(VOCAB + 16),
            "student_from_teacher_layers": [0, 3],
            "tokenizer": str(root / "tok"),
            "student_mode": "lora",
            "lora_r": 4,
        },  # fmt: skip
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 16,
            "batch_size": 2,
            "val_sequences": 2,
            "cache_dir": str(root / "cache"),
            "prefetch": 2,
        },  # fmt: skip
        "ddk": {"interval": 5, "eval_batch_size": 4},
        "train": {"max_steps": 20, "lr": 5e-3, "warmup_steps": 1},
        "checkpoint": {"every": 100, "keep_last": 3},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
        "loss": {},
    }
    for key, value in over.items():
        if "__" not in key:  # a whole section
            out[key] = value
            continue
        section, name = key.split("__")
        out[section][name] = value
    return out


def _env() -> dict:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    env.pop("TRITON_INTERPRET", None)
    return env


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ------------------------------------------------------------------------------------------------ signals
class _StopAfter:
    """A stop request that turns on after ``n`` checks (the loop asks once per step)."""

    def __init__(self, n: int, signum: int = signal.SIGINT):
        self.n, self.signum_value, self.checks = n, signum, 0

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.n

    @property
    def signum(self):
        return self.signum_value if self.checks > self.n else None


def test_a_stop_request_finishes_the_step_and_checkpoints_it(assets, tmp_path):
    from ddk_fast.errors import Interrupted

    cfg = build_config(raw(assets, tmp_path / "run", train__max_steps=6, data__prefetch=0))
    t = Trainer(cfg, stop=_StopAfter(3))  # checked at the start, then in each step: on in step 3
    t.setup()
    with pytest.raises(Interrupted) as info:
        t.fit()
    exc = info.value
    assert exc.step == 3 and exc.exit_code == 130 and "interrupted by SIGINT after step 3" in str(exc)
    assert exc.checkpoint.name == "step_00000003" and ckpt.verify_checkpoint(exc.checkpoint) is None
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3]


def test_sigterm_checkpoints_exits_143_and_resume_is_bit_exact(assets, tmp_path):
    reference = tmp_path / "reference"
    assert run(build_config(raw(assets, reference))) == 0
    run_dir = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(build_config(raw(assets, run_dir))))
    cmd = [sys.executable, "-m", "ddk_fast.train", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(_rows(run_dir)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "interrupted by SIGTERM" in x][-1]
    step = int(line.split("after step ")[1].split(":")[0])
    assert 3 <= step < 20
    assert f"checkpoint {run_dir / 'checkpoints' / f'step_{step:08d}'} holds step {step}" in line
    assert line.endswith(f"continue with: python -m ddk_fast.train --config {config} --resume")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == f"step_{step:08d}"
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last = "checkpoints/step_00000020/trainable.safetensors"
    a, b = load_file(str(reference / last)), load_file(str(run_dir / last))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    ra, rb = _rows(reference), _rows(run_dir)
    assert [r["step"] for r in rb] == list(range(1, 21))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_a_second_signal_stops_at_once(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from ddk_fast.training.signals import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    print('ready', flush=True)\n"
        "    while not stop.requested:\n"
        "        time.sleep(0.01)\n"
        "    print('first', flush=True)\n"
        "    time.sleep(60)  # a long step: the second signal must not wait for it\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "first"
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 10
    assert "not reached" not in out and "SIGINT received again: stopping now, no checkpoint" in err


# ------------------------------------------------------------------------------------------------ full disk
def _model(n: int = 20_000) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(n // 10, 10, bias=False)  # n float32 weights


def _state(model) -> dict:
    return {"optimizer": {"exp_avg": torch.randn(model.weight.shape)}, "step": 1, "rng": ckpt.rng_state()}


@pytest.fixture
def tmpfs(tmp_path):
    """A real 840 KiB tmpfs (needs root and a kernel that lets this process mount)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=840k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]}); the simulated test covers it"
        )
    yield mnt
    import gc

    gc.collect()  # a traceback kept by pytest.raises may hold the failed writer's open file
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # detach now, freed when the file closes


def _fill(folder: Path, leave: int) -> None:
    """Write a filler file so that about ``leave`` bytes stay free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_full_tmpfs_is_reported_as_a_full_disk_and_the_previous_checkpoint_kept(tmpfs, monkeypatch):
    model = _model()  # 80 KB of weights, 80 KB of optimizer state
    first = ckpt.save_checkpoint(tmpfs / "checkpoints", 1, model, _state(model), keep_last=5)
    _fill(tmpfs, 100_000)  # the weights fit, the state.pt written by torch.save does not
    with pytest.raises(CheckpointWriteError, match=r"disk full while writing checkpoint step_00000002 .*"
                       r"the previous checkpoint .*step_00000001 is kept"):  # fmt: skip
        ckpt.save_checkpoint(tmpfs / "checkpoints", 2, model, _state(model), keep_last=5)
    # the same with the free-space check before writing switched off: torch.save's own failure
    monkeypatch.setattr(ckpt, "check_free_space", lambda *a: None)
    with pytest.raises(
        CheckpointWriteError, match=r"disk full while writing checkpoint step_00000002"
    ) as info:
        ckpt.save_checkpoint(tmpfs / "checkpoints", 2, model, _state(model), keep_last=5)
    assert not isinstance(info.value.__cause__, OSError)  # what the writer raised was not an OSError
    assert ckpt.verify_checkpoint(first) is None
    assert not (tmpfs / "checkpoints" / "step_00000002.tmp").exists()
    assert ckpt.latest_checkpoint(tmpfs / "checkpoints") == first


def test_a_run_on_a_full_tmpfs_exits_2_keeping_its_last_checkpoint(assets, tmpfs, capsys):
    inline = {
        "teacher_config": llama_config(VOCAB + 16), "student_config": llama_config(VOCAB + 16, layers=2),
        "tokenizer": str(assets[0] / "tok"), "student_mode": "lora", "lora_r": 4,
    }  # fmt: skip
    cfg = build_config(raw(assets, tmpfs / "run", checkpoint__every=1, checkpoint__keep_last=1000,
                           train__max_steps=60, model=inline))  # fmt: skip
    config = tmpfs.parent / "run.toml"
    config.write_text(dump_toml(cfg))
    rc = main(["--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: disk full while writing checkpoint step_" in err and "is kept" in err
    kept = ckpt.latest_checkpoint(tmpfs / "run" / "checkpoints")
    assert kept is not None and ckpt.verify_checkpoint(kept) is None
    failed = int(err.split("writing checkpoint step_")[1][:8])
    assert int(kept.name[5:]) == failed - 1


def test_a_full_disk_is_recognised_whatever_the_writer_raises(tmp_path, monkeypatch):
    """Simulated (no mount needed): torch.save raises what its zip writer raises on a full disk."""
    model = _model(2_000)
    first = ckpt.save_checkpoint(tmp_path / "c", 1, model, _state(model), keep_last=5)

    def full_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_save)
    monkeypatch.setattr(ckpt, "check_free_space", lambda *a: None)
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(
        CheckpointWriteError, match=r"disk full while writing checkpoint step_00000002.*unexpected pos"
    ):
        ckpt.save_checkpoint(tmp_path / "c", 2, model, _state(model), keep_last=5)
    assert ckpt.latest_checkpoint(tmp_path / "c") == first
    # with space left, the same RuntimeError is a bug, not a full disk: it is raised as it is
    monkeypatch.setattr(ckpt.shutil, "disk_usage", real)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.save_checkpoint(tmp_path / "c", 2, model, _state(model), keep_last=5)
    # ENOSPC anywhere in the chain counts too
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert ckpt.disk_full(tmp_path, outer)


def test_the_free_space_check_refuses_before_writing(tmp_path, monkeypatch):
    model = _model(2_000)
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=50_000))
    with pytest.raises(
        CheckpointWriteError, match=r"disk full .*50,000 bytes free, the checkpoint needs about"
    ):
        ckpt.save_checkpoint(tmp_path / "c", 1, model, _state(model), keep_last=5)
    assert not any((tmp_path / "c").iterdir())


# ------------------------------------------------------------------------------------------------ safe state
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_pickled_object_in_state_pt_is_refused_not_run(assets, tmp_path, capsys):
    cfg = build_config(
        raw(assets, tmp_path / "run", train__max_steps=2, checkpoint__every=1, data__prefetch=0)
    )
    t = Trainer(cfg)
    t.setup()
    t.fit(stop_at=1)
    path = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    state = torch.load(path / "state.pt", weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, path / "state.pt")  # what a hostile checkpoint would hold
    manifest = json.loads((path / "manifest.json").read_text())  # re-sign it: only the pickle is hostile
    manifest["files"] = ckpt._file_entries(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.verify_checkpoint(path) is None
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(cfg))
    rc = main(["--config", str(config), "--resume"])
    err = capsys.readouterr().err
    assert (
        rc == 2 and "state.pt holds objects other than tensors" in err and "refused without running it" in err
    )
    assert "GLOBAL posix.system" in err
    assert not marker.exists()  # the payload never ran


def test_new_checkpoints_hold_no_numpy_object_and_old_ones_still_load(tmp_path):
    import numpy as np

    model = _model(200)
    path = ckpt.save_checkpoint(tmp_path / "c", 1, model, {"rng": ckpt.rng_state()}, keep_last=2)
    torch.load(path / "state.pt", weights_only=True)  # no allow-list needed
    old = {"rng": {**ckpt.rng_state(), "numpy": np.random.get_state()}}  # the format before this change
    torch.save(old, path / "state.pt")
    state = ckpt._load_state(path)
    np.random.seed(5)
    ckpt.set_rng_state(state["rng"])
    a = np.random.rand(3)
    np.random.set_state(old["rng"]["numpy"])
    assert np.array_equal(a, np.random.rand(3))
