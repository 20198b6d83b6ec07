"""Offline teacher: run the teacher once over every training sequence, cache its signal, train without it.

``python -m ddk_fast.teacher_cache --config run.toml [--kind topk|hidden] [--dtype bfloat16|float32]
[--epochs auto|E] [--out DIR]`` writes a cache (``writer.py``); ``[model] teacher_cache = "DIR"`` trains from
it, the kind read from its manifest, and never runs the teacher:

* ``topk`` (the default): the teacher's top-k token ids, their log-probabilities at T = 1 and the log of the
  remaining mass per token; training uses the sparse-teacher loss
  (:func:`ddk_fast.fused_linear_kd_loss_topk`), an approximation of the dense one (exact at k = V).
* ``hidden``: the teacher's final normalised hidden state per token (the input of its ``lm_head``), plus its
  ``lm_head`` once; training runs the dense fused loss exactly as with the online teacher (float32 rows: the
  same losses to float rounding; bfloat16 rows: half the bytes, rounded targets).

**Addressing** (``addressing.py``): a training sequence is named by (domain, sequence index k) in that
domain's packed stream, which does not depend on the mixing weights, the step or the rank, so any DDK mixture,
resume or world size reads the matching rows. The cache holds sequences ``[0, n_d)`` of domain d; ``--epochs
auto`` (the default) chooses n_d so that the run in the config cannot draw past it whatever its mixing does
(``coverage.py``), and training checks coverage before the first step.

**Layout** of ``DIR``: ``manifest.json`` (identity: teacher config and weights sha256, tokenizer sha256,
seq_len, seed, kind and its settings; per domain its data key, the teacher's val and test CE and the shard
list with a sha256 per file), ``<domain>/<start>.<file>`` shards (files per kind: ``store.py``), each with a
``<start>.json`` record written last (a shard without it is incomplete and recomputed on the next run), and
for the hidden kind ``head.safetensors``. Opening a cache verifies every checksum and names a corrupt file;
a cache written for other data, tokenizer, seq_len or seed is refused naming the difference (exit 2).
"""

from __future__ import annotations

from .addressing import batch_sequence_indices, domain_sequences, sequence_tokens
from .store import FORMAT, KINDS, MANIFEST, VERSION, CacheStore, TeacherCacheError, open_cache

TeacherCache = CacheStore  # the name of the reader before the hidden kind

__all__ = [
    "FORMAT", "KINDS", "MANIFEST", "VERSION", "CacheStore", "TeacherCache", "TeacherCacheError",
    "batch_sequence_indices", "domain_sequences", "open_cache", "sequence_tokens",
]  # fmt: skip
