"""The offline demo's assets: corpus, tokenizer, teacher, and the cached prepare_demo pipeline (tiny mode)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ddk_fast.demo.__main__ import STAMP_NAME, main, prepare_demo, read_stamp
from ddk_fast.demo.corpus import DOMAINS, CorpusSettings, build_corpus, generate_domain, read_jsonl
from ddk_fast.demo.teacher import REPORT_NAME, TeacherSettings, build_teacher
from ddk_fast.demo.tokenizer import TokenizerSettings, train_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo build shared by the tests below (a few seconds)."""
    out = tmp_path_factory.mktemp("demo")
    paths = prepare_demo(out, tiny=True, progress=False)
    return paths


def _file_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def test_corpus_is_deterministic_with_four_nonempty_domains(tmp_path):
    s = CorpusSettings.tiny()
    build_corpus(tmp_path / "a", s)
    build_corpus(tmp_path / "b", s)
    a, b = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert a == b
    assert len(DOMAINS) >= 4
    assert set(a) == {f"{sub}{d}.jsonl" for d in DOMAINS for sub in ("", "val/", "test/", "small/")}
    for d in DOMAINS:
        train = read_jsonl(tmp_path / "a" / f"{d}.jsonl")
        val = read_jsonl(tmp_path / "a" / "val" / f"{d}.jsonl")
        test = read_jsonl(tmp_path / "a" / "test" / f"{d}.jsonl")
        small = read_jsonl(tmp_path / "a" / "small" / f"{d}.jsonl")
        assert train and val and test and small
        assert all(isinstance(t, str) and t.strip() for t in train + val + test)
        assert sum(map(len, train)) >= 0.8 * s.chars(d)
        assert sum(map(len, test)) >= s.test_chars and sum(map(len, val)) >= s.val_chars
        assert len({len(t) for t in train}) > 1, f"{d}: documents should vary in length"
        assert not set(train) & set(val), f"{d}: validation documents leak into training"
        assert not set(train) & set(test) and not set(val) & set(test), f"{d}: test documents leak"
        assert small == train[: len(small)] and sum(map(len, small)) >= s.small_chars


def test_tokenizer_and_teacher_never_read_held_out_documents(tmp_path, monkeypatch):
    """Clean splits: no val or test document is in the text the tokenizer or the teacher trains on, and the
    teacher reads no test file at all (val only for its own report)."""
    import ddk_fast.demo.teacher as teacher_mod
    import ddk_fast.demo.tokenizer as tokenizer_mod

    seen_tok: list[str] = []
    real_train_tokenizer = tokenizer_mod.train_tokenizer

    def spy_tokenizer(texts, settings):
        seen_tok.extend(texts)
        return real_train_tokenizer(texts, settings)

    read_by_teacher: list[str] = []
    real_read = teacher_mod.read_jsonl

    def spy_read(path):
        read_by_teacher.append(str(path))
        return real_read(path)

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", spy_tokenizer)
    monkeypatch.setattr(teacher_mod, "read_jsonl", spy_read)
    paths = prepare_demo(tmp_path, tiny=True, progress=False)
    held = set()
    for d in DOMAINS:
        held |= set(read_jsonl(paths["val"] / f"{d}.jsonl")) | set(read_jsonl(paths["test"] / f"{d}.jsonl"))
    assert seen_tok and not held & set(seen_tok)
    corpus = paths["corpus"]
    assert sorted(read_by_teacher) == sorted(
        [str(corpus / f"{d}.jsonl") for d in DOMAINS] + [str(corpus / "val" / f"{d}.jsonl") for d in DOMAINS]
    )
    train_text = set()
    for d in DOMAINS:
        train_text |= set(read_jsonl(corpus / f"{d}.jsonl"))
    assert not held & train_text


