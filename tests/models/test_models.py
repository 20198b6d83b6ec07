"""Model loading: student built from teacher layers, QLoRA (only adapters train), vocab checks, and the
bitsandbytes CPU regression (gradients after an eval pass must equal gradients before it)."""

from __future__ import annotations

import pytest
import torch

from ddk_fast.config import ModelConfig
from ddk_fast.errors import ConfigError
from ddk_fast.models.loading import (
    check_vocab,
    final_hidden,
    head_weight,
    load_student,
    load_teacher,
    student_from_teacher,
)

from ..tiny import VOCAB, domain_texts, llama_config, make_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for docs in domain_texts().values() for t in docs]
    return make_tokenizer(tmp_path_factory.mktemp("tok"), texts)


def _student(tmp_path, mode="qlora", checkpointing=False, **kw):
    cfg = ModelConfig(
        gradient_checkpointing=checkpointing,
        teacher_config=llama_config(**kw),
        student_from_teacher_layers=[0, 3],
        student_mode=mode,
        lora_r=4,
        lora_dropout=0.0,
        tokenizer="x",
    )
    teacher = load_teacher(cfg, CPU, torch.float32, seed=0)
    return teacher, load_student(cfg, lambda: teacher, CPU, torch.float32, tmp_path, seed=0)


def _grads(student, ids):
    student.zero_grad(set_to_none=True)
    h = final_hidden(student, ids)
    (h @ head_weight(student).T).logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


def test_student_from_teacher_keeps_chosen_layers():
    teacher = load_teacher(ModelConfig(teacher_config=llama_config()), CPU, torch.float32, seed=0)
    student = student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t_layers, s_layers = teacher.get_decoder().layers, student.get_decoder().layers
    assert torch.equal(s_layers[1].mlp.up_proj.weight, t_layers[3].mlp.up_proj.weight)
    assert torch.equal(head_weight(student), head_weight(teacher))
    with pytest.raises(ConfigError, match=r"layer indices < 4"):
        student_from_teacher(teacher, [0, 4])


def test_qlora_student_trains_only_adapters(tmp_path):
    import bitsandbytes as bnb

    teacher, student = _student(tmp_path)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in student.modules())
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (tmp_path / "student_init" / "config.json").exists()  # the init is a normal HF folder


def test_4bit_gradients_survive_an_eval_pass(tmp_path):
    """Regression for the bitsandbytes CPU repack bug (shared/ENV.md): without the fix the relative error of
    the adapter gradients after an eval/no-grad forward is ~1."""
    _, student = _student(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _grads(student, ids)
    student.eval()
    with torch.no_grad():
        final_hidden(student, ids)
    student.train()
    after = _grads(student, ids)
    for name, g in before.items():
        assert torch.allclose(after[name], g, rtol=1e-5, atol=1e-7), name


def test_lora_and_full_modes(tmp_path):
    _, lora = _student(tmp_path / "lora", mode="lora")
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    _, full = _student(tmp_path / "full", mode="full")
    assert all(p.requires_grad for p in full.parameters())


def test_padded_teacher_vocab_is_accepted_real_mismatch_is_not(tokenizer):
    teacher = load_teacher(ModelConfig(teacher_config=llama_config(VOCAB + 16)), CPU, torch.float32, 0)
    student = load_teacher(ModelConfig(teacher_config=llama_config(VOCAB)), CPU, torch.float32, 0)
    rows = lambda m: m.get_output_embeddings().weight.shape[0]  # noqa: E731
    assert check_vocab(rows(teacher), student, tokenizer) == VOCAB
    with pytest.raises(ConfigError, match=r"\[model\] teacher: expected a teacher vocabulary of at least"):
        check_vocab(rows(student), teacher, tokenizer)
    small = load_teacher(ModelConfig(teacher_config=llama_config(VOCAB - 32)), CPU, torch.float32, 0)
    with pytest.raises(ConfigError, match=r"\[model\] student: expected a student vocabulary of at least"):
        check_vocab(rows(teacher), small, tokenizer)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    _, plain = _student(tmp_path / "plain")
    _, ckpt = _student(tmp_path / "ckpt", checkpointing=True)
    assert ckpt.is_gradient_checkpointing
    adapters = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert not ckpt.load_state_dict(adapters, strict=False).unexpected_keys  # same LoRA init
    g_plain, g_ckpt = _grads(plain, ids), _grads(ckpt, ids)
    assert g_plain.keys() == g_ckpt.keys()
    for name, g in g_plain.items():
        assert torch.allclose(g_ckpt[name], g, rtol=1e-5, atol=1e-7), name
