"""Models by Hub id or folder (issue 19, items 1 and 10): resolution through a Hugging Face cache laid out
as the Hub client writes it (``hub/models--org--name/{blobs,snapshots/<commit>,refs/<rev>}``) with
HF_HUB_OFFLINE=1, revisions, a model missing from the cache, and remote code refused by default."""

from __future__ import annotations

import json

import pytest
import torch

from ddk_fast.config import build_config, dump_toml
from ddk_fast.errors import ConfigError
from ddk_fast.models.hub import resolve_source
from ddk_fast.models.loading import load_teacher, load_tokenizer
from ddk_fast.train import main

from ..tiny import (
    VOCAB,
    domain_texts,
    hub_cache,
    llama_config,
    make_tokenizer,
    save_tiny_model,
    write_domains,
)


def _raw(teacher: str) -> dict:
    return {
        "model": {"teacher": teacher, "student_from_teacher_layers": [0]},
        "data": {"domains": [{"name": "a", "files": ["x.jsonl"]}]},
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub cache under a temporary HF_HOME holding org/teacher at two revisions."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests run offline (conftest)
    texts = [t for docs in domain_texts().values() for t in docs]
    make_tokenizer(tmp_path / "tok", texts)
    save_tiny_model(
        tmp_path / "m1", llama_config(VOCAB + 16, layers=2), seed=1, tokenizer_dir=tmp_path / "tok"
    )
    save_tiny_model(
        tmp_path / "m2", llama_config(VOCAB + 16, layers=3), seed=2, tokenizer_dir=tmp_path / "tok"
    )
    home = tmp_path / "hf"
    hub_cache(home, "org/teacher", tmp_path / "m1", commit="1" * 40)
    hub_cache(home, "org/teacher", tmp_path / "m2", commit="2" * 40, ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # what HF_HOME=<home> gives
    return tmp_path


def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads_by_id(hub):
    src = resolve_source("org/teacher", "model.teacher")
    assert src.is_hub and src.folder.name == "1" * 40 and src.record == "org/teacher"
    cfg = build_config(_raw("org/teacher"), check_paths=False)
    teacher = load_teacher(cfg.model, torch.device("cpu"), torch.float32, 0)
    assert teacher.name_or_path == "org/teacher" and teacher.config.num_hidden_layers == 2
    assert len(load_tokenizer(cfg.model)) == VOCAB
    cfg.model.teacher_revision = "v2"  # a branch / tag: refs/v2
    teacher = load_teacher(cfg.model, torch.device("cpu"), torch.float32, 0)
    assert teacher.config.num_hidden_layers == 3
    cfg.model.teacher_revision = "2" * 40  # a commit
    assert resolve_source("org/teacher", "model.teacher", "2" * 40).folder.name == "2" * 40


def test_a_hub_id_missing_from_the_cache_is_named(hub):
    want = r"\[model\] student: expected a Hub id in the Hugging Face cache \(HF_HUB_OFFLINE=1: nothing is "
    with pytest.raises(ConfigError, match=want + r"downloaded\), got 'org/absent'.*models--org--absent"):
        resolve_source("org/absent", "model.student")
    with pytest.raises(ConfigError, match=r"Hub id in the Hugging Face cache at revision v9"):
        resolve_source("org/teacher", "model.teacher", "v9")
    with pytest.raises(ConfigError, match=r"expected an existing folder or a Hub id"):
        resolve_source("./not/here", "model.teacher")


def test_the_cli_exits_2_naming_a_missing_hub_id_before_loading(hub, tmp_path, capsys):
    files = write_domains(tmp_path / "data")
    raw = {
        "model": {"teacher": "org/teacher", "student": "org/student-not-downloaded", "student_mode": "full"},
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 16,
            "cache_dir": str(tmp_path / "cache"),
        },  # fmt: skip
        "output": {"dir": str(tmp_path / "run")},
    }
    config = tmp_path / "run.toml"
    config.write_text(dump_toml(build_config(raw)))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "[model] student: expected a Hub id in the Hugging Face cache" in err
    assert "'org/student-not-downloaded'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_remote_code_is_refused_unless_trusted(hub, tmp_path, capsys):
    from ddk_fast.training.runfolder import check_models

    folder = tmp_path / "custom"
    save_tiny_model(folder, llama_config(VOCAB + 16, layers=2), tokenizer_dir=tmp_path / "tok")
    conf = json.loads((folder / "config.json").read_text())
    conf.update(model_type="mycustomlm", auto_map={"AutoModelForCausalLM": "modeling_my.MyLM"})
    (folder / "config.json").write_text(json.dumps(conf))
    hub_cache(tmp_path / "hf", "org/custom", folder, commit="3" * 40)
    want = r"\[model\] trust_remote_code: expected true to load org/custom, got False \(its config.json names"
    with pytest.raises(ConfigError, match=want):
        check_models(build_config(_raw("org/custom"), check_paths=False))
