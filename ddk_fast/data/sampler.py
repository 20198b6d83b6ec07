"""DomainSampler: streams packed training sequences from per-domain token shards in DDK's domain mixture.

DDK (PAPERS.md §DDK.3) draws each training sequence from domain i with probability r[i], and changes r
every K steps. This sampler does that from memory-mapped shards without loading them, with exact resume and
per-token domain ids for the per-domain loss. Two backends with identical output (a parity test compares
them batch for batch): the optional C++ extension ``ddk_fast._sampler_ext`` (``csrc/sampler.cpp``) and numpy
(``ddk_fast/data/packing.py``, which defines the semantics). ``ddk_fast.backend.resolve_sampler_backend``
chooses, and ``sampler.backend`` says which and why.

Design choices (measurements in docs/sampler.md):

* **Domain choice: deterministic largest deficit** (Megatron-LM's blending helper), not seeded random
  draws. Sequence n after a weight change goes to ``argmax_d w[d] * (n + 1) - count[d]``. The realised mix
  is exact over any window (every prefix is within one sequence per domain of ``n * w``), it is identical
  on every rank without communication, and its state is the per-domain counts. Random draws would add
  binomial noise (std ``sqrt(n w (1 - w))`` sequences) to a mixture DDK already adapts on purpose, and need
  a generator state. Counts restart at every :meth:`DomainSampler.set_weights`.
* **Document order: a hash-keyed argsort per (seed, domain, epoch)** (splitmix64 keys, stable), which C++
  and numpy reproduce bit for bit and which needs no generator state: resuming mid-epoch recomputes it.
* **Continuous packing:** documents are concatenated with one separator token after each; sequence k of a
  domain is stream tokens ``[k * seq_len, k * seq_len + seq_len + 1)`` (consecutive sequences share one
  token, so every token is a label once). A domain runs into its next epoch (a new order) when exhausted,
  also within a sequence, so a domain smaller than one sequence works. Text is never padded. A shard with a
  loss mask (chat / prompt-completion data, packed whole into blocks of ``seq_len - 1`` tokens by
  ``data/examples.py``, so each sequence is one block) gets ``labels = ignore_index`` where the mask is 0.
* **Ranks:** all ranks walk the same global batch of ``world_size * batch_size`` domain choices; rank r
  materialises rows ``[r * B, (r + 1) * B)``. Each choice takes its domain's next sequence index, so ranks
  never overlap. The state is global (identical on all ranks but the per-rank report counters), so a run
  can resume with another world size.
* **State** (:meth:`DomainSampler.state_dict`): weights, and per domain the next sequence index and the
  count since the last weight change. Exact resume anywhere, also mid-epoch and after a weight change.
* **Memory:** shards are mmapped; only touched pages become resident. But a fault on a cached file may map a
  whole large folio (up to 2 MiB; 1.8 MB of RSS per random 4 KB read measured on a 6.18 kernel), so a shard
  larger than its share of ``page_budget_bytes`` (default 64 MiB over all domains) is handled apart: the
  C++ core reads its tokens with ``pread`` from the OS page cache (nothing mapped), the numpy core reads
  the mapping and drops the 2 MiB regions it touched (MADV_DONTNEED) past the share. Shards within their
  share are read through the mapping at full speed; ``None`` treats every shard so. Measurements in
  docs/sampler.md.
* **Prefetch:** :meth:`DomainSampler.prefetch` assembles batches in a background thread (the C++ core
  releases the GIL). ``state_dict`` reports the state after the last batch *consumed*; ``set_weights``,
  ``load_state_dict`` or ``next_batch`` during prefetching discard the batches built ahead and rewind, so
  the stream is exactly the one without prefetching.
"""

from __future__ import annotations

import atexit
import importlib
import math
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from ..backend import SAMPLER_EXT, BackendChoice, resolve_sampler_backend
from .packing import NumpySamplerCore
from .shards import TokenShard

STATE_VERSION = 1
DEFAULT_PAGE_BUDGET = 64 << 20


