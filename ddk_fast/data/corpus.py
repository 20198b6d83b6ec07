"""Corpus preparation: local files per domain -> tokenised, cached train/validation token shards.

``prepare_domains`` reads each domain's files with ``datasets.load_dataset`` (offline; format from the
extension: ``.jsonl``/``.json`` -> json, ``.parquet`` -> parquet, ``.txt`` -> text, one document per line,
field ``"text"`` whatever ``text_field`` says), tokenises every document once without special tokens (the
sampler inserts the separator), drops empty documents, and holds out two fixed splits per domain, drawn
from one seeded permutation of the documents: ``val`` (what DDK steers on) takes whole documents until it
holds ``val_sequences * (seq_len + 1)`` tokens (separators included), then ``test`` (reported only) takes the
next documents until ``test_sequences * (seq_len + 1)``. The three splits are disjoint sets of documents;
the rest is the training shard.

Shards are cached under ``cache_dir/<domain>-<key>/{train,val,test}``. The key hashes everything the content
depends on: the tokenizer (its ``tokenizer.json`` serialisation, or sorted vocabulary, plus the special
tokens), the *bytes* of every file (size and mtime are not enough), the file formats, ``text_field``,
``seed``, ``seq_len``, ``val_sequences``, ``test_sequences`` and ``FORMAT_VERSION``. A second run with
the same inputs reuses the shards ("reusing cached shards" in the log); any change builds new ones. A domain
directory is built under a temporary name and renamed when complete, so an interrupted run never leaves a
partial cache.

Errors are :class:`~ddk_fast.errors.ConfigError` with the path ``data.domains[i].<field>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .packing import fill_from_stream, stream_cumsum
from .shards import ShardError, ShardWriter, TokenShard

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: a test split beside val
EXTENSION_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_TOKENIZE_BATCH = 1000
_PROGRESS_MIN_DOCS = 20000


@dataclass(frozen=True)
class PreparedDomain:
    """A domain's cached shards; ``reused`` says whether they came from the cache."""

    name: str
    train: TokenShard
    val: TokenShard
    test: TokenShard
    cache_dir: Path
    reused: bool = False


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the tokenizer.json serialisation (or vocabulary) and specials."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):  # a raw tokenizers.Tokenizer
        backend = tokenizer
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = getattr(tokenizer, "special_tokens_map", None)
    if specials is not None:
        h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_vocab_size(tokenizer) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # raw tokenizers.Tokenizer
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return int(len(tokenizer))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # raw tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_files(i: int, files: Sequence[str]) -> list[tuple[Path, str]]:
    path = f"data.domains[{i}].files"
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ConfigError(path, list(files), "at least one data file (.jsonl, .json, .parquet or .txt)")
    out = []
    for f in files:
        p = Path(f)
        fmt = EXTENSION_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ConfigError(path, str(f), f"a file ending in one of {sorted(EXTENSION_FORMATS)}")
        if not p.is_file():
            raise ConfigError(path, str(f), "an existing file", hint=f"{f} does not exist")
        out.append((p, fmt))
    return out


def _cache_key(tokenizer_fp: str, files: list[tuple[Path, str]], text_field: str, **params) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fp,
        "files": [[file_sha256(p), fmt] for p, fmt in files],
        "text_field": text_field,
        **params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _iter_documents(i: int, files, text_field: str, hf_cache: Path, num_proc: int | None):
    """Yield (file, dataset, field) per file, after checking the text field exists."""
    import datasets

    for p, fmt in files:
        field = "text" if fmt == "text" else text_field
        try:
            ds = datasets.load_dataset(
                fmt, data_files=str(p), split="train", cache_dir=str(hf_cache), num_proc=num_proc
            )
        except Exception as exc:
            raise ConfigError(
                f"data.domains[{i}].files",
                str(p),
                f"a readable {fmt} file",
                hint=f"{type(exc).__name__}: {exc}",
            ) from exc
        if field not in ds.column_names:
            raise ConfigError(
                f"data.domains[{i}].text_field",
                text_field,
                f"a field of the data; {p} has fields {ds.column_names}",
            )
        yield p, ds, field