def test_domains_have_their_own_content():
    s = CorpusSettings.tiny()
    code, _, _ = generate_domain("code", s)
    docs, _, _ = generate_domain("docs", s)
    arith, _, _ = generate_domain("arithmetic", s)
    struct, _, _ = generate_domain("structured", s)
    assert any("def " in t or "import " in t for t in code)
    assert not set(code) & set(docs)
    line = arith[0].splitlines()[0]
    lhs, rhs = line.split(" = ")
    assert eval(lhs) == int(rhs)  # the generated answers are correct
    assert all("->" in ln for t in struct for ln in t.splitlines())
    with pytest.raises(ValueError, match="domain: expected one of"):
        generate_domain("poetry", s)


def test_tokenizer_round_trips_and_reloads(demo):
    tok = AutoTokenizer.from_pretrained(str(demo["tokenizer"]))
    assert len(tok) <= TokenizerSettings.tiny().vocab_size
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id} == {0, 1, 2, 3}
    for text in [
        "37 + 48 = 85\n",
        "    def f(x):\n\treturn x  # ünïcödé 日本 🙂\r\n",
        "sort: 9 2 7 -> 2 7 9",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # digits are one token each
    assert tok.convert_ids_to_tokens(tok("1207", add_special_tokens=False)["input_ids"]) == [
        "1",
        "2",
        "0",
        "7",
    ]


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size: expected >= 260"):
        train_tokenizer(["abc"], TokenizerSettings(vocab_size=100))


def test_teacher_trained_saved_and_reloads(demo):
    report = json.loads(demo["teacher_report"].read_text())
    assert set(report["valid_loss"]) == set(DOMAINS)
    for d in DOMAINS:
        assert report["valid_loss"][d] < report["initial_valid_loss"][d] - 0.5, d
    curve = report["train_loss_curve"]
    assert curve[-1][1] < curve[0][1]

    model = AutoModelForCausalLM.from_pretrained(str(demo["teacher"]))
    tok = AutoTokenizer.from_pretrained(str(demo["teacher"]))
    assert (demo["teacher"] / "model.safetensors").is_file()
    s = TeacherSettings.tiny()
    cfg = model.config
    assert cfg.num_hidden_layers == s.num_layers and cfg.num_hidden_layers % 2 == 0
    assert cfg.vocab_size >= len(tok) and not cfg.tie_word_embeddings
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0, name
    # the reloaded model reproduces the reported validation loss on a batch of its own data
    ids = tok(read_jsonl(demo["val"] / "arithmetic.jsonl")[0], return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < report["initial_valid_loss"]["arithmetic"] - 0.5


def test_teacher_settings_are_validated():
    with pytest.raises(ValueError, match="hidden_size: expected a positive multiple of 64"):
        TeacherSettings(hidden_size=100).validate()
    with pytest.raises(ValueError, match="num_layers: expected an even number >= 4"):
        TeacherSettings(num_layers=3).validate()
    tok = train_tokenizer(["hello world " * 10], TokenizerSettings(vocab_size=300))
    model = build_teacher(tok, TeacherSettings.tiny())
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)


def test_second_call_is_a_cache_hit(demo):
    stamps = {step: read_stamp(demo[step]) for step in ("corpus", "tokenizer", "teacher")}
    assert all(stamps.values())
    again = prepare_demo(demo["out"], tiny=True, progress=False)
    assert again["built"] == []
    assert {step: read_stamp(demo[step]) for step in stamps} == stamps


def test_partial_step_is_rebuilt_and_cli_runs(tmp_path, capsys):
    paths = prepare_demo(tmp_path, tiny=True, progress=False)
    assert paths["built"] == ["corpus", "tokenizer", "teacher"]
    # a folder without its stamp (an interrupted or foreign write) is not treated as done
    (paths["teacher"] / STAMP_NAME).unlink()
    assert main(["--out", str(tmp_path), "--tiny", "--no-progress"]) == 0
    assert read_stamp(paths["teacher"]) is not None
    assert json.loads(capsys.readouterr().out)["teacher"] == str(paths["teacher"])
    assert not list(tmp_path.glob(".*.tmp-*"))
    assert (paths["teacher"] / REPORT_NAME).is_file()
