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


# ------------------------------------------------------------------------------------ Hub cache, chat models
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)  # the ChatML layout of Qwen2.5-Instruct's template (default system prompt when none is given)


def make_chat_tokenizer(
    out_dir: Path, texts: list[str], vocab_size: int = VOCAB, template: str | None = CHATML
):
    """A byte-level BPE tokenizer with Qwen's special tokens (<|endoftext|> pad, <|im_start|>, <|im_end|>
    = eos) and, unless ``template`` is None, a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    return fast


def save_tiny_model(out_dir: Path, config: dict, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A randomly initialised causal LM from an inline config, saved as a Hugging Face folder (+ the
    tokenizer files of ``tokenizer_dir``)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config)
    conf = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(conf).save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(out_dir) / f.name)
    return Path(out_dir)


def qwen2_config(vocab_size: int, layers: int = 2, hidden: int = 64, tie: bool = False, positions: int = 512):
    return dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=positions, tie_word_embeddings=tie,
    )  # fmt: skip


def hub_cache(
    home: Path, repo_id: str, folder: Path, commit: str = "0" * 39 + "1", ref: str = "main"
) -> Path:
    """Put ``folder``'s files into a Hugging Face cache under ``home`` as the Hub client lays them out:
    ``hub/models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (links to the blobs) and
    ``refs/<ref>`` naming the commit. Returns the snapshot folder."""
    import hashlib
    import os

    repo = Path(home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snap / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(f"../../blobs/{blob}", link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap
