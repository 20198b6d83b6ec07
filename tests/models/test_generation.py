"""The student's continuations for on-policy distillation (ddk_fast/models/generation.py): the
counter-based sampler samples softmax(logits / T) (top-p filtered), a row's tokens depend on its key and
prompt only, EOS does not stop generation, the model's own generation defaults and train/eval mode are
restored, and a QLoRA student's gradients are the same after a generate as before it (the bitsandbytes CPU
repack bug)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ddk_fast.models.generation import (
    SampleSpec,
    content_keys,
    gumbel_noise,
    hash32,
    hash32_int,
    sample_continuations,
    sequence_key,
)
from ddk_fast.models.loading import model_from_config

from ..tiny import llama_config


def _model(vocab=40, seed=0):
    return model_from_config(
        llama_config(vocab, layers=2, hidden=32), "model.student_config", torch.float32, seed
    )


def test_hash32_tensor_equals_the_integer_reference_at_the_edges_and_at_random():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x80000000] + [rng.getrandbits(32) for _ in range(2000)]
    assert hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [hash32_int(x) for x in xs]
    assert sequence_key(0, 5, 3) != sequence_key(0, 5, 4) != sequence_key(1, 5, 4)
    assert 0 <= sequence_key(7, 10**9, 10**6) < 2**32


def test_gumbel_max_samples_the_softmax_with_temperature_and_top_p():
    """The sampler's draw for 20,000 rows (distinct keys) of one logit vector: frequencies within 4 binomial
    standard deviations of softmax(logits / T), and exactly zero outside the top-p nucleus."""
    from ddk_fast.models.generation import _processors

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20_000
    keys = torch.arange(n, dtype=torch.int64) * 7919 + 11
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.5, 0.8)):
        spec = SampleSpec(4, temperature, top_p)
        scores = _processors(keys, 5, spec)(torch.zeros(n, 5, dtype=torch.long), logits.expand(n, -1).clone())
        counts = np.bincount(scores.argmax(-1).numpy(), minlength=6) / n
        p = torch.softmax(logits[0] / temperature, -1).double()
        if top_p < 1:  # the nucleus: the smallest set of the most likely tokens with mass >= top_p
            order = torch.argsort(p, descending=True)
            keep = order[: int((torch.cumsum(p[order], 0) < top_p).sum()) + 1]
            mask = torch.zeros_like(p, dtype=torch.bool)
            mask[keep] = True
            assert counts[(~mask).numpy()].sum() == 0
            p = torch.where(mask, p, 0.0) / p[mask].sum()
        sd = np.sqrt(p.numpy() * (1 - p.numpy()) / n)
        np.testing.assert_array_less(np.abs(counts - p.numpy()), 4 * sd + 1e-12)
    g = gumbel_noise(keys[:2000], 3, 50)
    assert torch.isfinite(g).all() and abs(float(g.mean()) - 0.5772) < 0.02  # Euler-Mascheroni


def test_a_rows_tokens_depend_on_its_key_and_prompt_not_on_its_batch():
    model = _model()
    model.generation_config.do_sample = True  # a model's own sampling defaults are set aside
    model.generation_config.temperature = 0.1
    torch.manual_seed(0)
    prompts = torch.randint(3, 40, (4, 6))
    keys = torch.tensor([5, 6, 7, 8])
    spec = SampleSpec(7, temperature=1.3, top_p=0.95)
    rng = torch.get_rng_state()
    together = sample_continuations(model, prompts, keys, spec)
    assert torch.equal(torch.get_rng_state(), rng)  # the torch RNG (dropout's) is never touched
    alone = torch.cat(
        [sample_continuations(model, prompts[i : i + 1], keys[i : i + 1], spec) for i in range(4)]
    )
    assert together.shape == (4, 7) and torch.equal(together, alone)
    again = sample_continuations(model, prompts, keys, spec)
    assert torch.equal(together, again)
    other = sample_continuations(model, prompts, keys + 1, spec)
    assert not torch.equal(together, other)
    assert model.training and model.generation_config.do_sample  # mode and defaults restored
    ck = content_keys(prompts, 0)
    assert torch.equal(ck[1:], content_keys(prompts[1:], 0)) and not torch.equal(ck, content_keys(prompts, 1))


def test_generation_does_not_stop_at_eos():
    model = _model()
    eos = int(model.generation_config.eos_token_id)
    head = torch.nn.Linear(32, 40, bias=True)  # EOS the most likely token everywhere
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos] = 100.0
    model.lm_head = head
    out = sample_continuations(model, torch.randint(3, 40, (2, 4)), torch.tensor([1, 2]), SampleSpec(6))
    assert out.shape == (2, 6) and (out == eos).all()


@pytest.mark.slow
def test_qlora_gradients_after_a_generate_equal_those_before(tmp_path):
    """QLoRA on CPU: the student loader turns off the bitsandbytes repack an eval forward would do, so a
    generate between training steps leaves the gradients exact."""
    pytest.importorskip("bitsandbytes")
    from ddk_fast.config import ModelConfig
    from ddk_fast.models.loading import load_student

    cfg = ModelConfig(
        student_config=llama_config(40, layers=2, hidden=64), student_mode="qlora", lora_r=4, lora_dropout=0.0
    )
    student = load_student(cfg, None, torch.device("cpu"), torch.float32, tmp_path, seed=0)
    for p in student.parameters():  # LoRA B starts at zero: give the adapters a gradient path
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 40, (2, 12))

    def grads():
        student.zero_grad(set_to_none=True)
        student(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    before = grads()  # with the repack left on (support_avx512bf16_for_cpu = True) these differ by ~0.1 here
    sample_continuations(student, ids[:, :4], torch.tensor([1, 2]), SampleSpec(5))
    after = grads()
    assert before.keys() == after.keys() and len(before) > 0
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-6, atol=1e-8, msg=n)
