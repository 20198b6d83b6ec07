"""The sampler's semantics in numpy: the reference that ``csrc/sampler.cpp`` reproduces bit for bit.

Everything here is defined by integer arithmetic so both backends agree exactly:

* **Document order** of domain ``d`` in epoch ``e``: ``argsort`` of 64-bit keys
  ``key[i] = mix(epoch_key ^ i)`` with ``epoch_key = mix(mix(mix(seed) ^ d) ^ e)`` and ``mix`` the splitmix64
  finaliser. ``mix`` is a bijection, so the keys are distinct (no ties) and C++ sorts the keys alone and
  recovers each index by inverting ``mix`` (8 bytes per document instead of 16 for (key, index) pairs).
* **The stream** of a domain: epoch 0's documents in that order, each followed by one separator token, then
  epoch 1, and so on forever. Its per-epoch length is ``S = n_tokens + n_docs``.
* **Sequence k** of a domain is ``stream[k * seq_len : k * seq_len + seq_len + 1]``: consecutive sequences
  overlap by one token, so every stream token except the first is a label exactly once (Megatron's GPT
  dataset convention); ``input = seq[:-1]``, ``labels = seq[1:]``. A domain shorter than one sequence simply
  wraps into its next epoch inside the sequence.
* **Loss masks** (chat / prompt-completion domains, ``data/examples.py``): a shard may carry one uint8 per
  token (:meth:`NumpySamplerCore.set_masks`); then ``labels[i] = ignore_index`` where the mask of the label's
  stream position is 0, and every separator of that domain has mask 0. A domain without a mask counts every
  label.
* **Domain choice** for the n-th sequence since the last weight change (n = 0, 1, ...): the domain with the
  largest deficit ``w[d] * (n + 1) - count[d]`` (first index on ties), then ``count[d] += 1`` (Megatron-LM's
  blending rule). Over any prefix the realised counts stay within one sequence of ``n * w``.
* **Global batch and ranks**: every rank walks the same ``world_size * batch_size`` choices per step; rank r
  materialises rows ``[r * batch_size, (r + 1) * batch_size)`` of that global batch. Each choice takes the
  domain's next sequence index, so ranks never overlap and all see the same domain sequence.

The state is therefore tiny: per domain the next sequence index (its stream position is
``index * seq_len``) and the count since the last weight change, plus the weights.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np

MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# Resident pages (numpy core): a page fault on a cached file may map a whole large folio (up to 2 MiB on
# Linux >= 6.x: 1.8 MB of RSS per random 4 KB read measured on this project's 6.18 kernel). For a shard over
# its page budget the numpy core records the 2 MiB regions of the token file it reads and drops them
# (MADV_DONTNEED) past the budget. (The C++ core reads such a shard with pread() instead.)
REGION_SHIFT = 21


def mix64(x: int) -> int:
    """splitmix64 finaliser on a python int (mod 2**64)."""
    z = (x + _GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (numpy array arithmetic wraps mod 2**64)."""
    z = x + np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def epoch_key(seed: int, domain: int, epoch: int) -> int:
    return mix64(mix64(mix64(seed & MASK64) ^ (domain & MASK64)) ^ (epoch & MASK64))


def epoch_permutation(seed: int, domain: int, epoch: int, n_docs: int) -> np.ndarray:
    """Document visiting order (int64 [n_docs]) of ``domain`` in ``epoch``."""
    keys = _mix64_array(np.uint64(epoch_key(seed, domain, epoch)) ^ np.arange(n_docs, dtype=np.uint64))
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


