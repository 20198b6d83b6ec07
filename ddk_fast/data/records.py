"""Reading a domain's files into records, with a place (``file:line``) for every bad one.

Formats of a record (``[[data.domains]] format``; ``auto`` = from the first record of each file):

* ``text``: the string in ``text_field``;
* ``chat``: ``messages``, a list of ``{"role", "content"}`` (strings);
* ``prompt_completion``: ``prompt`` and ``completion``, both strings, or both lists of messages (a
  conversational prompt and its assistant reply).

A record that has ``messages`` is chat, else one with ``prompt`` and ``completion`` is prompt_completion, else
one with ``text_field`` is text (a record with none of them is a bad record of the file's format). All files
of a domain share one format; a file whose records change format is a ConfigError naming ``file:line`` of the
first record of another format.

``.jsonl`` is read line by line (a bad record has a line number), ``.json`` / ``.parquet`` through
``datasets`` (offline; the place is ``file:record N``). A ``.txt`` file is text, split by
``[[data.domains]] text_unit``: ``file`` (default: the whole file is one document), ``paragraph`` (blocks
separated by blank lines; the place is the block's first line) or ``line`` (every non-blank line).

Bad records (no usable field, empty, undecodable) are counted per file in :class:`FileFaults`; the corpus
stops above ``[data] max_bad_records``. Examples longer than a sequence are counted there too (truncated,
dropped), never held against ``max_bad_records``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

FORMATS = ("text", "chat", "prompt_completion")
_TABLE_BATCH = 1000


@dataclass
class FileFaults:
    """Bad records of one file: without the text field (or not a string), empty, undecodable; and the
    examples longer than a sequence (truncated or dropped by ``[data] long_examples``)."""

    path: str
    records: int = 0
    missing_field: int = 0
    empty: int = 0
    undecodable: int = 0
    first: str | None = None  # "file:line: what is wrong" of the first bad record
    format: str = "text"
    truncated: int = 0
    dropped_long: int = 0

    @property
    def bad(self) -> int:
        return self.missing_field + self.empty + self.undecodable

    def note(self, kind: str, where: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if self.first is None:
            self.first = f"{where}: {what}"

    def summary(self, text_field: str) -> str:
        missing = f"without a string field {text_field!r}" if self.format == "text" else "malformed"
        parts = [
            f"{n} {label}"
            for n, label in (
                (self.missing_field, missing),
                (self.empty, "empty"),
                (self.undecodable, "undecodable"),
            )
            if n
        ]
        what = ", ".join(parts)
        return f"{self.bad} of {self.records} records bad in {self.path} ({what}; first: {self.first})"


def record_format(record, field: str = "text") -> str | None:
    """The format a record has (module doc), or None when it has none of the fields."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return "text" if field in record else None


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in v
    )


def _value(record: dict, fmt: str, field: str):
    """The record's payload for ``fmt`` -- text: str; chat: messages; prompt_completion: (prompt,
    completion) -- or an error phrase."""
    if fmt == "text":
        text = record.get(field)
        if isinstance(text, str):
            return text, None
        if field not in record:
            return None, f"no field {field!r}"
        return None, f"field {field!r} is {type(text).__name__}, not a string"
    if fmt == "chat":
        msgs = record.get("messages")
        if _is_messages(msgs) and msgs:
            return list(msgs), None
        return None, "`messages` is not a non-empty list of {role, content} strings"
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return (prompt, completion), None
    if _is_messages(prompt) and _is_messages(completion) and completion:
        return (list(prompt), list(completion)), None
    return None, "`prompt` and `completion` are not both strings or both lists of {role, content}"


class _FormatTracker:
    """The format of one file: the first record's (``auto``) or the configured one; a later record of
    another format is a ConfigError naming both places."""

    def __init__(self, i: int, fmt: str, field: str, faults: FileFaults):
        self.i, self.fixed, self.field, self.faults = i, fmt, field, faults
        self.first_where: str | None = None
        if fmt != "auto":
            faults.format = fmt

    def check(self, record, where: str) -> str:
        if self.fixed != "auto":
            return self.fixed
        found = record_format(record, self.field)
        if found is None:
            return self.faults.format
        if self.first_where is None:
            self.first_where = where
            self.faults.format = found
        elif found != self.faults.format:
            raise ConfigError(
                f"data.domains[{self.i}].format",
                "auto",
                "records of one format per file (text, chat or prompt_completion)",
                f"{where} is {found}, the file's first record ({self.first_where}) is {self.faults.format}",
            )
        return self.faults.format


