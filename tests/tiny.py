"""Tiny offline fixtures: a byte-level BPE tokenizer, Llama configs and multi-domain jsonl files."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 320


def make_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def llama_config(vocab_size: int = VOCAB, layers: int = 4, hidden: int = 64) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def domain_texts(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    return {
        "arith": [
            " ".join(
                f"{a}+{b}={a + b};"
                for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(rng.randrange(3, 12)))
            )
            for _ in range(60)
        ],
        "words": [" ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))) for _ in range(60)],
        "code": [
            f"def f{i}(x):\n    return x * {i} + {rng.randrange(9)}\n" * rng.randrange(1, 4)
            for i in range(60)
        ],
    }


def write_domains(root: Path, seed: int = 0) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in domain_texts(seed).items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        paths[name] = p
    return paths


def make_cfg(assets, run_dir, **over):
    """The tiny end-to-end run (QLoRA student cut from an inline Llama teacher with a padded vocab) on
    ``assets`` (the ``assets`` fixture of conftest.py), with ``section__key=value`` overrides."""
    from ddk_fast.config import build_config

    root, files = assets
    raw = {
        "model": {
            "teacher_config": llama_config(VOCAB + 16),
            "student_from_teacher_layers": [0, 3],
            "tokenizer": str(root / "tok"),
            "student_mode": "qlora",
            "lora_r": 4,
            "lora_dropout": 0.1,
        },
        "data": {
            "domains": [{"name": n, "files": [str(p)]} for n, p in files.items()],
            "seq_len": 32,
            "batch_size": 4,
            "val_sequences": 4,
            "cache_dir": str(root / "cache"),
            "prefetch": 2,
        },
        "ddk": {"interval": 3, "eval_batch_size": 4},
        "train": {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "log_every": 1},
        "checkpoint": {"every": 3, "keep_last": 2},
        "output": {"dir": str(run_dir), "progress": False, "tensorboard": False},
        "loss": {},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return build_config(raw)