def _tokenise_domain(
    i, name, files, text_field, tokenizer, vocab_size, out_dir, hf_cache, num_proc
) -> TokenShard:
    from tqdm.auto import tqdm

    with ShardWriter(out_dir, vocab_size, {"domain": name, "split": "all"}) as w:
        for p, ds, field in _iter_documents(i, files, text_field, hf_cache, num_proc):
            n = len(ds)
            with tqdm(
                total=n, desc=f"tokenising {name} ({p.name})", unit="doc", disable=n < _PROGRESS_MIN_DOCS
            ) as bar:
                for start in range(0, n, _TOKENIZE_BATCH):
                    col = ds[start : start + _TOKENIZE_BATCH][field]
                    texts = [t for t in col if isinstance(t, str) and t]
                    if texts:
                        for ids in _encode(tokenizer, texts):
                            if ids:
                                w.add(np.asarray(ids, dtype=np.int64))
                    bar.update(len(col))
    return TokenShard.open(out_dir)


def _copy_docs(src: TokenShard, docs: np.ndarray, out_dir: Path, extra_meta: dict) -> TokenShard:
    with ShardWriter(out_dir, src.vocab_size, extra_meta) as w:
        for a in range(0, docs.size, 4096):  # blocks of documents: bounded memory, few python calls
            block = docs[a : a + 4096]
            starts, ends = src.offsets[block], src.offsets[block + 1]
            lens = ends - starts
            # gather indices of all documents of the block: start of each doc repeated over its length
            idx = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(
                starts - (np.cumsum(lens) - lens), lens
            )
            w.add_block(src.tokens[idx], lens)
    return TokenShard.open(out_dir)


def _split(
    i: int, all_shard: TokenShard, *, seq_len: int, val_sequences: int, test_sequences: int, seed: int
):
    """Seeded whole-document selection: (val docs, test docs, train docs), each in stored order.

    One permutation of the documents; val takes a prefix covering ``val_sequences * (seq_len + 1)`` tokens
    (separators counted), test the following documents covering ``test_sequences * (seq_len + 1)``."""
    lengths = all_shard.doc_lengths()
    need_val, need_test = val_sequences * (seq_len + 1), test_sequences * (seq_len + 1)
    found = int(lengths.sum()) + lengths.size  # tokens + one separator per document
    order = np.random.default_rng(seed).permutation(lengths.size)
    cum = np.cumsum(lengths[order] + 1)
    n_val = int(np.searchsorted(cum, need_val)) + 1 if need_val > 0 else 0
    done_val = int(cum[min(n_val, cum.size) - 1]) if n_val else 0
    n_test = int(np.searchsorted(cum, done_val + need_test)) + 1 - n_val if need_test > 0 else 0
    if n_val + n_test >= lengths.size:
        need = need_val + need_test
        raise ConfigError(
            f"data.domains[{i}].files",
            f"{found} tokens in {lengths.size} documents",
            f"enough text for a validation split of {need_val} tokens (val_sequences={val_sequences} x "
            f"(seq_len+1)={seq_len + 1}) and a test split of {need_test} tokens (test_sequences="
            f"{test_sequences}), whole documents, separators counted, plus at least one training document",
            hint=f"needs more than {need} tokens, found {found}; add data or lower "
            "val_sequences/test_sequences/seq_len",
        )
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return np.sort(val), np.sort(test), np.sort(train)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "domain"