def stream_cumsum(offsets: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Start of each document (in ``order``) in one epoch of the stream; int64 [n_docs + 1], last = S."""
    lengths = np.diff(offsets)[order]
    cum = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=cum[1:])
    return cum


def fill_from_stream(
    tokens: np.ndarray,
    offsets: np.ndarray,
    epoch_order: Callable[[int], tuple[np.ndarray, np.ndarray]],
    stream_len: int,
    pos: int,
    out: np.ndarray,
    sep: int,
    touch: Callable[[int, int], None] | None = None,
    mask: np.ndarray | None = None,
    mask_out: np.ndarray | None = None,
) -> None:
    """Copy ``out.size`` stream tokens starting at stream position ``pos`` into ``out``.

    ``epoch_order(e)`` returns (document order, its stream_cumsum) for epoch e; ``touch(a, b)`` (optional)
    is told the byte range ``[a, b)`` of the token file read for each piece. ``mask`` (the shard's loss mask,
    optional): the same stream positions' mask values go to ``mask_out`` (separators: 0).
    """
    n = out.size
    i = 0
    itemsize = tokens.dtype.itemsize
    n_docs = offsets.size - 1
    while i < n:
        epoch, q = divmod(pos, stream_len)
        order, cum = epoch_order(epoch)
        j = int(np.searchsorted(cum, q, side="right")) - 1
        off = q - int(cum[j])
        while i < n and j < n_docs:
            doc = int(order[j])
            start = int(offsets[doc])
            length = int(offsets[doc + 1]) - start
            if off < length:
                take = min(length - off, n - i)
                out[i : i + take] = tokens[start + off : start + off + take]
                if mask is not None:
                    mask_out[i : i + take] = mask[start + off : start + off + take]
                if touch is not None:
                    touch((start + off) * itemsize, (start + off + take) * itemsize)
                i += take
                pos += take
            if i < n:  # the document is exhausted: its separator
                out[i] = sep
                if mask is not None:
                    mask_out[i] = 0
                i += 1
                pos += 1
            j += 1
            off = 0


class NumpySamplerCore:
    """Numpy implementation of the sampler core: the same results as ``_sampler_ext.SamplerCore`` and the
    same methods, except the resident-page control (``set_page_budget`` + ``mmaps`` here, ``set_read_fds``
    in C++)."""

    def __init__(
        self,
        tokens: list[np.ndarray],
        offsets: list[np.ndarray],
        seq_len: int,
        batch_size: int,
        sep: int,
        seed: int,
        rank: int,
        world_size: int,
    ):
        self.tokens = tokens
        self.offsets = offsets
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.sep = sep
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        nd = len(tokens)
        self.stream_len = [int(t.size) + int(o.size) - 1 for t, o in zip(tokens, offsets)]
        self.weights = np.full(nd, 1.0 / nd)
        self.seq_index = np.zeros(nd, dtype=np.int64)
        self.window = np.zeros(nd, dtype=np.int64)
        self.rank_sequences = np.zeros(nd, dtype=np.int64)
        self.page_share = [0] * nd
        self.mmaps: list[tuple] | None = None  # (tokens mmap, offsets mmap) per domain, set by DomainSampler
        self._regions: list[list[int]] = [[] for _ in range(nd)]
        self._cache: list[tuple[int, np.ndarray, np.ndarray] | None] = [None] * nd
        self._scratch = np.empty(seq_len + 1, dtype=np.int64)
        self.masks: list[np.ndarray | None] = [None] * nd
        self.ignore_index = -100
        self._mask_scratch = np.empty(seq_len + 1, dtype=np.uint8)

    def set_masks(self, masks: list, ignore_index: int) -> None:
        """Per domain its uint8 loss mask (one per token) or None (every label counts)."""
        if len(masks) != len(self.tokens):
            raise ValueError("masks: expected one entry (an array or None) per domain")
        for d, m in enumerate(masks):
            if m is not None and (m.dtype != np.uint8 or m.shape != self.tokens[d].shape):
                raise ValueError(f"masks[{d}]: expected a uint8 array of one entry per token")
        self.masks = list(masks)
        self.ignore_index = int(ignore_index)

    def _epoch(self, d: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        c = self._cache[d]
        if c is None or c[0] != epoch:
            self._cache[d] = None  # free the previous epoch first
            order = epoch_permutation(self.seed, d, epoch, self.offsets[d].size - 1)
            c = (epoch, order, stream_cumsum(self.offsets[d], order))
            self._cache[d] = c
            if self.page_share[d] and self.mmaps and self.mmaps[d][1] is not None:
                _dontneed(self.mmaps[d][1], 0, len(self.mmaps[d][1]))  # offsets: read once per epoch
        return c[1], c[2]

    def set_page_budget(self, shares: np.ndarray) -> None:
        """Bytes of resident token pages allowed per domain (0: never drop); needs ``self.mmaps``."""
        self.page_share = [max(0, int(x)) for x in shares]

    def _touch(self, d: int, a: int, b: int) -> None:
        regions = self._regions[d]
        for r in range(a >> REGION_SHIFT, ((b - 1) >> REGION_SHIFT) + 1):
            if not regions or regions[-1] != r:
                regions.append(r)
        if len(regions) << REGION_SHIFT >= self.page_share[d]:
            mm = self.mmaps[d][0]
            for r in regions:
                lo = r << REGION_SHIFT
                _dontneed(mm, lo, min(1 << REGION_SHIFT, len(mm) - lo))
            regions.clear()

    def set_weights(self, weights: np.ndarray) -> None:
        self.weights = np.array(weights, dtype=np.float64)
        self.window[:] = 0

    def _choose(self) -> int:
        n = int(self.window.sum())
        deficit = self.weights * float(n + 1) - self.window.astype(np.float64)
        d = int(np.argmax(deficit))
        self.window[d] += 1
        return d

    def next_batch(self, input_ids: np.ndarray, labels: np.ndarray, domain_ids: np.ndarray) -> None:
        seq, L, B = self._scratch, self.seq_len, self.batch_size
        lo = self.rank * B
        for g in range(self.world_size * B):
            d = self._choose()
            k = int(self.seq_index[d])
            self.seq_index[d] = k + 1
            if lo <= g < lo + B:
                row = g - lo
                touch = None
                if self.page_share[d] and self.mmaps and self.mmaps[d][0] is not None:
                    touch = lambda a, b, d=d: self._touch(d, a, b)  # noqa: E731
                fill_from_stream(
                    self.tokens[d],
                    self.offsets[d],
                    lambda e, d=d: self._epoch(d, e),
                    self.stream_len[d],
                    k * L,
                    seq,
                    self.sep,
                    touch,
                    self.masks[d],
                    self._mask_scratch,
                )
                input_ids[row] = seq[:-1]
                labels[row] = seq[1:]
                if self.masks[d] is not None:
                    labels[row][self._mask_scratch[1:] == 0] = self.ignore_index
                domain_ids[row] = d
                self.rank_sequences[d] += 1

    def get_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.seq_index.copy(), self.window.copy(), self.rank_sequences.copy()

    def set_state(self, seq_index: np.ndarray, window: np.ndarray, rank_sequences: np.ndarray) -> None:
        self.seq_index[:] = seq_index
        self.window[:] = window
        self.rank_sequences[:] = rank_sequences


def _dontneed(mm, start: int, length: int) -> None:
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and length > 0:
        mm.madvise(mmap.MADV_DONTNEED, start, length)
