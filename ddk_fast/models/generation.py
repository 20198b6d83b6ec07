"""The student's continuations for on-policy distillation: Hugging Face ``generate`` with a counter-based
sampler.

``generate(do_sample=True)`` draws with ``torch.multinomial`` from the global RNG: a row's tokens then depend
on the rows it shares a call with, on the world size, and on everything that used the RNG before (dropout).
Here every draw is the Gumbel-max trick with noise that is a pure function of (row key, position, token id):

    token = argmax_v (s_v + G_v),   G_v = -log(-log U_v),   U_v = (hash32(k_t XOR h_v) + 1/2) / 2^32

which is a sample from ``softmax(s)`` (Gumbel, 1954; the trick behind ``torch.distributions`` Gumbel
sampling); ``s`` = logits / temperature, then top-p filtered (Hugging Face's own warpers), and ``generate``
runs greedy (``do_sample=False``) with these processors. ``k_t`` is the row's 32-bit key hashed with the
position t of the token after the prompt, ``h_v`` a hash of the token id; ``hash32`` is Wellons' lowbias32
integer hash, written with int64 tensor arithmetic that never overflows, so it gives the same bits on CPU and
GPU. A row's tokens are therefore a function of its key and prompt (and of the model, up to float rounding of
the batched forward): not of the chunking, the world size or the torch RNG state, which the sampler never
touches. The caller picks the key: (seed, step, sequence index) in training (:func:`sequence_key`), a hash of
the prompt for evaluation (:func:`content_keys`).

Generation never stops early: the tokenizer's EOS is the document separator of packed training rows, and a
row always gets ``max_new_tokens`` tokens (a fixed shape, and the same number of forward passes on every
rank, which FSDP needs). The model's own ``generation_config`` (sampling defaults, penalties, stop tokens of a
chat model) is set aside for the call: it would change the distribution that is distilled.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

_M32 = 0xFFFFFFFF
_ROW_SALT, _POS_SALT, _VOCAB_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def hash32_int(x: int) -> int:
    """Wellons' lowbias32 of a Python int (the low 32 bits of ``x``): the reference of :func:`hash32`."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 ``x`` in [0, 2^32) and a 32-bit constant, without int64 overflow: x is
    split into 16-bit halves (each product < 2^48)."""
    lo, hi = x & 0xFFFF, x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 elementwise on an int64 tensor of values in [0, 2^32); equal to :func:`hash32_int`."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sequence_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of a training row: its optimizer step and its index in the step's global batch."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def content_keys(prompts: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 ``[R]`` keys from the prompts' tokens ``[R, P]`` and a seed: the same prompt, the same key (on
    any device, in any batch)."""
    pos = hash32(torch.arange(prompts.shape[1], device=prompts.device, dtype=torch.int64) ^ _POS_SALT)
    mixed = hash32((prompts.long() & _M32) ^ pos).sum(dim=1) & _M32
    return hash32(mixed ^ hash32_int(seed ^ _ROW_SALT))


def gumbel_noise(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """float32 ``[R, vocab]`` standard Gumbel noise of the rows' ``keys`` (int64 ``[R]``) at ``position``."""
    k = hash32(keys ^ hash32_int(position ^ _POS_SALT))
    v = hash32(torch.arange(vocab, device=keys.device, dtype=torch.int64) ^ _VOCAB_SALT)
    u = (hash32(k[:, None] ^ v[None, :]).double() + 0.5) * 2.0**-32  # in (0, 1): float64 keeps 1 - 2^-33
    return (-torch.log(-torch.log(u))).float()


@dataclass(frozen=True)
class SampleSpec:
    """How the student continues its prompts: ``max_new_tokens`` tokens at ``temperature``, nucleus
    ``top_p`` (1 = off); ``pad_token_id`` only fills ``generate``'s argument (nothing is padded);
    ``use_cache = False`` recomputes the whole prefix at every token (for measuring what the KV cache
    saves: bench/bench_onpolicy.py)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    pad_token_id: int = 0
    use_cache: bool = True


class GumbelSampler:
    """A ``generate`` logits processor: adds each row's counter-based Gumbel noise to the (tempered,
    filtered) scores, so that greedy decoding samples (module doc)."""

    def __init__(self, keys: torch.Tensor, prompt_len: int):
        self.keys, self.prompt_len = keys, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = gumbel_noise(self.keys, input_ids.shape[1] - self.prompt_len, scores.shape[-1])
        return scores + noise.to(scores.dtype)


def _processors(keys: torch.Tensor, prompt_len: int, spec: SampleSpec):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = []
    if spec.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(spec.temperature))
    if spec.top_p < 1.0:
        procs.append(TopPLogitsWarper(spec.top_p))
    return LogitsProcessorList([*procs, GumbelSampler(keys, prompt_len)])


@contextlib.contextmanager
def _plain_generation_config(model: nn.Module):
    """The library's defaults instead of the model's ``generation_config`` for the duration (module doc)."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(base, "generation_config", None)
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompts: torch.Tensor, keys: torch.Tensor, spec: SampleSpec
) -> torch.Tensor:
    """``spec.max_new_tokens`` tokens after each prompt, sampled from ``model`` (module doc).

    Args:
        model: a causal LM (transformers or peft; LoRA / QLoRA adapters active); run in eval mode, with its
            KV cache, under ``no_grad``; its train / eval mode is restored.
        prompts: int64 ``[R, P]`` token ids (no padding: every prompt has P tokens).
        keys: int64 ``[R]`` row keys in [0, 2^32) (:func:`sequence_key`, :func:`content_keys`).

    Returns:
        int64 ``[R, max_new_tokens]``: the generated tokens only.
    """
    from transformers import GenerationConfig

    rows, plen = prompts.shape
    gen = GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        do_sample=False,  # the GumbelSampler processor samples
        num_beams=1,
        eos_token_id=[],  # never stop: EOS is the document separator of packed rows
        pad_token_id=spec.pad_token_id,
        use_cache=spec.use_cache,
    )
    procs = _processors(keys.to(prompts.device, torch.int64), plen, spec)
    was_training = model.training
    model.eval()
    try:
        with _plain_generation_config(model):
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                generation_config=gen,
                logits_processor=procs,
            )
    finally:
        model.train(was_training)
    if tuple(out.shape) != (rows, plen + spec.max_new_tokens):
        raise RuntimeError(
            f"generate returned {list(out.shape)} tokens, expected [{rows}, {plen + spec.max_new_tokens}] "
            "(prompt + max_new_tokens: generation must not stop early)"
        )
    return out[:, plen:]
