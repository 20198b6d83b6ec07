"""Corpus preparation: local files per domain -> tokenised, cached train/validation token shards.

``prepare_domains`` reads each domain's files (``.jsonl`` and ``.txt`` line by line, so a bad record has a
line number; ``.json`` and ``.parquet`` with ``datasets.load_dataset``, offline; ``.txt`` is one document per
non-blank line, field ``"text"`` whatever ``text_field`` says), tokenises every document once without
special tokens (the sampler inserts the separator), counts bad records per file (no string ``text_field``,
empty, undecodable: :class:`FileFaults`, logged; above ``max_bad_records`` a ConfigError names
``file:line`` of the first; the counts are cached in ``faults.json`` and checked again on reuse), and holds
out two fixed splits per domain, drawn
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

import dataclasses
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

FORMAT_VERSION = 3  # 2: a test split beside val; 3: faults.json (bad-record counts) per domain
EXTENSION_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_TOKENIZE_BATCH = 1000
FAULTS_FILE = "faults.json"
_PROGRESS_MIN_BYTES = 8 << 20  # a progress bar for files from 8 MB


@dataclass(frozen=True)
class PreparedDomain:
    """A domain's cached shards; ``reused`` says whether they came from the cache."""

    name: str
    train: TokenShard
    val: TokenShard
    test: TokenShard
    cache_dir: Path
    reused: bool = False
    faults: tuple[FileFaults, ...] = ()


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


@dataclass
class FileFaults:
    """Bad records of one file: without the text field (or not a string), empty, undecodable."""

    path: str
    records: int = 0
    missing_field: int = 0
    empty: int = 0
    undecodable: int = 0
    first: str | None = None  # "file:line: what is wrong" of the first bad record

    @property
    def bad(self) -> int:
        return self.missing_field + self.empty + self.undecodable

    def note(self, kind: str, where: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if self.first is None:
            self.first = f"{where}: {what}"

    def summary(self, text_field: str) -> str:
        parts = [
            f"{n} {label}"
            for n, label in (
                (self.missing_field, f"without a string field {text_field!r}"),
                (self.empty, "empty"),
                (self.undecodable, "undecodable"),
            )
            if n
        ]
        what = ", ".join(parts)
        return f"{self.bad} of {self.records} records bad in {self.path} ({what}; first: {self.first})"


def _read_lines(p: Path, fmt: str, field: str, faults: FileFaults):
    """.jsonl / .txt read line by line, so a bad record has a line number: yields (where, text)."""
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            if fmt == "text":
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue  # a blank line separates documents in a .txt file: not a record
                faults.records += 1
                try:
                    yield where, line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    faults.note("undecodable", where, f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not raw.strip():
                continue  # blank line between JSON records
            faults.records += 1
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                faults.note("undecodable", where, f"not a JSON record ({str(exc)[:80]})")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = (
                    f"no field {field!r}"
                    if not isinstance(record, dict) or field not in record
                    else (f"field {field!r} is {type(text).__name__}, not a string")
                )
                faults.note("missing_field", where, what)
                continue
            yield where, text


def _read_table(i: int, p: Path, fmt: str, field: str, faults: FileFaults, hf_cache: Path, num_proc):
    """.json / .parquet through ``datasets``: yields (file:record, text)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            fmt, data_files=str(p), split="train", cache_dir=str(hf_cache), num_proc=num_proc
        )
    except Exception as exc:
        raise ConfigError(
            f"data.domains[{i}].files", str(p), f"a readable {fmt} file", hint=f"{type(exc).__name__}: {exc}"
        ) from exc
    if field not in ds.column_names:
        raise ConfigError(
            f"data.domains[{i}].text_field", field, f"a field of the data; {p} has fields {ds.column_names}"
        )
    for start in range(0, len(ds), _TOKENIZE_BATCH):
        for j, text in enumerate(ds[start : start + _TOKENIZE_BATCH][field], start + 1):
            faults.records += 1
            if not isinstance(text, str):
                faults.note("missing_field", f"{p}:record {j}", f"field {field!r} is {text!r:.40}")
                continue
            yield f"{p}:record {j}", text


def _records(i: int, p: Path, fmt: str, text_field: str, faults: FileFaults, hf_cache: Path, num_proc):
    field = "text" if fmt == "text" else text_field
    if p.suffix.lower() in (".jsonl", ".txt"):
        yield from _read_lines(p, fmt, field, faults)
        if faults.records and faults.missing_field == faults.records:  # the field is nowhere: a config error
            raise ConfigError(
                f"data.domains[{i}].text_field", text_field, f"a field of the data; {faults.first}"
            )
    else:
        yield from _read_table(i, p, fmt, field, faults, hf_cache, num_proc)


def _add_batch(w: ShardWriter, tokenizer, batch: list[tuple[str, str]], faults: FileFaults) -> None:
    """Tokenise a batch of (where, text) and append the non-empty documents to the shard."""
    if not batch:
        return
    for (where, _), ids in zip(batch, _encode(tokenizer, [t for _, t in batch])):
        if ids:
            w.add(np.asarray(ids, dtype=np.int64))
        else:
            faults.note("empty", where, "no text (tokenises to nothing)")


def _tokenise_domain(
    i, name, files, text_field, tokenizer, vocab_size, out_dir, hf_cache, num_proc
) -> tuple[TokenShard, list[FileFaults]]:
    from tqdm.auto import tqdm

    report = []
    with ShardWriter(out_dir, vocab_size, {"domain": name, "split": "all"}) as w:
        for p, fmt in files:
            faults = FileFaults(str(p))
            report.append(faults)
            batch: list[tuple[str, str]] = []
            big = p.stat().st_size >= _PROGRESS_MIN_BYTES
            with tqdm(desc=f"tokenising {name} ({p.name})", unit="doc", disable=not big) as bar:
                for where, text in _records(i, p, fmt, text_field, faults, hf_cache, num_proc):
                    batch.append((where, text))
                    if len(batch) >= _TOKENIZE_BATCH:
                        _add_batch(w, tokenizer, batch, faults)
                        bar.update(len(batch))
                        batch = []
                _add_batch(w, tokenizer, batch, faults)
    return TokenShard.open(out_dir), report


def _load_faults(folder: Path) -> list[FileFaults]:
    try:
        return [FileFaults(**f) for f in json.loads((folder / FAULTS_FILE).read_text())]
    except (OSError, ValueError, TypeError) as exc:
        raise ShardError(f"{folder / FAULTS_FILE}: missing or unreadable ({exc})") from None


def check_faults(i: int, report: list[FileFaults], text_field: str, max_bad_records: float) -> None:
    """Log every file with bad records; raise ConfigError when one has more than ``max_bad_records``."""
    for faults in report:
        if not faults.bad:
            continue
        if faults.bad > max_bad_records * faults.records:
            raise ConfigError(
                f"data.domains[{i}].files",
                faults.first,
                f"at most [data] max_bad_records = {max_bad_records} of a file's records bad",
                hint=f"{faults.summary(text_field)}; fix the data, or raise max_bad_records to skip them",
            )
        logger.warning("domain %d: skipped %s", i, faults.summary(text_field))


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
    max_bad_records: float = 0.0,
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
        max_bad_records: fraction of a file's records that may be bad (no text field, empty, undecodable)
            and are skipped with a warning; above it ConfigError names ``file:line`` of the first. The
            counts are stored with the shards and checked again when they are reused.

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
                report = _load_faults(final)
                prepared = PreparedDomain(dom.name, *_open_splits(final), final, True, tuple(report))
                check_faults(i, report, dom.text_field, max_bad_records)
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
            all_shard, report = _tokenise_domain(
                i, dom.name, files, dom.text_field, tokenizer, vocab_size, tmp / "all", hf_cache, num_proc
            )
            if all_shard.num_docs == 0:
                raise ConfigError(
                    f"data.domains[{i}].files",
                    [str(p) for p, _ in files],
                    f"files with non-empty text in field {dom.text_field!r}",
                    hint=f"domain {dom.name!r} has no text that tokenises to any token",
                )
            check_faults(i, report, dom.text_field, max_bad_records)
            (tmp / FAULTS_FILE).write_text(json.dumps([dataclasses.asdict(f) for f in report]) + "\n")
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
        out.append(PreparedDomain(dom.name, train, val, test, final, False, tuple(report)))
    return out


def prepare_config_domains(data_cfg, tokenizer) -> list[PreparedDomain]:
    """:func:`prepare_domains` with every setting taken from a ``[data]`` section (:class:`DataConfig`)."""
    d = data_cfg
    return prepare_domains(
        d.domains,
        tokenizer,
        d.cache_dir,
        seq_len=d.seq_len,
        val_sequences=d.val_sequences,
        test_sequences=d.num_test_sequences,
        seed=d.split_seed,
        max_bad_records=d.max_bad_records,
    )


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