def _read_jsonl(i: int, p: Path, fmt: str, field: str, faults: FileFaults):
    tracker = _FormatTracker(i, fmt, field, faults)
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            if not raw.strip():
                continue  # blank line between JSON records
            faults.records += 1
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                faults.note("undecodable", where, f"not a JSON record ({str(exc)[:80]})")
                continue
            kind = tracker.check(record, where)
            if not isinstance(record, dict):
                faults.note("missing_field", where, "not a JSON object")
                continue
            value, problem = _value(record, kind, field)
            if problem is not None:
                faults.note("missing_field", where, problem)
                continue
            yield where, value


def _read_txt(p: Path, unit: str, faults: FileFaults):
    """.txt: (where, text) per file, paragraph or non-blank line (module doc)."""
    faults.format = "text"
    if unit == "line":
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip(b"\r\n")
                if line.strip():
                    yield from _decoded(f"{p}:{lineno}", line, faults)
        return
    data = p.read_bytes()
    if unit == "file":
        if data.strip():
            yield from _decoded(f"{p}:1", data, faults)
        return
    block: list[bytes] = []
    start = 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        if raw.strip():
            if not block:
                start = lineno
            block.append(raw)
        elif block:
            yield from _decoded(f"{p}:{start}", b"".join(block).rstrip(b"\r\n"), faults)
            block = []
    if block:
        yield from _decoded(f"{p}:{start}", b"".join(block).rstrip(b"\r\n"), faults)


def _decoded(where: str, raw: bytes, faults: FileFaults):
    faults.records += 1
    try:
        yield where, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        faults.note("undecodable", where, f"not UTF-8 ({exc.reason} at byte {exc.start})")


def _read_table(i: int, p: Path, kind: str, fmt: str, field: str, faults, hf_cache: Path, num_proc):
    """.json / .parquet through ``datasets``: yields (file:record, value)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            kind, data_files=str(p), split="train", cache_dir=str(hf_cache), num_proc=num_proc
        )
    except Exception as exc:
        raise ConfigError(
            f"data.domains[{i}].files", str(p), f"a readable {kind} file", hint=f"{type(exc).__name__}: {exc}"
        ) from exc
    cols = ds.column_names
    if fmt == "auto":
        fmt = record_format(dict.fromkeys(cols), field) or "text"
    faults.format = fmt
    need = {"text": [field], "chat": ["messages"], "prompt_completion": ["prompt", "completion"]}[fmt]
    missing = [c for c in need if c not in cols]
    if missing:
        key = "text_field" if fmt == "text" else "format"
        value = field if fmt == "text" else fmt
        raise ConfigError(f"data.domains[{i}].{key}", value, f"a field of the data; {p} has fields {cols}")
    for start in range(0, len(ds), _TABLE_BATCH):
        rows = ds[start : start + _TABLE_BATCH]
        for j in range(len(rows[need[0]])):
            where = f"{p}:record {start + j + 1}"
            faults.records += 1
            value, problem = _value({c: rows[c][j] for c in need}, fmt, field)
            if problem is not None:
                faults.note("missing_field", where, problem)
                continue
            yield where, value


def read_records(i: int, p: Path, kind: str, dom, faults: FileFaults, hf_cache: Path, num_proc=None):
    """(where, value) of every good record of file ``p`` (``kind``: json / parquet / text, from the file
    extension); ``dom`` a DomainConfig-like object (``format``, ``text_field``, ``text_unit``)."""
    fmt = getattr(dom, "format", "auto")
    field = getattr(dom, "text_field", "text")
    if kind == "text":
        if fmt not in ("auto", "text"):
            raise ConfigError(f"data.domains[{i}].format", fmt, "text or auto for a .txt file", str(p))
        yield from _read_txt(p, getattr(dom, "text_unit", "file"), faults)
        return
    if p.suffix.lower() == ".jsonl":
        yield from _read_jsonl(i, p, fmt, field, faults)
        if faults.records and faults.missing_field == faults.records and faults.format == "text":
            raise ConfigError(f"data.domains[{i}].text_field", field, f"a field of the data; {faults.first}")
    else:
        yield from _read_table(i, p, kind, fmt, field, faults, hf_cache, num_proc)
