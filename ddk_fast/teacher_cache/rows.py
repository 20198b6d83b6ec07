"""Training from a cache: open it for a run (checked against the run's data, tokenizer, seq_len and seed) and
the sampler hook that attaches the cached rows of the sequences a batch holds.

The rows are looked up by (domain, sequence index): :func:`.addressing.batch_sequence_indices` replays the
sampler's largest-deficit walk from its state before the batch (and checks the domains it gets against the
batch), so the lookup follows DDK's mixture, resume and ranks exactly. The hook runs inside
``DomainSampler._produce``, i.e. in the prefetch thread when prefetching is on: the cache reads overlap the
training step like the token reads do.
"""

from __future__ import annotations

import logging

import numpy as np

from .addressing import batch_sequence_indices
from .store import CacheStore, TeacherCacheError, open_cache

log = logging.getLogger("ddk_fast")


def open_for_run(path: str, *, tokenizer_sha256: str, seq_len: int, seed: int, sep_token_id: int,
                 domains: dict[str, str]) -> CacheStore:  # fmt: skip
    """Open ``path`` (checksums verified) and refuse it unless it was written for this run's tokenizer,
    seq_len, seed, separator and domains (``{name: data key}``); TeacherCacheError names what differs."""
    cache = open_cache(path, verify=True)
    cache.check_run(
        {"tokenizer_sha256": tokenizer_sha256, "seq_len": seq_len, "seed": seed, "sep_token_id": sep_token_id,
         "domains": domains}
    )  # fmt: skip
    t = cache.manifest["teacher"]
    log.info(
        "teacher cache %s: kind %s, teacher %s (weights sha256 %s...); the teacher is not run",
        path, cache.kind, t["source"], t["weights_sha256"][:12],
    )  # fmt: skip
    return cache


class CacheRows:
    """``DomainSampler.batch_hook``: adds the cached rows of the batch's sequences (one ``[B, L, ...]`` array
    per shard file, keyed ``cache_<file>``) and ``sequence_index`` int64 ``[B]`` to a batch."""

    def __init__(self, cache: CacheStore, names: list[str], world_size: int, rank: int):
        self.cache, self.names, self.world_size, self.rank = cache, names, world_size, rank

    def __call__(self, batch: dict, state_before: tuple, weights: np.ndarray) -> dict:
        seq_index, window, _ = state_before
        b = batch["input_ids"].shape[0]
        doms, idx = batch_sequence_indices(weights, window, seq_index, self.world_size, b, self.rank)
        if not np.array_equal(doms, batch["domain_ids"][:, 0]):
            raise TeacherCacheError(
                "the sampler's domain choices differ from the replayed walk "
                f"({batch['domain_ids'][:, 0].tolist()} vs {doms.tolist()}): cache rows cannot be matched"
            )
        rows = self.cache.rows(self.names, doms, idx)
        return {**{f"cache_{f}": a for f, a in rows.items()}, "sequence_index": idx}
