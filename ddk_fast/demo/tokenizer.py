"""A small byte-level BPE tokenizer for the demo, trained offline on the demo corpus in about a second.

Byte-level: the 256 byte symbols are in the initial alphabet, so any text encodes (``<unk>`` is never
produced) and decoding gives the text back exactly. Digits are split one per token before BPE, so numbers
are spelled digit by digit (`` 1207`` -> `` 1``, ``2``, ``0``, ``7``): the arithmetic and structured domains
stay learnable for a tiny model instead of memorising a token per number.

Special tokens, with fixed ids: ``<pad>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos, the document separator when
documents are packed), ``<unk>`` 3. Encoding adds no special token by itself: whoever packs documents appends
eos after each one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


@dataclass(frozen=True)
class TokenizerSettings:
    """Target vocabulary size (special tokens included) and the BPE merge threshold."""

    vocab_size: int = 2048
    min_frequency: int = 2

    @classmethod
    def tiny(cls) -> TokenizerSettings:
        return cls(vocab_size=512)


def train_tokenizer(
    texts: Iterable[str], settings: TokenizerSettings | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The vocabulary has at most ``settings.vocab_size`` entries (fewer when the text has too few distinct
    pairs to merge); ``len(tokenizer)`` is the exact size.
    """
    settings = settings or TokenizerSettings()
    if settings.vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size: expected >= {len(SPECIAL_TOKENS) + 256}, got {settings.vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # one digit per piece, the space before a number kept with its first digit (" 48" -> " 4", "8")
            pre_tokenizers.Split(Regex(" ?[0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> None:
    """``save_pretrained``; reload with ``transformers.AutoTokenizer.from_pretrained(out_dir)``."""
    tokenizer.save_pretrained(str(out_dir))
