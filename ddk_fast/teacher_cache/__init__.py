"""Offline teacher: the teacher's top-k distribution of every training sequence, cached once on disk.

``python -m ddk_fast.teacher_cache --config run.toml --top-k 64 [--out DIR]`` writes it (see ``writer.py``);
``[model] teacher_cache = "DIR"`` trains from it without loading the teacher (the sparse-teacher loss,
:func:`ddk_fast.fused_linear_kd_loss_topk`).

**Addressing.** A training sequence is named by (domain, sequence index k) in that domain's packed stream
(``ddk_fast/data/packing.py``: sequence k = stream tokens ``[k L, k L + L + 1)`` for the run's seed and
seq_len L). That name does not depend on the mixing weights, the step or the rank, so DDK may draw domains in
any order and the trainer still reads the matching rows. The cache holds sequences ``[0, n_d)`` of domain d,
``n_d = ceil(epochs * stream_len_d / L)`` (``--epochs``, default 1); a run that draws further stops with an
error saying so.

**Layout** of ``DIR``::

    manifest.json                    identity + per-domain shard list (checksums)
    <domain>/<start>.ids             int32    [count, L, k]  top-k token ids, by decreasing probability
    <domain>/<start>.logprobs        bf16/fp16 [count, L, k] their log-probabilities at T = 1
    <domain>/<start>.tail            fp32     [count, L]     log of the remaining probability mass
    <domain>/<start>.json            the shard's record (written last: a shard without it is incomplete)

Disk: ``L k (4 + 2) + 4`` bytes per token (k = 64: 388 MB per million tokens). The manifest records the
teacher's identity (config and weights sha256), the tokenizer's sha256, seq_len, top_k, the seed, each
domain's data key (the token shard's content key), the teacher's per-domain validation CE (DDK's
denominator) and a sha256 per shard file. :class:`TeacherCache` verifies every checksum when opened and
names a corrupt shard; :meth:`TeacherCache.check_run` refuses a cache built for other data (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..data.packing import epoch_permutation, fill_from_stream, stream_cumsum

FORMAT = "ddk_fast.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
FILES = ("ids", "logprobs", "tail")
LOGPROB_DTYPES = {"bfloat16": 2, "float16": 2}


class TeacherCacheError(RuntimeError):
    """A cache is missing, corrupt or does not fit this run; the message names the shard or the field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(np.float16)


