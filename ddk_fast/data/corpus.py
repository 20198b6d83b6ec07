"""Corpus preparation: local files per domain -> tokenised, cached train/validation token shards.

``prepare_domains`` expands each domain's ``files`` (globs, sorted), reads them into records
(``records.py``: text, chat or prompt/completion records; ``.txt`` split by ``text_unit``), tokenises every
document once without special tokens (the sampler inserts the separator) -- chat and prompt/completion
examples with their loss mask, packed whole into blocks of ``seq_len - 1`` tokens (``examples.py``) --
counts bad records per file (no usable field, empty, undecodable: :class:`FileFaults`, logged; above
``max_bad_records`` a ConfigError names ``file:line`` of the first; the counts are cached in
``faults.json`` and checked again on reuse), and holds out two fixed splits per domain, drawn
from one seeded permutation of the documents: ``val`` (what DDK steers on) takes whole documents until it
holds ``val_sequences * (seq_len + 1)`` tokens (separators included), then ``test`` (reported only) takes the
next documents until ``test_sequences * (seq_len + 1)``. The three splits are disjoint sets of documents;
the rest is the training shard. A domain with ``val_files`` and ``test_files`` takes val and test from those
files instead (their first documents, in file order, until the same token counts) and trains on every
document of ``files``: held-out files that the teacher and the tokenizer never read.

Shards are cached under ``cache_dir/<domain>-<key>/{train,val,test}``. The key hashes everything the content
depends on: the tokenizer (its ``tokenizer.json`` serialisation, or sorted vocabulary, plus the special
tokens), the *bytes* of every file (size and mtime are not enough), the file formats, ``text_field``,
``format``, ``text_unit`` (and for records that may be chat: the chat template, ``loss_on``,
``long_examples``, the pad id), ``seed``, ``seq_len``, ``val_sequences``, ``test_sequences`` and
``FORMAT_VERSION``. A second run with
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

from ..config import expand_data_files
from ..errors import ConfigError
from .examples import BlockPacker, ExampleEncoder
from .packing import fill_from_stream, stream_cumsum
from .records import FileFaults, read_records
from .shards import ShardError, ShardWriter, TokenShard

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 2: a test split beside val; 3: faults.json per domain; 4: chat data, masks, text_unit
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
    for spec, matches in expand_data_files([str(f) for f in files]):
        if not matches:
            raise ConfigError(path, spec, "a glob that matches at least one file", f"from {Path.cwd()}")
        for f in matches:
            out.append(_check_file(path, f))
    return out


def _check_file(path: str, f: str) -> tuple[Path, str]:
    p = Path(f)
    fmt = EXTENSION_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError(path, str(f), f"a file ending in one of {sorted(EXTENSION_FORMATS)}")
    if not p.is_file():
        raise ConfigError(path, str(f), "an existing file", hint=f"{f} does not exist")
    return p, fmt


def _cache_key(tokenizer_fp: str, files: list[tuple[Path, str]], text_field: str, **params) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fp,
        "files": [[file_sha256(p), fmt] for p, fmt in files],
        "text_field": text_field,
        **params,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _add_batch(w: ShardWriter, tokenizer, batch: list[tuple[str, str]], faults: FileFaults) -> None:
    """Tokenise a batch of (where, text) and append the non-empty documents to the shard."""
    if not batch:
        return
    for (where, _), ids in zip(batch, _encode(tokenizer, [t for _, t in batch])):
        if ids:
            w.add(np.asarray(ids, dtype=np.int64))
        else:
            faults.note("empty", where, "no text (tokenises to nothing)")


def _add_examples(encoder: ExampleEncoder, packer: BlockPacker, batch: list, faults: FileFaults) -> None:
    """Encode a batch of chat / prompt-completion records and pack them (examples.py)."""
    if not batch:
        return
    for (where, _), (ids, mask) in zip(batch, encoder.encode(faults.format, [v for _, v in batch])):
        if not ids or not any(mask):
            what = "no tokens" if not ids else "no assistant / completion token to train on"
            faults.note("empty", where, what)
            continue
        packer.add(ids, mask, faults)


@dataclass(frozen=True)
class ExampleSettings:
    """How chat / prompt-completion records become training examples (``[data]`` keys)."""

    chat_template: str | None = None  # None: the tokenizer's own
    loss_on: str = "completion"
    long_examples: str = "truncate"

    def key(self, tokenizer) -> dict:
        template = self.chat_template or getattr(tokenizer, "chat_template", None) or ""
        pad = getattr(tokenizer, "pad_token_id", None)
        return {
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
            "loss_on": self.loss_on,
            "long_examples": self.long_examples,
            "pad": pad,
        }


def _tokenise_domain(
    i, dom, files, tokenizer, vocab_size, out_dir, hf_cache, num_proc, seq_len, examples: ExampleSettings
) -> tuple[TokenShard, list[FileFaults]]:
    from tqdm.auto import tqdm

    report: list[FileFaults] = []
    first: FileFaults | None = None  # the file that set the domain's format
    encoder = packer = None
    with ShardWriter(out_dir, vocab_size, {"domain": dom.name, "split": "all"}) as w:

        def flush(batch: list, faults: FileFaults) -> None:
            nonlocal first, encoder, packer
            if not batch:
                return
            if first is None:
                first = faults
            elif faults.format != first.format:
                raise ConfigError(
                    f"data.domains[{i}].files",
                    faults.path,
                    f"files of one format per domain ({first.path} is {first.format})",
                    f"{faults.path} is {faults.format}",
                )
            if faults.format == "text":
                _add_batch(w, tokenizer, batch, faults)
                return
            if encoder is None:
                encoder = ExampleEncoder(tokenizer, examples.chat_template, examples.loss_on, i, dom.name)
                pad = getattr(tokenizer, "pad_token_id", None)
                packer = BlockPacker(seq_len - 1, tokenizer.eos_token_id if pad is None else pad,
                                     examples.long_examples, lambda ids, m: w.add(ids, m))  # fmt: skip
            _add_examples(encoder, packer, batch, faults)

        for p, fmt in files:
            faults = FileFaults(str(p))
            report.append(faults)
            batch: list = []
            big = p.stat().st_size >= _PROGRESS_MIN_BYTES
            with tqdm(desc=f"tokenising {dom.name} ({p.name})", unit="doc", disable=not big) as bar:
                for where, value in read_records(i, p, fmt, dom, faults, hf_cache, num_proc):
                    batch.append((where, value))
                    if len(batch) >= _TOKENIZE_BATCH:
                        flush(batch, faults)
                        bar.update(len(batch))
                        batch = []
                flush(batch, faults)
        if packer is not None:
            packer.flush()
            n = packer.blocks * packer.block_len
            kept = sum(f.records - f.bad - f.dropped_long for f in report)
            logger.info(
                "domain %s: %d %s examples packed whole into %d sequences of %d tokens, %.1f %% padding; "
                "%d truncated, %d dropped (longer than %d tokens)",
                dom.name, kept, first.format, packer.blocks, seq_len, 100 * packer.padding / max(n, 1),
                sum(f.truncated for f in report), sum(f.dropped_long for f in report), seq_len - 1,
            )  # fmt: skip
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
            w.add_block(src.tokens[idx], lens, None if src.mask is None else src.mask[idx])
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


def _prefix(i: int, key: str, shard: TokenShard, need: int, what: str) -> np.ndarray:
    """The first documents of a held-out shard (file order) covering ``need`` tokens, separators counted."""
    if need == 0:
        return np.arange(0, dtype=np.int64)
    cum = np.cumsum(shard.doc_lengths() + 1)
    if cum.size == 0 or cum[-1] < need:
        found = int(cum[-1]) if cum.size else 0
        raise ConfigError(
            f"data.domains[{i}].{key}", f"{found} tokens in {cum.size} documents",
            f"enough text for a {what} split of {need} tokens (separators counted)",
            hint=f"add held-out documents or lower {what}_sequences/seq_len",
        )  # fmt: skip
    return np.arange(int(np.searchsorted(cum, need)) + 1, dtype=np.int64)


def _held_files(i: int, dom) -> tuple[list, list] | None:
    """(val files, test files) of a domain that names its held-out files, else None."""
    val, test = getattr(dom, "val_files", None) or [], getattr(dom, "test_files", None) or []
    if not val and not test:
        return None
    if not val or not test:
        key = "test_files" if val else "val_files"
        raise ConfigError(f"data.domains[{i}].{key}", [], "set together with val_files / test_files")
    return _check_files(i, val), _check_files(i, test)


def _txt_hint(exc: ConfigError, dom, files) -> ConfigError:
    """A split that needs more documents than .txt files of one document each give: say so."""
    if getattr(dom, "text_unit", "file") != "file" or not any(kind == "text" for _, kind in files):
        return exc
    more = 'each .txt file is one document (text_unit = "file"): set text_unit = "paragraph" or "line"'
    return ConfigError(exc.path, exc.value, exc.expected, f"{exc.hint}; {more}" if exc.hint else more)


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
    examples: ExampleSettings | None = None,
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
        examples: chat template, ``loss_on`` and ``long_examples`` for chat / prompt-completion records
            (default: the tokenizer's template, completion tokens, truncate).

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
    examples = examples or ExampleSettings()
    checked = [_check_files(i, d.files) for i, d in enumerate(domains)]  # all paths first: fail fast
    held_out = [_held_files(i, d) for i, d in enumerate(domains)]
    out = []
    for i, (dom, files, held) in enumerate(zip(domains, checked, held_out)):
        fmt, unit = getattr(dom, "format", "auto"), getattr(dom, "text_unit", "file")
        may_chat = fmt != "text" and any(kind != "text" for _, kind in files)
        if held:
            may_chat = may_chat or (fmt != "text" and any(k != "text" for f in held for _, k in f))
        held_key = {"held_out": [[[file_sha256(p), k] for p, k in f] for f in held]} if held else {}
        key = _cache_key(
            tok_fp,
            files,
            dom.text_field,
            seed=seed,
            seq_len=seq_len,
            val_sequences=val_sequences,
            test_sequences=test_sequences,
            format=fmt,
            text_unit=unit,
            **held_key,
            **(examples.key(tokenizer) if may_chat else {}),
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
                i, dom, files, tokenizer, vocab_size, tmp / "all", hf_cache, num_proc, seq_len, examples
            )
            if all_shard.num_docs == 0:
                raise ConfigError(
                    f"data.domains[{i}].files",
                    [str(p) for p, _ in files],
                    f"files with non-empty text in field {dom.text_field!r}",
                    hint=f"domain {dom.name!r} has no text that tokenises to any token",
                )
            check_faults(i, report, dom.text_field, max_bad_records)
            sources = {"train": all_shard, "val": all_shard, "test": all_shard}
            if held:  # val and test from their own files; every document of `files` trains
                for split, split_files, need in (
                    ("val", held[0], val_sequences * (seq_len + 1)),
                    ("test", held[1], test_sequences * (seq_len + 1)),
                ):
                    shard, more = _tokenise_domain(
                        i, dom, split_files, tokenizer, vocab_size, tmp / f"{split}_all", hf_cache, num_proc,
                        seq_len, examples,
                    )  # fmt: skip
                    check_faults(i, more, dom.text_field, max_bad_records)
                    report += more
                    sources[split] = shard
                    docs = _prefix(i, f"{split}_files", shard, need, split)
                    if split == "val":
                        val_docs = docs
                    else:
                        test_docs = docs
                train_docs = np.arange(all_shard.num_docs, dtype=np.int64)
            else:
                try:
                    val_docs, test_docs, train_docs = _split(
                        i,
                        all_shard,
                        seq_len=seq_len,
                        val_sequences=val_sequences,
                        test_sequences=test_sequences,
                        seed=seed,
                    )
                except ConfigError as exc:
                    raise _txt_hint(exc, dom, files) from None
            (tmp / FAULTS_FILE).write_text(json.dumps([dataclasses.asdict(f) for f in report]) + "\n")
            meta = {"domain": dom.name, "cache_key": key, "tokenizer": tok_fp}
            if all_shard.mask is not None:  # examples packed whole into seq_len - 1 token blocks
                meta["packed_seq_len"] = seq_len
            for split, docs in (("train", train_docs), ("val", val_docs), ("test", test_docs)):
                _copy_docs(sources[split], docs, tmp / split, {**meta, "split": split})
            del all_shard, sources
            for sub in ("all", "val_all", "test_all"):
                shutil.rmtree(tmp / sub, ignore_errors=True)
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
    """:func:`prepare_domains` with every setting taken from a ``[data]`` section (:class:`DataConfig`).
    Chat records are rendered with ``[data] chat_template`` (a file) when set, else the tokenizer's
    template (``models.loading.load_tokenizer`` gives the run tokenizer the student's template)."""
    d = data_cfg
    chat_template = Path(d.chat_template).read_text() if d.chat_template else None
    return prepare_domains(
        d.domains,
        tokenizer,
        d.cache_dir,
        seq_len=d.seq_len,
        val_sequences=d.val_sequences,
        test_sequences=d.num_test_sequences,
        seed=d.split_seed,
        max_bad_records=d.max_bad_records,
        examples=ExampleSettings(chat_template, d.loss_on, d.long_examples),
    )


def _open_splits(folder: Path) -> tuple[TokenShard, TokenShard, TokenShard]:
    return tuple(TokenShard.open(folder / split) for split in ("train", "val", "test"))


def validation_batches(
    val_shard: TokenShard,
    seq_len: int,
    num_sequences: int,
    sep_token_id: int,
    domain_id: int,
    ignore_index: int = -100,
) -> dict[str, np.ndarray]:
    """The fixed validation set of one domain: ``input_ids``, ``labels``, ``domain_ids`` int64
    ``[num_sequences, seq_len]``, identical on every call.

    Same packing as training (documents in stored order, a separator after each, sequence k = stream
    tokens ``[k * seq_len, k * seq_len + seq_len + 1)``) without shuffling; wraps around if the split is
    shorter than ``num_sequences`` sequences (prepare_domains sizes it so that it never is). A shard with
    a loss mask (chat / prompt-completion) gets ``ignore_index`` labels where the mask is 0, as in training.
    """
    if val_shard.num_docs == 0:
        raise ValueError(f"validation shard {val_shard.path} has no documents")
    order = np.arange(val_shard.num_docs, dtype=np.int64)
    cum = stream_cumsum(val_shard.offsets, order)
    stream_len = int(cum[-1])
    out = np.empty((num_sequences, seq_len + 1), dtype=np.int64)
    mask = np.ones((num_sequences, seq_len + 1), dtype=np.uint8)
    for k in range(num_sequences):
        fill_from_stream(
            val_shard.tokens,
            val_shard.offsets,
            lambda e: (order, cum),
            stream_len,
            k * seq_len,
            out[k],
            sep_token_id,
            mask=val_shard.mask,
            mask_out=mask[k],
        )
    labels = np.ascontiguousarray(out[:, 1:])
    labels[mask[:, 1:] == 0] = ignore_index  # chat / prompt-completion: only the counted tokens
    return {
        "input_ids": np.ascontiguousarray(out[:, :-1]),
        "labels": labels,
        "domain_ids": np.full((num_sequences, seq_len), domain_id, dtype=np.int64),
    }
