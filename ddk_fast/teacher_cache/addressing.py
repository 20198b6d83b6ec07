"""How a cached sequence is named: (domain, sequence index k) in the domain's packed stream.

Sequence k of domain d is stream tokens ``[k L, k L + L + 1)`` for the run's seed and seq_len L
(``ddk_fast/data/packing.py``). That name does not depend on the mixing weights, the step or the rank, so DDK
may draw domains in any order and the trainer still reads the matching rows: :func:`batch_sequence_indices`
replays the sampler's largest-deficit walk to name the rows of a batch.
"""

from __future__ import annotations

import numpy as np

from ..data.packing import epoch_permutation, fill_from_stream, stream_cumsum


def domain_sequences(stream_len: int, seq_len: int, epochs: float) -> int:
    """Sequences of a domain covered by ``epochs`` passes over its stream (at least one)."""
    return max(1, -(-int(np.ceil(epochs * stream_len)) // seq_len))


def sequence_tokens(shard, domain: int, seed: int, seq_len: int, sep: int, start: int, count: int):
    """Sequences ``[start, start + count)`` of a domain's packed stream, ``int64 [count, seq_len + 1]``:
    exactly what :class:`~ddk_fast.data.DomainSampler` returns for those sequence indices (input = [:-1],
    labels = [1:])."""
    n_docs = shard.offsets.size - 1
    stream_len = shard.num_tokens + shard.num_docs
    cache: dict[int, tuple] = {}

    def epoch_order(e: int):
        if e not in cache:
            cache.clear()
            order = epoch_permutation(seed, domain, e, n_docs)
            cache[e] = (order, stream_cumsum(shard.offsets, order))
        return cache[e]

    out = np.empty((count, seq_len + 1), dtype=np.int64)
    for r in range(count):
        fill_from_stream(
            shard.tokens, shard.offsets, epoch_order, stream_len, (start + r) * seq_len, out[r], sep
        )
    return out


def batch_sequence_indices(weights, window, seq_index, world_size: int, batch_size: int, rank: int):
    """(domain, sequence index) of the rows of the next batch of a sampler in state (``window``,
    ``seq_index``) with ``weights``: the largest-deficit walk of ``ddk_fast/data/packing.py`` over the global
    batch, this rank's rows. Returns two ``int64 [batch_size]`` arrays."""
    w = np.asarray(weights, dtype=np.float64)
    window = np.array(window, dtype=np.int64)
    nxt = np.array(seq_index, dtype=np.int64)
    doms = np.empty(batch_size, dtype=np.int64)
    idx = np.empty(batch_size, dtype=np.int64)
    lo = rank * batch_size
    for g in range(world_size * batch_size):
        n = int(window.sum())
        d = int(np.argmax(w * float(n + 1) - window.astype(np.float64)))
        window[d] += 1
        if lo <= g < lo + batch_size:
            doms[g - lo], idx[g - lo] = d, nxt[d]
        nxt[d] += 1
    return doms, idx
