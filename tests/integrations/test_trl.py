"""FusedGKDTrainer (ddk_fast.integrations.trl) against TRL's own GKDTrainer loss on a tiny model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed: pip install 'ddk_fast[trl]'")

from ddk_fast.integrations.trl import FusedGKDTrainer, GKDTrainer  # noqa: E402

from ..tiny import make_tokenizer  # noqa: E402
from .test_hf import _collate, batch, tiny  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), ["alpha beta gamma delta"] * 20, vocab_size=300)


def _trainer(tmp_path, tokenizer, beta):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 96, (n,), generator=g).tolist()} for n in (12, 5, 9, 3)]
    args = GKDConfig(
        output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        lmbda=0.0, beta=beta, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, bf16=False,
    )  # fmt: skip
    return FusedGKDTrainer(
        model=tiny("llama", 32, seed=0), teacher_model=tiny("llama", 48, seed=1), args=args,
        train_dataset=Dataset.from_list(rows), data_collator=_collate, processing_class=tokenizer,
    )  # fmt: skip


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_gkd_loss_equals_trl_loss(tmp_path, tokenizer, beta):
    tr = _trainer(tmp_path, tokenizer, beta)
    model = tr.model
    params = [p for p in model.parameters() if p.requires_grad]
    b = batch(seed=4)
    for items in (None, torch.tensor(11)):
        ours = tr.compute_loss(model, b, num_items_in_batch=items)
        g_ours = torch.autograd.grad(ours, params)
        theirs = GKDTrainer.compute_loss(tr, model, b, num_items_in_batch=items)
        g_theirs = torch.autograd.grad(theirs, params)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
        for a, r in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_fused_gkd_trains(tmp_path, tokenizer):
    tr = _trainer(tmp_path, tokenizer, 0.5)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
