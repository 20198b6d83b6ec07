"""Issue 19, "the first hour": one test per problem a new user hit (each failed before the fix).

1. ``seq_len`` above a model's ``max_position_embeddings`` (GPT-2: IndexError; Qwen2: trained silently).
2. A teacher folder without tokenizer files (the data was blamed).
3. ``--resume --set train.lr=...`` (the old lr was used, the new one recorded).
4. ``final/`` not portable (the base model recorded as a relative path).
7. ``.txt`` files split into one document per line.
8. ``DistillationTrainer``: a vocabulary mismatch found only inside ``train()``; only the total loss logged.

(5, a full disk, and 6, signals, are in test_signals_disk.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddk_fast.config import build_config, dump_toml
from ddk_fast.data import prepare_config_domains
from ddk_fast.train import main, run
from ddk_fast.training.trainer import Trainer

from ..tiny import (
    VOCAB,
    domain_texts,
    llama_config,
    make_tokenizer,
    qwen2_config,
    save_tiny_model,
    write_domains,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-hour")
    texts = [t for docs in domain_texts().values() for t in docs]
    make_tokenizer(root / "tok", texts)
    return root, write_domains(root / "data")


def raw(assets, run_dir, model: dict, **over) -> dict:
    root, files = assets
    out = {
        "model": {"tokenizer": str(root / "tok"), "student_mode": "lora", "lora_r": 4, **model},
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 16,
            "batch_size": 2,
            "val_sequences": 2,
            "cache_dir": str(root / "cache"),
            "prefetch": 0,
        },
        "ddk": {"interval": 2, "eval_batch_size": 4},
        "train": {"max_steps": 4, "lr": 5e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep_last": 3},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
        "loss": {},
    }
    for key, value in over.items():
        section, name = key.split("__")
        out[section][name] = value
    return out


def cli(capsys, raw_cfg: dict, path: Path, *args: str) -> tuple[int, str]:
    path.write_text(dump_toml(build_config(raw_cfg, check_paths=False)))
    rc = main(["--config", str(path), *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


INLINE = {"teacher_config": llama_config(VOCAB + 16), "student_from_teacher_layers": [0, 3]}


# ----------------------------------------------------------------------------------------------- 1
def test_1_seq_len_above_a_gpt2_teachers_positions_exits_2_before_loading(assets, tmp_path, capsys):
    root, _ = assets
    gpt2 = dict(model_type="gpt2", vocab_size=VOCAB + 16, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    teacher = save_tiny_model(tmp_path / "gpt2", gpt2, tokenizer_dir=root / "tok")
    student = dict(gpt2, n_positions=64)
    r = raw(assets, tmp_path / "run", {"teacher": str(teacher), "student_config": student}, data__seq_len=32)
    rc, err = cli(capsys, r, tmp_path / "run.toml")
    assert rc == 2
    assert "[data] seq_len: expected at most 16: the teacher" in err and "max_position_embeddings = 16" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_1_seq_len_above_a_qwen2_pairs_trained_context_exits_2(assets, tmp_path, capsys):
    root, _ = assets
    teacher = save_tiny_model(
        tmp_path / "t", qwen2_config(VOCAB + 16, positions=32), tokenizer_dir=root / "tok"
    )
    student = save_tiny_model(tmp_path / "s", qwen2_config(VOCAB + 16, positions=32), seed=1)
    r = raw(assets, tmp_path / "run", {"teacher": str(teacher), "student": str(student)}, data__seq_len=48)
    rc, err = cli(capsys, r, tmp_path / "run.toml")
    assert rc == 2 and "[data] seq_len: expected at most 32" in err and "max_position_embeddings = 32" in err


# ----------------------------------------------------------------------------------------------- 2
def test_2_a_teacher_folder_without_tokenizer_files_is_named_not_the_data(assets, tmp_path, capsys):
    teacher = save_tiny_model(tmp_path / "teacher", llama_config(VOCAB + 16))  # no tokenizer files
    model = {"teacher": str(teacher), "tokenizer": "", "student_from_teacher_layers": [0, 1]}
    rc, err = cli(capsys, raw(assets, tmp_path / "run", model), tmp_path / "run.toml")
    assert rc == 2
    assert "[model] teacher: expected a folder or Hub id with tokenizer files" in err
    assert "tokenises" not in err  # the data is not blamed


def test_2_a_tokenizer_that_does_not_cover_the_model_is_refused(assets, tmp_path, capsys):
    root, _ = assets
    teacher = save_tiny_model(tmp_path / "teacher", llama_config(4 * VOCAB), tokenizer_dir=root / "tok")
    model = {"teacher": str(teacher), "tokenizer": "", "student_from_teacher_layers": [0, 1]}
    rc, err = cli(capsys, raw(assets, tmp_path / "run", model), tmp_path / "run.toml")
    assert rc == 2 and f"covering the teacher ({teacher})'s vocabulary of {4 * VOCAB} rows" in err


# ----------------------------------------------------------------------------------------------- 3
@pytest.fixture(scope="module")
def stopped_run(assets, tmp_path_factory):
    """4 planned steps, stopped after 2 (checkpoint step 2)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    cfg = build_config(raw(assets, run_dir, INLINE))
    t = Trainer(cfg)
    t.setup()
    t.fit(stop_at=2)
    return run_dir


