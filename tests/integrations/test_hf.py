"""ddk_fast.integrations.transformers: distill_loss against a reference from the models' full logits (per
architecture: logit soft-cap, logit scale, tied embeddings), PEFT students, unsupported models, and
DistillationTrainer (gradient accumulation, teacher frozen and excluded from optimizer and checkpoints)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddk_fast.integrations.transformers import DistillationTrainer, KDArgs, distill_loss, head_spec
from ddk_fast.ops.naive import kd_loss_naive

V = 96


def tiny(model_type: str, hidden: int, seed: int, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gemma2":
        extra.setdefault("head_dim", hidden // 2)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def batch(b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    lengths = torch.tensor([t, t - 4, 3])[:b]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not scored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_from_logits(student, teacher, b, **kw):
    """The plain way: both models' full [B, T, V] logits (soft-cap / scale applied by the model), shift,
    mask, float64 formula."""
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels = b["labels"].masked_fill(b["attention_mask"] == 0, -100)[:, 1:].reshape(-1)
    vs = s.shape[-1]
    return kd_loss_naive(s[:, :-1].reshape(-1, vs).double(), t[:, :-1].reshape(-1, t.shape[-1]).double(),
                         labels, **kw)  # fmt: skip


ARCHS = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gemma2": {"final_logit_softcapping": 1.5, "tie_word_embeddings": True},
    "cohere": {"logit_scale": 0.25, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_distill_loss_equals_the_full_logits_reference(arch):
    student = tiny(arch, 32, seed=0, **ARCHS[arch])
    teacher = tiny(arch, 48, seed=1, **ARCHS[arch])
    spec = head_spec(student)
    if arch == "gemma2":
        assert spec["softcap"] == 1.5
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # tied
    if arch == "cohere":
        assert spec["logit_scale"] == 0.25
    b = batch()
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, kd_weight=0.6, ce_weight=0.8)
    params = [p for p in student.parameters() if p.requires_grad]
    ref = reference_from_logits(student, teacher, b, **kw)
    ref_grads = torch.autograd.grad(ref.loss, params)
    out = distill_loss(student, teacher, b, **kw)
    got = torch.autograd.grad(out.loss, params)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), ref.ce, rtol=1e-5, atol=1e-6)
    for a, r in zip(got, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_peft_student_gets_gradients_only_in_adapters():
    from peft import LoraConfig, get_peft_model

    base = tiny("llama", 32, seed=0)
    teacher = tiny("llama", 48, seed=1)
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in student.named_parameters():  # non-zero B so the adapters change the output
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    b = batch(seed=2)
    ref = reference_from_logits(student, teacher, b)
    out = distill_loss(student, teacher, b)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_unsupported_model_names_the_missing_attribute():
    class NotALM(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(
        ValueError, match=r"NotALM: could not find the output head: `get_output_embeddings\(\)`"
    ):
        distill_loss(NotALM(), tiny("llama", 32, 0), batch())
    with pytest.raises(ValueError, match="teacher_model: expected a torch.nn.Module"):
        DistillationTrainer(model=tiny("llama", 32, 0), teacher_model="gpt2")
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        KDArgs(temperature=0.0)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _grads_after_one_step(tmp_path, batch_size, accum, student, teacher):
    from transformers import TrainerCallback, TrainingArguments

    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.update({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, V, (n,), generator=g).tolist()} for n in (12, 5, 9, 3)]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run{accum}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    tr = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_Rows(rows), data_collator=_collate,
        kd_args=KDArgs(divergence="reverse_kl", temperature=2.0, kd_weight=0.5), callbacks=[Grab()],
    )  # fmt: skip
    tr.train()
    return grads, tr


def test_trainer_gradient_accumulation_4_equals_accumulation_1(tmp_path):
    """Four micro-batches of 1 (different lengths) accumulate to the gradient of the batch of 4: the loss
    is divided by num_items_in_batch, not averaged per micro-batch."""
    teacher = tiny("llama", 48, seed=1)
    g1, _ = _grads_after_one_step(tmp_path, 4, 1, tiny("llama", 32, seed=0), teacher)
    g4, tr = _grads_after_one_step(tmp_path, 1, 4, tiny("llama", 32, seed=0), teacher)
    assert g1.keys() == g4.keys() and len(g1) > 5
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-5, msg=name)
    # the teacher: frozen, eval, on the student's device/dtype, in no optimizer group, not in the checkpoint
    assert not tr.teacher_model.training
    assert not any(p.requires_grad for p in tr.teacher_model.parameters())
    teacher_ids = {id(p) for p in tr.teacher_model.parameters()}
    assert not any(id(p) in teacher_ids for group in tr.optimizer.param_groups for p in group["params"])
    tr.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in tr.model.state_dict().values())
    assert tr.last_kd_output is not None and torch.isfinite(tr.last_kd_output.kd)


def test_4bit_qlora_student(tmp_path):
    """An NF4 4-bit base with LoRA adapters (the head stays full precision): same loss as the full-logits
    reference of the same quantised model, gradients only in the adapters."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ddk_fast.models.loading import disable_bnb_cpu_repack

    tiny("llama", 64, seed=0).save_pretrained(tmp_path / "s")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "s", quantization_config=q, dtype=torch.float32, device_map={"": "cpu"}
    )
    assert disable_bnb_cpu_repack(base) > 0
    student = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    teacher = tiny("llama", 48, seed=1)
    b = batch(seed=3)
    ref = reference_from_logits(student, teacher, b, divergence="forward_kl", temperature=2.0)
    out = distill_loss(student, teacher, b, divergence="forward_kl", temperature=2.0)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_ddp_wrapped_student_runs_through_the_wrapper(tmp_path):
    """A DDP-wrapped student (one-process gloo group) is called through the wrapper, so its gradient hooks
    run; loss and gradients equal the unwrapped model's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        student, teacher = tiny("llama", 32, seed=0), tiny("llama", 48, seed=1)
        b = batch(seed=6)
        plain = distill_loss(student, teacher, b, divergence="reverse_kl")
        want = torch.autograd.grad(plain.loss, list(student.parameters()))
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        out = distill_loss(ddp, teacher, b, divergence="reverse_kl")
        out.loss.backward()
        torch.testing.assert_close(out.loss, plain.loss)
        for p, w in zip(student.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()
