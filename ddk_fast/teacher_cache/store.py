"""A written teacher cache, opened read-only: the manifest, its checks and the memory-mapped shards.

Two kinds share one layout (``manifest.json`` + per-domain shards of ``count`` sequences, each shard a few
files of per-token rows, checksummed and written atomically):

* ``topk``: ``ids`` int32 [k], ``logprobs`` bf16/fp16 [k] and ``tail`` fp32 (log of the remaining mass) per
  token; training uses the sparse-teacher loss (``fused_linear_kd_loss_topk``), an approximation (the
  teacher's support is cut to k).
* ``hidden``: ``hidden`` bf16/fp32 [H_t] per token, the teacher's final normalised hidden state, and once its
  ``lm_head`` (``head.safetensors``); training runs the dense fused loss, exact with float32 rows.

Bytes per token: top-k ``6 k + 4`` (k = 64: 388), hidden ``H_t x 2`` (bf16) or ``x 4`` (fp32); full bf16
logits would be ``V x 2``. A manifest without ``kind`` (version 1, written before the hidden kind existed) is
a top-k cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = "ddk_fast.teacher_cache"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
KINDS = ("topk", "hidden")
ROW_DTYPES = ("bfloat16", "float16", "float32")


class TeacherCacheError(RuntimeError):
    """A cache is missing, corrupt or does not fit this run; the message names the shard or the field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def np_dtype(name: str) -> np.dtype:
    """Storage dtype of a row dtype name (bf16 as its raw uint16 bits: numpy has no bfloat16)."""
    return {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}[name]


def shard_files(manifest: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The files of one shard of a cache with this manifest: name -> (storage dtype, per-token shape)."""
    kind = manifest.get("kind", "topk")
    if kind == "topk":
        k = int(manifest["top_k"])
        return {"ids": (np.dtype("<i4"), (k,)), "logprobs": (np_dtype(manifest["logprob_dtype"]), (k,)),
                "tail": (np.dtype("<f4"), ())}  # fmt: skip
    return {"hidden": (np_dtype(manifest["hidden_dtype"]), (int(manifest["hidden_size"]),))}


def bytes_per_token(manifest: dict) -> int:
    """Bytes one cached token takes on disk (all of a shard's files)."""
    return sum(_row_bytes(dt, shape) for dt, shape in shard_files(manifest).values())


def _row_bytes(dt: np.dtype, shape: tuple[int, ...]) -> int:
    return dt.itemsize * int(np.prod(shape, dtype=np.int64))


class CacheStore:
    """A written cache (either kind), opened read-only.

    ``CacheStore(dir, verify=True)`` reads the manifest and (``verify``) checks every file's size and sha256;
    a problem raises :class:`TeacherCacheError` naming the file. :meth:`rows` returns the cached rows of
    (domain, sequence index) pairs as numpy arrays, one per shard file.
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
        if m.get("format") != FORMAT or m.get("version") not in READABLE_VERSIONS:
            raise TeacherCacheError(
                f"teacher cache {mpath}: expected format {FORMAT} version 1 or 2, "
                f"got {m.get('format')!r} version {m.get('version')!r}"
            )
        self.kind = m.get("kind", "topk")
        if self.kind not in KINDS:
            raise TeacherCacheError(f"teacher cache {mpath}: kind {self.kind!r} is not one of {KINDS}")
        self.seq_len = int(m["seq_len"])
        self.files = shard_files(m)
        self.domains: dict[str, dict] = m["domains"]
        self._maps: dict[tuple[str, int], dict] = {}
        self._starts = {name: np.array([s["start"] for s in d["shards"]], dtype=np.int64)
                        for name, d in self.domains.items()}  # fmt: skip
        if verify:
            self.verify()

    # -- integrity -------------------------------------------------------------------------------
    def _shard_bytes(self, count: int) -> dict[str, int]:
        tok = count * self.seq_len
        return {f: tok * _row_bytes(dt, shape) for f, (dt, shape) in self.files.items()}

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
                for f in self.files:
                    self._verify_file(self.path / f"{s['prefix']}.{f}", sizes[f], s["sha256"][f])
            if covered != d["sequences"]:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: domain {name!r} covers {covered} of {d['sequences']} "
                    "sequences"
                )
        head = self.manifest.get("head")
        if head is not None:
            p = self.path / HEAD_FILE
            if not p.is_file() or sha256_file(p) != head["sha256"]:
                raise TeacherCacheError(
                    f"teacher cache {p}: missing or checksum mismatch (corrupt or modified); rebuild the "
                    "cache"
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
    def sequences(self, name: str) -> int:
        """Sequences cached for domain ``name`` (its sequence indices ``0 .. n - 1``)."""
        return int(self.domains[name]["sequences"])

    def teacher_ce(self, split: str, names: list[str]) -> list[float]:
        """The teacher's mean CE per domain on ``split`` (``val`` or ``test``), measured by the writer."""
        return [float(self.domains[n][f"teacher_{split}_ce"]) for n in names]

    def _shard(self, name: str, j: int) -> dict[str, np.memmap]:
        key = (name, j)
        if key not in self._maps:
            s = self.domains[name]["shards"][j]
            base = self.path / s["prefix"]
            self._maps[key] = {
                f: np.memmap(f"{base}.{f}", dtype=dt, mode="r", shape=(s["count"], self.seq_len, *shape))
                for f, (dt, shape) in self.files.items()
            }
        return self._maps[key]

    def rows(self, names: list[str], domains: np.ndarray, seq_index: np.ndarray) -> dict[str, np.ndarray]:
        """Cached rows of sequences (``names[domains[r]]``, ``seq_index[r]``): one ``[B, L, ...]`` array per
        shard file, in its storage dtype (bf16 as uint16 bits)."""
        b = len(seq_index)
        out = {f: np.empty((b, self.seq_len, *shape), dtype=dt) for f, (dt, shape) in self.files.items()}
        for r, (d, k) in enumerate(zip(domains, seq_index)):
            name = names[int(d)]
            n = self.sequences(name)
            if not 0 <= k < n:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: domain {name!r} sequence {int(k)} is not cached (it holds "
                    f"{n}); rebuild with a larger --epochs"
                )
            j = int(np.searchsorted(self._starts[name], k, side="right")) - 1
            maps = self._shard(name, j)
            off = int(k) - int(self._starts[name][j])
            for f in out:
                out[f][r] = maps[f][off]
        return out


def as_tensor(array: np.ndarray, dtype_name: str):
    """A rows array as a torch tensor of its cached dtype (bf16 rows are stored as uint16 bits)."""
    import torch

    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def open_cache(path, verify: bool = True) -> CacheStore:
    """Open the cache in ``path`` (checksums verified unless ``verify=False``)."""
    return CacheStore(path, verify=verify)
