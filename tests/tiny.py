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
