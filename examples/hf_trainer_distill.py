"""Distil a tiny teacher into a tiny student with Hugging Face Trainer and ddk_fast's fused KD loss.

Offline (models built from configs, synthetic token data); a few seconds on a CPU:

    python examples/hf_trainer_distill.py --steps 30 --grad-accum 2
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from ddk_fast.integrations.transformers import DistillationTrainer, KDArgs

VOCAB, PAD = 128, 0


class Sequences(torch.utils.data.Dataset):
    """Variable-length token sequences: a repeated motif per sequence, so there is something to learn."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            motif = torch.randint(1, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
            length = int(torch.randint(8, 33, (1,), generator=g))
            self.rows.append(motif.repeat(length // len(motif) + 1)[:length])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(rows):
    """Right padding; labels = input_ids with padding set to -100 (the trainer shifts them)."""
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), t), PAD)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_llama(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      pad_token_id=PAD, initializer_range=0.2 if seed else 0.02)  # fmt: skip
    return LlamaForCausalLM(cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    a = ap.parse_args(argv)
    teacher = tiny_llama(64, 4, seed=1)  # larger init: a peaked teacher. A real run uses from_pretrained
    student = tiny_llama(32, 2, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=a.out or tmp, max_steps=a.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=a.grad_accum, learning_rate=3e-3, lr_scheduler_type="constant",
            logging_steps=max(1, a.steps // 5), save_strategy="no", report_to="none", use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=Sequences(256),
            data_collator=collate,
            kd_args=KDArgs(divergence="jsd", beta=0.5, temperature=2.0, kd_weight=1.0, ce_weight=0.5),
        )  # fmt: skip
        first = trainer.compute_loss(student, collate([Sequences(8, seed=9)[i] for i in range(8)])).item()
        trainer.train()
        last = trainer.compute_loss(student, collate([Sequences(8, seed=9)[i] for i in range(8)])).item()
    print(f"held-out distillation loss: start {first:.4f} end {last:.4f}")


if __name__ == "__main__":
    main()