def prepare_domains(
    domains: Sequence,
    tokenizer,
    cache_dir: os.PathLike | str,
    *,
    seq_len: int,
    val_sequences: int,
    test_sequences: int | None = None,
    seed: int = 0,
    num_proc: int | None = None,
) -> list[PreparedDomain]:
    """Tokenise (or reuse from ``cache_dir``) every domain into train/val/test :class:`TokenShard` s.

    Args:
        domains: ``DomainConfig``-like objects (``name``, ``files``, ``text_field``), in config order.
        tokenizer: a Hugging Face tokenizer (or a raw ``tokenizers.Tokenizer``).
        cache_dir: where shards are cached (created if needed).
        seq_len: training sequence length (sizes the validation split).
        val_sequences: validation sequences per domain (>= 0).
        test_sequences: test sequences per domain (>= 0); None = ``val_sequences``.
        seed: seed of the val/test document selection.
        num_proc: passed to ``datasets.load_dataset``; fast tokenizers already encode batches in parallel.

    Returns:
        One :class:`PreparedDomain` per domain, in order.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("data.seq_len", seq_len, "an integer >= 1")
    if not isinstance(val_sequences, int) or val_sequences < 0:
        raise ConfigError("data.val_sequences", val_sequences, "an integer >= 0")
    if test_sequences is None:
        test_sequences = val_sequences
    if not isinstance(test_sequences, int) or test_sequences < 0:
        raise ConfigError("data.test_sequences", test_sequences, "an integer >= 0")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hf_cache = cache / "hf_datasets"
    tok_fp = tokenizer_fingerprint(tokenizer)
    vocab_size = tokenizer_vocab_size(tokenizer)
    checked = [_check_files(i, d.files) for i, d in enumerate(domains)]  # all paths first: fail fast
    out = []
    for i, (dom, files) in enumerate(zip(domains, checked)):
        key = _cache_key(
            tok_fp,
            files,
            dom.text_field,
            seed=seed,
            seq_len=seq_len,
            val_sequences=val_sequences,
            test_sequences=test_sequences,
        )
        final = cache / f"{_safe(dom.name)}-{key}"
        if final.is_dir():
            try:
                prepared = PreparedDomain(dom.name, *_open_splits(final), final, True)
                logger.info("domain %s: reusing cached shards in %s", dom.name, final)
                out.append(prepared)
                continue
            except ShardError as exc:
                logger.warning("domain %s: cached shards are unusable (%s); rebuilding", dom.name, exc)
                shutil.rmtree(final, ignore_errors=True)
        tmp = cache / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            all_shard = _tokenise_domain(
                i, dom.name, files, dom.text_field, tokenizer, vocab_size, tmp / "all", hf_cache, num_proc
            )
            if all_shard.num_docs == 0:
                raise ConfigError(
                    f"data.domains[{i}].files",
                    [str(p) for p, _ in files],
                    f"files with non-empty text in field {dom.text_field!r}",
                    hint=f"domain {dom.name!r} has no text that tokenises to any token",
                )
            val_docs, test_docs, train_docs = _split(
                i,
                all_shard,
                seq_len=seq_len,
                val_sequences=val_sequences,
                test_sequences=test_sequences,
                seed=seed,
            )
            meta = {"domain": dom.name, "cache_key": key, "tokenizer": tok_fp}
            _copy_docs(all_shard, train_docs, tmp / "train", {**meta, "split": "train"})
            _copy_docs(all_shard, val_docs, tmp / "val", {**meta, "split": "val"})
            _copy_docs(all_shard, test_docs, tmp / "test", {**meta, "split": "test"})
            del all_shard
            shutil.rmtree(tmp / "all")
            try:
                os.rename(tmp, final)
            except OSError:  # another process (rank) finished the same shards first: use theirs
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        train, val, test = _open_splits(final)
        logger.info(
            "domain %s: %d train tokens (%d docs), %d val tokens (%d docs), %d test tokens (%d docs) -> %s",
            dom.name, train.num_tokens, train.num_docs, val.num_tokens, val.num_docs, test.num_tokens,
            test.num_docs, final,
        )  # fmt: skip
        out.append(PreparedDomain(dom.name, train, val, test, final, False))
    return out


def _open_splits(folder: Path) -> tuple[TokenShard, TokenShard, TokenShard]:
    return tuple(TokenShard.open(folder / split) for split in ("train", "val", "test"))


def validation_batches(
    val_shard: TokenShard, seq_len: int, num_sequences: int, sep_token_id: int, domain_id: int
) -> dict[str, np.ndarray]:
    """The fixed validation set of one domain: ``input_ids``, ``labels``, ``domain_ids`` int64
    ``[num_sequences, seq_len]``, identical on every call.

    Same packing as training (documents in stored order, a separator after each, sequence k = stream
    tokens ``[k * seq_len, k * seq_len + seq_len + 1)``) without shuffling; wraps around if the split is
    shorter than ``num_sequences`` sequences (prepare_domains sizes it so that it never is).
    """
    if val_shard.num_docs == 0:
        raise ValueError(f"validation shard {val_shard.path} has no documents")
    order = np.arange(val_shard.num_docs, dtype=np.int64)
    cum = stream_cumsum(val_shard.offsets, order)
    stream_len = int(cum[-1])
    out = np.empty((num_sequences, seq_len + 1), dtype=np.int64)
    for k in range(num_sequences):
        fill_from_stream(
            val_shard.tokens,
            val_shard.offsets,
            lambda e: (order, cum),
            stream_len,
            k * seq_len,
            out[k],
            sep_token_id,
        )
    return {
        "input_ids": np.ascontiguousarray(out[:, :-1]),
        "labels": np.ascontiguousarray(out[:, 1:]),
        "domain_ids": np.full((num_sequences, seq_len), domain_id, dtype=np.int64),
    }
