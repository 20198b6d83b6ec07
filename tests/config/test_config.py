"""Config acceptance and rejection: every bad value is named with its key path, the value and what was
expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddk_fast.config import build_config, dump_toml, load_config, parse_override, reference_markdown
from ddk_fast.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def good(tmp_path) -> dict:
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "hello"}\n')
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    return {
        "model": {"teacher": str(teacher), "student_from_teacher_layers": [0, 1]},
        "data": {"domains": [{"name": "a", "files": [str(data)]}, {"name": "b", "files": [str(data)]}]},
        "loss": {"temperature": 2, "divergence": "jsd"},
    }


def test_good_config_builds_with_defaults(good):
    cfg = build_config(good)
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.ddk.alpha == 0.5 and cfg.loss.kd_weight == 0.2  # the paper's α and γ
    assert [d.name for d in cfg.data.domains] == ["a", "b"]


def test_resolved_config_round_trips_through_toml(good, tmp_path):
    cfg = build_config(good)
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def _set(d: dict, path: str, value):
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    if keys[-1].isdigit():
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


BAD = [
    # (key to set, value, expected message fragment)
    ("loss.temperature", -1, r"\[loss\] temperature: expected a number in \[0.05, 100.0\] \(below, .*got -1"),
    ("loss.temperature", "hot", r"\[loss\] temperature: expected a number, got 'hot'"),
    (
        "loss.divergence",
        "kl",
        r"\[loss\] divergence: expected one of 'forward_kl', 'reverse_kl', 'jsd', .*, got 'kl'",
    ),
    ("loss.beta", 1.5, r"\[loss\] beta: expected a number in \[0, 1\], got 1.5"),
    ("loss.kd_weight", -0.1, r"\[loss\] kd_weight: expected a number >= 0"),
    ("loss.tempreature", 1.0, r"\[loss\] tempreature: expected no such key \(known keys: .*temperature"),
    ("ddk.alpha", 2, r"\[ddk\] alpha: expected a number in \[0, 1\], got 2"),
    ("ddk.interval", 0, r"\[ddk\] interval: expected an integer >= 1, got 0"),
    ("ddk.interval", 2.5, r"\[ddk\] interval: expected an integer, got 2.5"),
    ("ddk.mixing", "random", r"\[ddk\] mixing: expected one of 'ddk', 'uniform', 'static'"),
    ("ddk.smoothing", "yes", r"\[ddk\] smoothing: expected true or false, got 'yes'"),
    ("train.max_steps", -5, r"\[train\] max_steps: expected an integer >= 1, got -5"),
    ("train.lr", float("nan"), r"\[train\] lr: expected a finite number"),
    ("train.warmup_steps", 5000, r"\[train\] warmup_steps: expected at most train.max_steps \(1000\)"),
    ("train.device", "tpu", r"\[train\] device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("data.seq_len", 0, r"\[data\] seq_len: expected an integer >= 1, got 0"),
    ("data.sampler_backend", "rust", r"\[data\] sampler_backend: expected one of 'auto', 'cpp', 'numpy'"),
    ("data.domains", [], r"\[data\] domains: expected at least one \[\[data.domains\]\] table, got \[\]"),
    ("data.domains.1.name", "a", r"\[data.domains\[1\]\] name: expected a name not used by another domain"),
    ("data.domains.0.files", [], r"\[data.domains\[0\]\] files: expected a non-empty list of file paths"),
    (
        "data.domains.0.files",
        ["/nonexistent/x.jsonl"],
        r"\[data.domains\[0\].files\] 0|\[data.domains\[0\]\] files\[0\]: expected an existing file",
    ),
    ("data.domains.0.weight", -1, r"\[data.domains\[0\]\] weight: expected a number >= 0, got -1"),
    ("data.domains.0.colour", "red", r"\[data.domains\[0\]\] colour: expected no such key"),
    ("model.teacher", "/nonexistent/teacher", r"\[model\] teacher: expected an existing folder"),
    ("model.student_mode", "int8", r"\[model\] student_mode: expected one of 'qlora', 'lora', 'full'"),
    ("model.lora_r", 0, r"\[model\] lora_r: expected an integer >= 1, got 0"),
    ("model.lora_dropout", 1.0, r"\[model\] lora_dropout: expected a number in \[0, 1\)"),
    (
        "model.student_from_teacher_layers",
        [3, 1],
        r"\[model\] student_from_teacher_layers: expected distinct, "
        r"increasing layer indices",
    ),
    ("model.student", "/some/student", r"\[model\] student: expected exactly one of student, "),
    ("checkpoint.keep_last", 0, r"\[checkpoint\] keep_last: expected an integer >= 1, got 0"),
    (
        "optimizer",
        {"lr": 1},
        r"optimizer: expected a section \(checkpoint, curriculum, data, ddk, hidden, loss, model, onpolicy, "
        r"output, teacher_prompt, train\)",
    ),
]


@pytest.mark.parametrize("key,value,match", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_config_is_rejected_with_a_precise_message(good, key, value, match):
    _set(good, key, value)
    with pytest.raises(ConfigError, match=match):
        build_config(good)


def test_static_mixing_needs_a_positive_weight(good):
    good["ddk"] = {"mixing": "static"}
    for d in good["data"]["domains"]:
        d["weight"] = 0
    with pytest.raises(ConfigError, match=r"static mixing needs at least one domain weight > 0"):
        build_config(good)


def test_file_with_unknown_extension_is_rejected(good, tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("x\n")
    good["data"]["domains"][0]["files"] = [str(csv)]
    with pytest.raises(ConfigError, match=r"expected a .jsonl, .json, .parquet or .txt file"):
        build_config(good)


def test_overrides_parse_types_and_indices():
    assert parse_override("loss.temperature=2") == (["loss", "temperature"], 2)
    assert parse_override("output.dir=runs/x") == (["output", "dir"], "runs/x")
    assert parse_override("data.domains[1].weight=0.5") == (["data", "domains", 1, "weight"], 0.5)
    assert parse_override("ddk.smoothing=false") == (["ddk", "smoothing"], False)
    with pytest.raises(ConfigError, match=r"--set: expected section.key=value"):
        parse_override("loss.temperature")


def test_override_is_validated_like_the_file(good, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(build_config(good)))
    assert (
        load_config(path, ["loss.temperature=3", "data.domains[1].weight=0.25"]).data.domains[1].weight
        == 0.25
    )
    with pytest.raises(ConfigError, match=r"\[loss\] temperature: expected a number in \[0.05, 100.0\]"):
        load_config(path, ["loss.temperature=0"])


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[loss\ntemperature = 1")
    with pytest.raises(ConfigError, match=r"--config: expected valid TOML"):
        load_config(path)


def test_reference_documents_every_key():
    ref = reference_markdown()
    for key in ("[loss] temperature", "[ddk] alpha", "[[data.domains]] files", "[checkpoint] every"):
        assert f"`{key}`" in ref


def test_cli_bad_config_exits_2_without_traceback_and_before_loading(good, tmp_path):
    good["loss"]["temperature"] = -1
    path = tmp_path / "run.toml"
    # write the raw (invalid) TOML by hand: dump_toml only takes valid configs
    path.write_text(
        f'[model]\nteacher = "{good["model"]["teacher"]}"\nstudent_from_teacher_layers = [0]\n'
        f'[[data.domains]]\nname = "a"\nfiles = {good["data"]["domains"][0]["files"]!r}\n'
        "[loss]\ntemperature = -1\n".replace("'", '"')
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ddk_fast.train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "[loss] temperature: expected a number in [0.05, 100.0]" in proc.stderr and "got -1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    missing = [row for row in reference_markdown().splitlines() if row not in readme]
    assert not missing, "README config reference is stale; regenerate with `python -m ddk_fast.config`"