class DomainSampler:
    """Packed ``[batch_size, seq_len]`` batches, each sequence from one domain, in the given mixture.

    Args:
        shards: one training :class:`TokenShard` per domain (each with >= 1 document and >= 1 token).
        weights: mixture weights, finite, >= 0, not all zero; normalised to sum 1.
        seq_len: tokens per row of ``input_ids``.
        batch_size: rows per batch on this rank.
        sep_token_id: the token inserted after every document (e.g. the tokenizer's EOS).
        seed: document-order seed.
        rank, world_size: data-parallel sharding (no overlap between ranks).
        ignore_index: label value for padding (continuous packing never pads).
        backend: ``auto`` | ``cpp`` | ``numpy`` (env ``DDK_FAST_SAMPLER_BACKEND`` overrides).
        page_budget_bytes: bound on resident mapped pages of large shards (see the module docstring);
            ``None`` never drops pages (fastest when the corpus fits in RAM and RSS does not matter).

    ``next_batch()`` returns ``input_ids``, ``labels``, ``domain_ids``: ``np.int64 [batch_size, seq_len]``.
    """

    def __init__(
        self,
        shards: Sequence[TokenShard],
        weights: Sequence[float],
        *,
        seq_len: int,
        batch_size: int,
        sep_token_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        ignore_index: int = -100,
        backend: str = "auto",
        page_budget_bytes: int | None = DEFAULT_PAGE_BUDGET,
    ):
        shards = list(shards)
        if not shards:
            raise ValueError("shards: expected at least one domain shard, got none")
        for i, s in enumerate(shards):
            if not isinstance(s, TokenShard):
                raise TypeError(f"shards[{i}]: expected a TokenShard, got {type(s).__name__}")
            if s.num_docs == 0 or s.num_tokens == 0:
                raise ValueError(
                    f"shards[{i}] ({s.path}): domain has no documents (n_docs={s.num_docs}, "
                    f"n_tokens={s.num_tokens}); every domain needs at least one non-empty document"
                )
        for name, value, lo in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
        ):
            if not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        if not isinstance(sep_token_id, (int, np.integer)) or not 0 <= sep_token_id < 2**31:
            raise ValueError(f"sep_token_id: expected a token id >= 0, got {sep_token_id!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
        self.shards = shards
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.sep_token_id, self.seed = int(sep_token_id), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.ignore_index = int(ignore_index)
        for i, s in enumerate(shards):
            packed = s.meta.get("packed_seq_len")
            if s.mask is not None and packed is not None and int(packed) != self.seq_len:
                raise ValueError(
                    f"shards[{i}] ({s.path}): its examples were packed for seq_len {packed}, "
                    f"not {self.seq_len}"
                )
        self.backend: BackendChoice = resolve_sampler_backend(backend)
        args = (
            [s.tokens for s in shards],
            [s.offsets for s in shards],
            self.seq_len,
            self.batch_size,
            self.sep_token_id,
            self.seed,
            self.rank,
            self.world_size,
        )
        if self.backend.name == "cpp":
            self._core = importlib.import_module(SAMPLER_EXT).SamplerCore(*args)
        else:
            self._core = NumpySamplerCore(*args)
        # Resident-page budget: a shard within its share never needs care (all of those fit together). One
        # beyond it is read with pread() by the C++ core (maps nothing), or, in numpy, through the mapping
        # with the touched 2 MiB regions dropped past the share (see the module docstring).
        shares = np.zeros(len(shards), dtype=np.int64)
        if page_budget_bytes is not None:
            share = max(1, int(page_budget_bytes) // len(shards))
            shares[:] = [share if s.nbytes > share else 0 for s in shards]
        if any(s.mask is not None for s in shards):
            self._core.set_masks([s.mask for s in shards], self.ignore_index)
        if isinstance(self._core, NumpySamplerCore):
            self._core.mmaps = [(s._tokens_mm, s._offsets_mm) for s in shards]
            self._core.set_page_budget(shares)
        else:
            self._core.set_read_fds(np.array([s.fileno() if sh else -1 for s, sh in zip(shards, shares)]))
        self._weights = np.zeros(len(shards))
        self._batches = 0
        self._prefetcher: _Prefetcher | None = None
        self._consumed: tuple | None = None  # core state after the last consumed batch, while prefetching
        # optional ``hook(batch, core state before it, weights) -> dict`` merged into each batch, run where
        # the batch is assembled (the prefetch thread): ddk_fast.teacher_cache.training.CacheRows
        self.batch_hook = None
        self.set_weights(weights)

    # -- mixture ---------------------------------------------------------------------------------
    @property
    def num_domains(self) -> int:
        return len(self.shards)

    @property
    def weights(self) -> np.ndarray:
        """The current mixture, normalised to sum 1 (a copy)."""
        return self._weights.copy()

    def _check_weights(self, weights: Sequence[float]) -> np.ndarray:
        try:
            w = np.array(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"weights: expected {self.num_domains} numbers, got {weights!r}") from None
        if w.shape != (self.num_domains,):
            raise ValueError(
                f"weights: expected {self.num_domains} numbers (one per domain), got {weights!r}"
            )
        if not np.all(np.isfinite(w)):
            raise ValueError(f"weights: expected finite numbers, got {w.tolist()}")
        if np.any(w < 0):
            raise ValueError(f"weights: expected numbers >= 0, got a negative weight in {w.tolist()}")
        if not np.any(w > 0):
            raise ValueError(f"weights: expected at least one weight > 0, got all zero {w.tolist()}")
        total = _finite_sum(w)
        if not math.isfinite(total):
            raise ValueError(f"weights: expected numbers whose sum is finite, got {w.tolist()}")
        return w / total

    def set_weights(self, weights: Sequence[float]) -> None:
        """Change the mixture from the next batch on (the largest-deficit counts restart)."""
        w = self._check_weights(weights)
        self._pause_prefetch()
        self._weights = w
        self._core.set_weights(w)

    # -- batches ---------------------------------------------------------------------------------
    def _alloc(self) -> dict[str, np.ndarray]:
        shape = (self.batch_size, self.seq_len)
        return {
            "input_ids": np.empty(shape, dtype=np.int64),
            "labels": np.empty(shape, dtype=np.int64),
            "domain_ids": np.empty(shape, dtype=np.int64),
        }

    def _produce(self) -> dict[str, np.ndarray]:
        """Assemble one batch with the core (also runs in the prefetch thread)."""
        b = self._alloc()
        before = self._core.get_state() if self.batch_hook is not None else None
        self._core.next_batch(b["input_ids"], b["labels"], b["domain_ids"])
        if self.batch_hook is not None:  # e.g. the teacher cache's rows of these sequences
            b.update(self.batch_hook(b, before, self._weights))
        return b

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch: ``input_ids``, ``labels``, ``domain_ids``, ``np.int64 [batch_size, seq_len]``."""
        if self._prefetcher is not None:
            return next(self._prefetcher)
        b = self._produce()
        self._batches += 1
        return b

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next_batch()

    def prefetch(self, depth: int = 2) -> Iterator[dict[str, np.ndarray]]:
        """An endless iterator whose batches are assembled ``depth`` ahead in a background thread.

        Yields exactly what repeated ``next_batch()`` calls would; ``state_dict()`` stays that of the last
        batch consumed. Close it (or let it be garbage-collected) to stop the thread.
        """
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: expected an integer >= 1, got {depth!r}")
        self._stop_prefetch()
        self._prefetcher = _Prefetcher(self, depth)
        return self._prefetcher

    def _pause_prefetch(self) -> None:
        """Stop the producer and rewind the core to the last consumed batch (it restarts on demand)."""
        if self._prefetcher is not None and self._prefetcher._halt():
            self._core.set_state(*self._consumed)
        self._consumed = None  # the core itself now holds the consumed state

    def _stop_prefetch(self) -> None:
        self._pause_prefetch()
        self._prefetcher = None

    # -- accounting and state --------------------------------------------------------------------
    def _core_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._consumed is not None:  # a producer thread is running ahead of the consumer
            return self._consumed
        return self._core.get_state()

    @property
    def sequences_per_domain(self) -> np.ndarray:
        """Sequences this rank has returned per domain (cumulative, np.int64 [num_domains])."""
        return np.array(self._core_state()[2], dtype=np.int64)

    @property
    def tokens_per_domain(self) -> np.ndarray:
        """Training tokens (``seq_len`` per sequence) this rank has returned per domain."""
        return self.sequences_per_domain * self.seq_len

    @property
    def batches(self) -> int:
        return self._batches

    def _stream_lengths(self) -> list[int]:
        return [s.num_tokens + s.num_docs for s in self.shards]

    def state_dict(self) -> dict:
        """Plain python state (json-serialisable): enough for an exact resume."""
        seq_index, window, rank_seqs = self._core_state()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "stream_lengths": self._stream_lengths(),
            "weights": [float(x) for x in self._weights],
            "seq_index": [int(x) for x in seq_index],
            "window_counts": [int(x) for x in window],
            "sequences_per_domain": [int(x) for x in rank_seqs],
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. The shards, seed and seq_len must match; batch_size and
        world_size may differ (the state is global), then only the per-rank report counters are approximate.

        Every field is validated (:func:`validate_state`) before either backend sees it: a corrupt or
        foreign state raises ValueError naming the field, and the sampler is left unchanged.
        """
        arrays, weights, batches = validate_state(
            state,
            num_domains=self.num_domains,
            seed=self.seed,
            seq_len=self.seq_len,
            stream_lengths=self._stream_lengths(),
        )
        self._stop_prefetch()
        self._weights = weights  # the stored weights bit for bit (renormalising could change the last bit)
        self._core.set_weights(self._weights)
        self._core.set_state(*arrays)
        self._batches = batches


# A sequence index k reads stream positions up to (k + 1) * seq_len + 1: keep that below 2**62, far inside
# int64 (the C++ core checks the same bound and raises instead of overflowing).
MAX_STREAM_POS = 1 << 62
_STATE_KEYS = (
    "version", "seed", "seq_len", "batch_size", "rank", "world_size", "stream_lengths", "weights",
    "seq_index", "window_counts", "sequences_per_domain", "batches",
)  # fmt: skip


def _finite_sum(w: np.ndarray) -> float:
    """Exact sum (math.fsum), inf when it overflows (fsum raises OverflowError there)."""
    try:
        return math.fsum(w)
    except OverflowError:
        return math.inf


def _is_seq(v, n: int) -> bool:
    """A list, tuple or 1-D array of length n."""
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.shape[0] == n
    return isinstance(v, (list, tuple)) and len(v) == n


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


def _int_list(state: dict, key: str, n: int, hi: int) -> np.ndarray:
    v = state[key]
    if not _is_seq(v, n) or not all(_is_int(x) and 0 <= x <= hi for x in v):
        raise ValueError(f"sampler state: {key}: expected {n} integers in [0, {hi}], got {v!r:.200}")
    return np.array([int(x) for x in v], dtype=np.int64)


def validate_state(
    state, *, num_domains: int, seed: int, seq_len: int, stream_lengths: list[int]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, int]:
    """Check a sampler state dict field by field (types, lengths, ranges, weights normalised) against a
    sampler's settings. Returns ``((seq_index, window_counts, sequences_per_domain), weights, batches)``;
    raises ValueError naming the first bad field."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"sampler state: expected a dict with version {STATE_VERSION}, got {state!r:.200}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"sampler state: missing fields {missing}")
    for key in ("seed", "seq_len", "batch_size", "rank", "world_size", "batches"):
        if not _is_int(state[key]) or state[key] < 0:
            raise ValueError(f"sampler state: {key}: expected an integer >= 0, got {state[key]!r:.100}")
    for key, mine in (("seed", seed), ("seq_len", seq_len), ("stream_lengths", stream_lengths)):
        theirs = state[key]
        if key == "stream_lengths" and isinstance(theirs, (list, tuple, np.ndarray)):
            theirs = [int(x) if _is_int(x) else x for x in list(np.asarray(theirs, dtype=object).ravel())]
        if theirs != mine:
            raise ValueError(
                f"sampler state: {key} is {state[key]!r:.200} in the checkpoint but {mine!r:.200} here "
                "(different data or settings: the state cannot be resumed)"
            )
    w = state["weights"]
    if not _is_seq(w, num_domains) or not all(_is_number(x) for x in w):
        raise ValueError(f"sampler state: weights: expected {num_domains} numbers, got {w!r:.200}")
    weights = np.array([float(x) for x in w], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"sampler state: weights: expected finite numbers >= 0, not all 0, got {w!r:.200}")
    total = _finite_sum(weights)
    if not abs(total - 1.0) <= 1e-9:
        raise ValueError(f"sampler state: weights: expected numbers that sum to 1, got sum {total!r}")
    max_index = MAX_STREAM_POS // seq_len - 2
    seq_index = _int_list(state, "seq_index", num_domains, max_index)
    window = _int_list(state, "window_counts", num_domains, MAX_STREAM_POS // num_domains)
    rank_seqs = _int_list(state, "sequences_per_domain", num_domains, max_index)
    return (seq_index, window, rank_seqs), weights, int(state["batches"])


# Producer threads still running when the interpreter shuts down are stopped first (atexit runs before
# daemon threads are frozen): a daemon thread frozen inside the C++ core (pybind11) is torn down by a forced
# unwind through C++ frames, which aborts the process ("terminate called without an active exception").
_LIVE_PREFETCHERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _halt_live_prefetchers() -> None:
    for prefetcher in list(_LIVE_PREFETCHERS):
        try:
            prefetcher._halt()
        except Exception:
            pass


class _Prefetcher:
    """Background producer over ``sampler._produce``; items are (batch, core state after it)."""

    def __init__(self, sampler: DomainSampler, depth: int):
        self._sampler = sampler
        self._depth = depth
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._queue, self._stop), name="ddk-sampler-prefetch", daemon=True
        )
        self._thread.start()
        _LIVE_PREFETCHERS.add(self)

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        core = self._sampler._core
        try:
            while not stop.is_set():
                batch = self._sampler._produce()
                item = (batch, core.get_state())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the consumer
            while not stop.is_set():
                try:
                    q.put((exc, None), timeout=0.05)
                    break
                except queue.Full:
                    continue

    def _halt(self) -> bool:
        """Stop the producer thread; True when one was running."""
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        self._thread = None
        return True

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._sampler
        if s._prefetcher is not self:
            raise RuntimeError("this prefetch iterator was replaced by a newer sampler.prefetch() call")
        if self._thread is None:
            s._consumed = s._core.get_state()
            self._start()
        batch, state = self._queue.get()
        if isinstance(batch, BaseException):
            s._pause_prefetch()
            raise batch
        s._consumed = state
        s._batches += 1
        return batch

    def close(self) -> None:
        if self._sampler._prefetcher is self:
            self._sampler._stop_prefetch()

    def __del__(self) -> None:
        try:
            self._halt()
        except Exception:
            pass