class TeacherCache:
    """A written cache, opened read-only (memory-mapped shards).

    ``TeacherCache(dir, verify=True)`` reads the manifest and (``verify``) checks every shard file's size and
    sha256; a problem raises :class:`TeacherCacheError` naming the file. :meth:`rows` returns the cached rows
    of (domain, sequence index) pairs as torch tensors.
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise TeacherCacheError(
                f"teacher cache {self.path}: no {MANIFEST} (not a cache, or never finished)"
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise TeacherCacheError(f"teacher cache {mpath}: not valid JSON ({exc})") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise TeacherCacheError(
                f"teacher cache {mpath}: expected format {FORMAT} version {VERSION}, "
                f"got {m.get('format')!r} version {m.get('version')!r}"
            )
        self.seq_len, self.top_k = int(m["seq_len"]), int(m["top_k"])
        self.lp_dtype = _np_dtype(m["logprob_dtype"])
        self.domains: dict[str, dict] = m["domains"]
        self._maps: dict[tuple[str, int], tuple] = {}
        self._starts = {name: np.array([s["start"] for s in d["shards"]], dtype=np.int64)
                        for name, d in self.domains.items()}  # fmt: skip
        if verify:
            self.verify()

    # -- integrity -------------------------------------------------------------------------------
    def _shard_bytes(self, count: int) -> dict[str, int]:
        tok = count * self.seq_len
        return {"ids": tok * self.top_k * 4, "logprobs": tok * self.top_k * 2, "tail": tok * 4}

    def verify(self) -> None:
        """Check every shard file's size and sha256 against the manifest (TeacherCacheError naming it)."""
        for name, d in self.domains.items():
            covered = 0
            for s in d["shards"]:
                if s["start"] != covered:
                    raise TeacherCacheError(
                        f"teacher cache {self.path}: domain {name!r} has a gap at {covered}"
                    )
                covered += s["count"]
                sizes = self._shard_bytes(s["count"])
                for f in FILES:
                    self._verify_file(self.path / f"{s['prefix']}.{f}", sizes[f], s["sha256"][f])
            if covered != d["sequences"]:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: domain {name!r} covers {covered} of {d['sequences']} "
                    "sequences"
                )

    @staticmethod
    def _verify_file(p: Path, size: int, digest: str) -> None:
        if not p.is_file():
            raise TeacherCacheError(f"teacher cache shard {p}: missing")
        if p.stat().st_size != size:
            raise TeacherCacheError(f"teacher cache shard {p}: {p.stat().st_size} bytes, expected {size}")
        if sha256_file(p) != digest:
            raise TeacherCacheError(
                f"teacher cache shard {p}: checksum mismatch (corrupt or modified); rebuild it: delete "
                f"{p.with_suffix('.json')} and rerun python -m ddk_fast.teacher_cache"
            )

    def check_run(self, expected: dict) -> None:
        """Refuse a cache written for another run: ``expected`` holds ``tokenizer_sha256``, ``seq_len``,
        ``seed``, ``sep_token_id`` and ``domains`` ({name: data_key}). Raises TeacherCacheError listing every
        difference."""
        m = self.manifest
        diffs = []
        for key in ("tokenizer_sha256", "seq_len", "seed", "sep_token_id"):
            if m.get(key) != expected[key]:
                diffs.append(f"{key}: cache {m.get(key)!r}, run {expected[key]!r}")
        for name, key in expected["domains"].items():
            if name not in self.domains:
                diffs.append(f"domain {name!r}: not in the cache (cached: {sorted(self.domains)})")
            elif self.domains[name]["data_key"] != key:
                cached = self.domains[name]["data_key"]
                diffs.append(f"domain {name!r}: data changed (cache data key {cached}, run {key})")
        if diffs:
            raise TeacherCacheError(f"teacher cache {self.path} does not fit this run: " + "; ".join(diffs))

    # -- access ----------------------------------------------------------------------------------
    def teacher_val_ce(self, names: list[str]) -> list[float]:
        """The teacher's mean CE per domain on the validation split (measured when the cache was written)."""
        return [float(self.domains[n]["teacher_val_ce"]) for n in names]

    def teacher_test_ce(self, names: list[str]) -> list[float]:
        """The teacher's mean CE per domain on the test split (measured when the cache was written)."""
        return [float(self.domains[n]["teacher_test_ce"]) for n in names]

    def _shard(self, name: str, j: int):
        key = (name, j)
        if key not in self._maps:
            s = self.domains[name]["shards"][j]
            shape = (s["count"], self.seq_len)
            base = self.path / s["prefix"]
            self._maps[key] = (
                np.memmap(f"{base}.ids", dtype="<i4", mode="r", shape=(*shape, self.top_k)),
                np.memmap(f"{base}.logprobs", dtype=self.lp_dtype, mode="r", shape=(*shape, self.top_k)),
                np.memmap(f"{base}.tail", dtype="<f4", mode="r", shape=shape),
            )
        return self._maps[key]

    def rows(self, names: list[str], domains: np.ndarray, seq_index: np.ndarray):
        """Cached rows of sequences (``names[domains[r]]``, ``seq_index[r]``): numpy ``ids`` int32
        ``[B, L, k]``, ``logprobs`` (uint16 bf16 bits or fp16) ``[B, L, k]`` and ``tail`` fp32 ``[B, L]``."""
        b = len(seq_index)
        ids = np.empty((b, self.seq_len, self.top_k), dtype=np.int32)
        lps = np.empty((b, self.seq_len, self.top_k), dtype=self.lp_dtype)
        tail = np.empty((b, self.seq_len), dtype=np.float32)
        for r, (d, k) in enumerate(zip(domains, seq_index)):
            name = names[int(d)]
            n = self.domains[name]["sequences"]
            if not 0 <= k < n:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: domain {name!r} sequence {int(k)} is not cached (it holds "
                    f"{n}); rebuild with a larger --epochs"
                )
            j = int(np.searchsorted(self._starts[name], k, side="right")) - 1
            i_map, l_map, t_map = self._shard(name, j)
            off = int(k) - int(self._starts[name][j])
            ids[r], lps[r], tail[r] = i_map[off], l_map[off], t_map[off]
        return ids, lps, tail

    def logprobs_tensor(self, lps: np.ndarray):
        """The logprobs array of :meth:`rows` as a torch tensor of the cache's dtype (bf16 / fp16)."""
        import torch

        if self.manifest["logprob_dtype"] == "bfloat16":
            return torch.from_numpy(lps.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(lps)