def test_3_a_new_lr_on_resume_is_used_from_the_resumed_step_and_recorded_with_it(
    assets, stopped_run, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    cfg = build_config(raw(assets, run_dir, INLINE, train__lr=1e-3, train__max_steps=6))
    assert run(cfg, resume=True) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows}
    from ddk_fast.optim import lr_lambda

    # steps 1-2 with the old lr (5e-3 over 4 steps); from step 3 on, the new lr over 6 steps
    assert lr[2] == pytest.approx(5e-3 * lr_lambda(2, 1, 4, 0.1))
    for step in (3, 4, 5, 6):
        assert lr[step] == pytest.approx(1e-3 * lr_lambda(step, 1, 6, 0.1)), step
    text = (run_dir / "config.toml").read_text()
    assert text.startswith("# the resolved config of this run, in effect from step 2 (a resume")
    assert "lr = 0.001" in text and "max_steps = 6" in text
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [h["from_step"] for h in history] == [0, 2]
    assert history[0]["config"]["train"]["lr"] == 5e-3 and history[1]["config"]["train"]["lr"] == 1e-3
    changed = {k: v for k, v in history[1]["changed"].items() if k != "output.dir"}  # the copied folder
    assert changed == {"train.lr": [5e-3, 1e-3], "train.max_steps": [4, 6]}


def test_3_a_key_that_cannot_change_on_resume_exits_2_naming_it(assets, stopped_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_run, run_dir)
    before = (run_dir / "config.toml").read_text()
    r = raw(assets, run_dir, INLINE, loss__temperature=2.0)
    rc, err = cli(capsys, r, tmp_path / "run.toml", "--resume")
    assert rc == 2
    assert "[loss] temperature: expected 1.0 as in checkpoint" in err and "cannot change on --resume" in err
    assert (run_dir / "config.toml").read_text() == before  # the record was not touched


def test_3_readme_lists_the_keys_that_may_change_on_resume():
    from ddk_fast.config import RESUMABLE_KEYS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Resuming", 1)[1].split("\n#", 1)[0]
    listed = set(__import__("re").findall(r"`\[(\w+)\] (\w+)`", section))
    assert listed == {tuple(k.split(".")) for k in RESUMABLE_KEYS}


