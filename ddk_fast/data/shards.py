"""Memory-mapped token shards: one directory per (domain, split).

Layout of a shard directory::

    tokens.bin    raw token ids, little-endian uint16 (vocab_size <= 65535) or uint32, documents back to back
    offsets.bin   int64 document boundaries, n_docs + 1 entries: doc i is tokens[offsets[i]:offsets[i+1]]
    mask.bin      optional (meta "mask": true): one uint8 per token, 1 = the token is a label the loss
                  counts (chat / prompt-completion data: the assistant or completion tokens), 0 = not
    meta.json     {"format": "ddk_fast.token_shard", "version": 1, "dtype", "n_tokens", "n_docs",
                   "vocab_size", ["mask": true,] ...extra}

Both binary files are opened with ``mmap`` (read-only): nothing is read until a batch touches it, so a
shard of any size costs no memory up front. :meth:`TokenShard.release_pages` drops the pages this process
has mapped (``MADV_DONTNEED``; they stay in the OS page cache), which the sampler uses to bound its resident
memory while streaming a file larger than RAM.

Writing is atomic: :meth:`TokenShard.write` / :class:`ShardWriter` write into ``<dir>.tmp-<pid>`` and rename
it to ``<dir>`` at the end, so a crashed preparation never leaves a half-written shard behind.

Opening validates the metadata, the file sizes against it and the monotonicity of the offsets (int64,
n_docs + 1 entries: cheap next to the tokens); any problem raises :class:`ShardError` naming the path.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SHARD_FORMAT = "ddk_fast.token_shard"
SHARD_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.bin"
MASK_FILE = "mask.bin"
META_FILE = "meta.json"


class ShardError(RuntimeError):
    """A token shard is missing or corrupt; the message names the path and the problem."""

    def __init__(self, path: os.PathLike | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"token shard {self.path}: {problem}")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size: expected an integer > 0, got {vocab_size!r}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _map_file(path: Path, dtype: np.dtype, count: int) -> tuple[np.ndarray, mmap.mmap | None]:
    """Read-only memory map of ``count`` items; an empty file maps to an empty array (mmap rejects size 0)."""
    if count == 0:
        return np.empty(0, dtype=dtype), None
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=count), mm


class TokenShard:
    """A read-only, memory-mapped token shard (see the module docstring for the format).

    Open with ``TokenShard.open(path)``; create with ``TokenShard.write(path, docs, vocab_size)`` or a
    :class:`ShardWriter`. ``tokens`` and ``offsets`` are numpy views over the mapped files.
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._fd: int | None = None
        meta = self._read_meta()
        self.meta: dict = meta
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        masked = meta.get("mask") is True
        files = [(TOKENS_FILE, self.dtype.itemsize, n_tokens), (OFFSETS_FILE, 8, n_docs + 1)]
        for name, itemsize, count in files + ([(MASK_FILE, 1, n_tokens)] if masked else []):
            f = self.path / name
            if not f.is_file():
                raise ShardError(self.path, f"missing file {name}")
            size = f.stat().st_size
            if size != itemsize * count:
                raise ShardError(
                    self.path,
                    f"{name} has {size} bytes but meta.json says {count} items of {itemsize} bytes "
                    f"= {itemsize * count} bytes (truncated or overwritten?)",
                )
        self.tokens, self._tokens_mm = _map_file(self.path / TOKENS_FILE, self.dtype, n_tokens)
        self.offsets, self._offsets_mm = _map_file(self.path / OFFSETS_FILE, np.dtype("<i8"), n_docs + 1)
        self.mask: np.ndarray | None = None  # uint8 per token (1 = counted label), or None: all counted
        self._mask_mm = None
        if masked:
            self.mask, self._mask_mm = _map_file(self.path / MASK_FILE, np.dtype(np.uint8), n_tokens)
        if self.offsets[0] != 0 or self.offsets[-1] != n_tokens:
            raise ShardError(
                self.path,
                f"offsets must start at 0 and end at n_tokens={n_tokens}, "
                f"got {int(self.offsets[0])} .. {int(self.offsets[-1])}",
            )
        if n_docs > 0 and bool(np.any(np.diff(self.offsets) < 0)):
            bad = int(np.argmax(np.diff(self.offsets) < 0))
            raise ShardError(
                self.path,
                f"offsets are not monotone: offsets[{bad}]={int(self.offsets[bad])} > "
                f"offsets[{bad + 1}]={int(self.offsets[bad + 1])}",
            )

    def _read_meta(self) -> dict:
        if not self.path.is_dir():
            raise ShardError(self.path, "no such shard directory")
        meta_path = self.path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ShardError(self.path, f"missing {META_FILE}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShardError(self.path, f"{META_FILE} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
            raise ShardError(self.path, f"{META_FILE} is not a {SHARD_FORMAT} file")
        if meta.get("version") != SHARD_VERSION:
            raise ShardError(
                self.path, f"{META_FILE} has version {meta.get('version')!r}, this code reads {SHARD_VERSION}"
            )
        for key in ("dtype", "n_tokens", "n_docs", "vocab_size"):
            if key not in meta:
                raise ShardError(self.path, f"{META_FILE} lacks the key {key!r}")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise ShardError(self.path, f"{META_FILE}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
        for key in ("n_tokens", "n_docs", "vocab_size"):
            if not isinstance(meta[key], int) or meta[key] < 0:
                raise ShardError(self.path, f"{META_FILE}: {key} must be an integer >= 0, got {meta[key]!r}")
        return meta

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: os.PathLike | str) -> TokenShard:
        return cls(path)

    @classmethod
    def write(
        cls,
        path: os.PathLike | str,
        docs: Iterable[Iterable[int] | np.ndarray],
        vocab_size: int,
        extra_meta: dict | None = None,
    ) -> TokenShard:
        """Write documents (sequences of token ids) as a shard at ``path`` (atomic) and open it."""
        with ShardWriter(path, vocab_size, extra_meta) as w:
            for doc in docs:
                w.add(doc)
        return cls(path)

    # -- access ----------------------------------------------------------------------------------
    @property
    def num_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view into the mapped file)."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document index {i} out of range for {self.num_docs} documents")
        i %= self.num_docs
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def doc_mask(self, i: int) -> np.ndarray | None:
        """Loss mask of document ``i`` (uint8 view), or None when the shard has no mask."""
        if self.mask is None:
            return None
        i %= self.num_docs
        return self.mask[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    def release_pages(self) -> None:
        """Drop this process's mapped pages (MADV_DONTNEED; the OS page cache keeps them, a later read maps
        them again). Bounds resident memory while streaming a shard larger than the budget."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mm in (self._tokens_mm, self._offsets_mm, self._mask_mm):
                if mm is not None:
                    mm.madvise(mmap.MADV_DONTNEED)

    def fileno(self) -> int:
        """A read-only descriptor of ``tokens.bin`` (opened on first use, closed with the shard): for
        ``pread`` access that maps nothing (the C++ sampler's mode for shards beyond the page budget)."""
        if self._fd is None:
            self._fd = os.open(self.path / TOKENS_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return (
            f"TokenShard({str(self.path)!r}, n_docs={self.num_docs}, n_tokens={self.num_tokens}, "
            f"dtype={self.dtype.name})"
        )


class ShardWriter:
    """Streaming, atomic shard writer: ``with ShardWriter(dir, vocab) as w: w.add(ids)``.

    Tokens are appended to ``<dir>.tmp-<pid>/tokens.bin`` as they come (nothing held in memory but the
    offsets); on a clean exit the temp directory is renamed to ``dir`` (replacing an older shard there).
    On an exception the temp directory is removed. A shard has a loss mask (``mask.bin``) when its first
    document comes with one; then every document must.
    """

    def __init__(self, path: os.PathLike | str, vocab_size: int, extra_meta: dict | None = None):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.extra_meta = dict(extra_meta or {})
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}"
        # offsets are kept as numpy chunks (8 bytes per document, not a python int each)
        self._offset_chunks: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._pending: list[int] = []
        self._n_tokens = 0
        self._f = None
        self._mask_f = None
        self._masked: bool | None = None  # decided by the first document

    def __enter__(self) -> ShardWriter:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._f = open(self.tmp / TOKENS_FILE, "wb")
        return self

    def _write_mask(self, mask, n: int) -> None:
        masked = mask is not None
        if self._masked is None:
            self._masked = masked
            if masked:
                self._mask_f = open(self.tmp / MASK_FILE, "wb")
        if masked != self._masked:
            raise ValueError("a shard's documents must all have a loss mask, or none")
        if masked:
            m = np.asarray(mask)
            if m.shape != (n,):
                raise ValueError(f"a loss mask must have one entry per token ({n}), got shape {m.shape}")
            self._mask_f.write((m != 0).astype(np.uint8).tobytes())

    def add(self, ids: Iterable[int] | np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one document; ``mask`` (optional, one 0/1 per token): which tokens are counted labels."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got [{int(arr.min())}, {int(arr.max())}]"
            )
        self._write_mask(mask, int(arr.size))
        self._f.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._n_tokens += int(arr.size)
        self._pending.append(self._n_tokens)
        if len(self._pending) >= 65536:
            self._flush_offsets()

    def _flush_offsets(self) -> None:
        if self._pending:
            self._offset_chunks.append(np.asarray(self._pending, dtype=np.int64))
            self._pending = []

    def add_block(self, tokens: np.ndarray, doc_lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append many documents at once: ``tokens`` concatenated, ``doc_lengths`` per document (``mask``:
        their loss masks, concatenated)."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        if tokens.ndim != 1 or lengths.ndim != 1 or int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError("add_block: doc_lengths must be >= 0 and sum to len(tokens)")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        self._write_mask(mask, int(tokens.size))
        self._f.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._flush_offsets()
        self._offset_chunks.append(self._n_tokens + np.cumsum(lengths))
        self._n_tokens += int(tokens.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if self._mask_f is not None:
            self._mask_f.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self._flush_offsets()
        offsets = np.concatenate(self._offset_chunks).astype("<i8", copy=False)
        offsets.tofile(self.tmp / OFFSETS_FILE)
        meta = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "dtype": self.dtype.name,
            "n_tokens": self._n_tokens,
            "n_docs": int(offsets.size) - 1,
            "vocab_size": self.vocab_size,
            **({"mask": True} if self._masked else {}),
            **self.extra_meta,
        }
        (self.tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