# ----------------------------------------------------------------------------------------------- 4
def test_4_final_names_its_base_by_absolute_path_and_loads_from_anywhere(assets, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    project = tmp_path / "project"
    project.mkdir()
    save_tiny_model(project / "student", llama_config(VOCAB + 16, layers=2))
    monkeypatch.chdir(project)
    teacher = {"teacher_config": llama_config(VOCAB + 16), "student": "student"}  # relative, as users write
    cfg = build_config(raw(assets, "runs/x", teacher, train__max_steps=2, checkpoint__every=5))
    assert run(cfg) == 0
    final = project / "runs" / "x" / "final"
    conf = json.loads((final / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(project / "student")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(final))  # reads the base from adapter_config.json
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 16
    info = json.loads((final / "ddk_fast_final.json").read_text())
    assert info == {"base_model": str(project / "student"), "revision": None, "student_mode": "lora",
                    "dtype": "float32"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- 7
def test_7_a_txt_file_is_one_document_by_default(assets, tmp_path):
    from transformers import AutoTokenizer

    root, _ = assets
    for v in range(3):  # three release notes, 100 lines each
        lines = [f"- v{v}: fixed bug {i} in alpha beta" for i in range(100)]
        (tmp_path / f"NOTES-{v}.txt").write_text("\n".join(lines) + "\n")
    r = raw(assets, tmp_path / "run", INLINE, data__val_sequences=1, data__test_sequences=1)
    files = [str(tmp_path / f"NOTES-{v}.txt") for v in range(3)]
    r["data"]["domains"] = [{"name": "notes", "files": files}]
    r["data"]["cache_dir"] = str(tmp_path / "cache")
    (p,) = prepare_config_domains(build_config(r).data, AutoTokenizer.from_pretrained(str(root / "tok")))
    assert p.train.num_docs + p.val.num_docs + p.test.num_docs == 3  # the files, not 300 one-line documents
    assert [f.records for f in p.faults] == [1, 1, 1]


# ----------------------------------------------------------------------------------------------- 8
def _pair(student_vocab: int, teacher_vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    def model(v, seed):
        torch.manual_seed(seed)
        d = dict(llama_config(v, layers=1, hidden=32))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))

    return model(student_vocab, 0), model(teacher_vocab, 1)


def test_8_distillation_trainer_checks_the_vocabularies_at_construction(tmp_path):
    from transformers import TrainingArguments

    from ddk_fast.integrations.transformers import DistillationTrainer

    student, teacher = _pair(VOCAB + 16, VOCAB)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(
        ValueError, match=rf"teacher vocabulary of {VOCAB} rows < the student's {VOCAB + 16} rows"
    ):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)


def test_8_distillation_trainer_logs_ce_and_kd_parts_per_domain(assets, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from ddk_fast.integrations.transformers import DistillationTrainer, KDArgs

    student, teacher = _pair(VOCAB + 16, VOCAB + 16)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(2, VOCAB, (12,), generator=g).tolist(), "domain_ids": i % 2}
        for i in range(8)
    ]
    ds = Dataset.from_list(rows)

    def collate(batch):
        ids = torch.tensor([b["input_ids"] for b in batch])
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "domain_ids": torch.tensor([b.get("domain_ids", 0) for b in batch]),  # dropped unless kept
        }

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2, max_steps=4,
        logging_steps=2, learning_rate=1e-3, save_strategy="no",
    )  # fmt: skip
    plain = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                data_collator=collate)  # fmt: skip
    plain.train()
    logs = [h for h in plain.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("ce" in h and "kd" in h for h in logs)  # the parts, not only the total
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  data_collator=collate, kd_args=KDArgs(kd_weight=0.5, ce_weight=1.0),
                                  domain_names=["code", "chat"])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("ce", "kd", "ce/code", "ce/chat", "kd/code", "kd/chat", "tokens/code", "tokens/chat"):
            assert key in h, (key, h)
        assert h["tokens/code"] + h["tokens/chat"] == 2 * 2 * 11  # 2 steps x 2 rows x 11 shifted labels
        mean = (h["ce/code"] * h["tokens/code"] + h["ce/chat"] * h["tokens/chat"]) / 44
        assert h["ce"] == pytest.approx(mean, rel=1e-6)
        assert h["ce"] > 0 and h["kd"] >= 0
