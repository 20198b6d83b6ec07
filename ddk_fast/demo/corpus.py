"""The demo's built-in multi-domain corpus, generated offline and deterministically.

Five domains of clearly different difficulty for a tiny language model (easiest to hardest, as a small
model sees them), and of different sizes:

- ``logs``: generated service log lines (``2026-03-14 09:12:33 INFO api GET /users/17 200 12ms``): a fixed
  format around random fields. Learned quickly by any model; the largest domain by far (about half of
  all tokens), so a size-proportional mix spends most of its tokens on it.

- ``structured``: generated symbolic tasks, one per line (``sort: 9 2 7 -> 2 7 9``, ``reverse:``, ``max:``,
  key-value ``lookup``). The part before ``->`` is random, the part after is a function of it.
- ``arithmetic``: generated problems, one per line (``37 + 48 = 85``, ``-``, ``*``). The answers are exact
  functions of the operands; a tiny model learns the format and part of the digit arithmetic.
- ``code``: real Python source files of the running interpreter's standard library, cut into chunks at
  top-level ``def``/``class`` boundaries.
- ``docs``: English docstrings extracted with ``ast`` from *other* standard-library modules than the ones
  ``code`` uses (so the two domains do not share text).

Determinism: the generated domains use ``random.Random(seed)``; the stdlib domains order files by the SHA-1
of their relative path (a fixed, name-based order that spreads the choice over the whole library and is
robust to a file being added or missing in another Python version) and cap every size. The same Python
version and settings give byte-identical files.

Layout written by :func:`build_corpus`::

    <dir>/<domain>.jsonl        training documents, one JSON object {"text": ...} per line
    <dir>/val/<domain>.jsonl    held-out documents: validation (what DDK steers on, what a grid is chosen on)
    <dir>/test/<domain>.jsonl   held-out documents: test (reported only)
    <dir>/small/<domain>.jsonl  the first training documents, about ``small_chars`` (a subset of train, for
                                settings that need a small domain)

The held-out documents are the last ones generated (test last, val before it) and are split off *before*
anything trains: the tokenizer and the teacher read ``<domain>.jsonl`` only, so nothing scored on val or
test was ever seen by them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "docs", "arithmetic", "structured", "logs")

# Folders of the stdlib that are tests, demos, vendored or generated code, or not part of the library.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "__pycache__",
        "__phello__",
        "idlelib",
        "tkinter",
        "encodings",
    }
)


@dataclass(frozen=True)
class CorpusSettings:
    """Sizes (in characters of text) and seed of the generated corpus. Changing any value rebuilds it."""

    seed: int = 0
    code_chars: int = 300_000
    docs_chars: int = 300_000
    arithmetic_chars: int = 200_000
    structured_chars: int = 200_000
    logs_chars: int = 1_000_000
    val_chars: int = 24_000  # held out per domain for validation, on top of the training text
    test_chars: int = 40_000  # held out per domain for test, on top of the training and validation text
    small_chars: int = 50_000  # the size of the small/ subset of each domain's training documents
    max_file_chars: int = 12_000  # at most this much text is taken from one stdlib file
    max_file_bytes: int = 200_000  # larger stdlib files are skipped (generated tables)

    @classmethod
    def tiny(cls) -> CorpusSettings:
        return cls(
            code_chars=20_000,
            docs_chars=20_000,
            arithmetic_chars=12_000,
            structured_chars=12_000,
            logs_chars=30_000,
            val_chars=2_000,
            test_chars=2_000,
            small_chars=4_000,
        )

    def chars(self, domain: str) -> int:
        return getattr(self, f"{domain}_chars")


# --------------------------------------------------------------------------------------------------
# stdlib file choice
# --------------------------------------------------------------------------------------------------


def stdlib_files(max_file_bytes: int) -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib's ``.py`` files, in the fixed SHA-1-of-name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 500 <= size <= max_file_bytes:
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: (hashlib.sha1(item[0].encode()).hexdigest(), item[0]))
    if not found:
        raise RuntimeError(f"no Python source files found under the stdlib folder {root}")
    return found


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n").replace("\t", "    ")


def _code_documents(text: str, rng: random.Random, max_chars: int) -> list[str]:
    """Cut a source file into documents of 300..3000 characters at top-level def/class boundaries."""
    blocks: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        starts_block = line.startswith(("def ", "class ", "async def ", "@"))
        if current and starts_block and not current[-1].startswith("@"):  # keep decorators with their def
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    docs: list[str] = []
    doc = ""
    target = rng.randint(300, 3000)
    taken = 0
    for block in blocks:
        block = block.strip("\n")
        if not block:
            continue
        if len(block) > 4000:  # one huge function or table: keep its beginning only
            block = block[:4000].rsplit("\n", 1)[0]
        doc = f"{doc}\n\n{block}" if doc else block
        if len(doc) >= target:
            docs.append(doc + "\n")
            taken += len(doc)
            doc, target = "", rng.randint(300, 3000)
            if taken >= max_chars:
                return docs
    if len(doc) >= 100:
        docs.append(doc + "\n")
    return docs


def _docstrings(text: str) -> list[str]:
    """Docstrings (cleaned, >= 80 characters) of a module, its classes and functions, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out: list[str] = []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                out.append(doc.strip() + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# the four domains: each returns documents in a fixed order until `chars` characters are reached
# --------------------------------------------------------------------------------------------------


def _take(docs_iter, chars: int) -> list[str]:
    docs: list[str] = []
    total = 0
    for doc in docs_iter:
        docs.append(doc)
        total += len(doc)
        if total >= chars:
            break
    return docs


def _code_domain(s: CorpusSettings, chars: int) -> list[str]:
    rng = random.Random(f"code-{s.seed}")

    def gen():
        for i, (_, path) in enumerate(stdlib_files(s.max_file_bytes)):
            if i % 2:  # even positions: code; odd positions: docs (disjoint modules)
                continue
            text = _read_source(path)
            if text:
                yield from _code_documents(text, rng, s.max_file_chars)

    return _take(gen(), chars)


def _docs_domain(s: CorpusSettings, chars: int) -> list[str]:
    seen: set[str] = set()

    def gen():
        for i, (_, path) in enumerate(stdlib_files(s.max_file_bytes)):
            if i % 2 == 0:
                continue
            text = _read_source(path)
            if not text:
                continue
            taken = 0
            for doc in _docstrings(text):
                if doc in seen or taken >= s.max_file_chars:
                    continue
                seen.add(doc)
                taken += len(doc)
                yield doc

    return _take(gen(), chars)


def _arithmetic_line(rng: random.Random) -> str:
    op = rng.choice("++--*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 19)
        return f"{a} * {b} = {a * b}"
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    if op == "-":
        return f"{a} - {b} = {a - b}"
    return f"{a} + {b} = {a + b}"


def _arithmetic_domain(s: CorpusSettings, chars: int) -> list[str]:
    rng = random.Random(f"arithmetic-{s.seed}")

    def gen():
        while True:
            yield "\n".join(_arithmetic_line(rng) for _ in range(rng.randint(2, 40))) + "\n"

    return _take(gen(), chars)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _structured_line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    n = rng.randint(3, 8)
    if kind == 0:
        xs = [rng.randint(0, 9) for _ in range(n)]
        return f"sort: {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}"
    if kind == 1:
        xs = [rng.choice(_LETTERS) for _ in range(n)]
        return f"reverse: {' '.join(xs)} -> {' '.join(reversed(xs))}"
    if kind == 2:
        xs = [rng.randint(0, 99) for _ in range(n)]
        return f"max: {' '.join(map(str, xs))} -> {max(xs)}"
    keys = rng.sample(_LETTERS, n)
    vals = [rng.randint(0, 9) for _ in range(n)]
    k = rng.randrange(n)
    pairs = " ".join(f"{key}={v}" for key, v in zip(keys, vals))
    return f"lookup {keys[k]} in {pairs} -> {vals[k]}"


def _structured_domain(s: CorpusSettings, chars: int) -> list[str]:
    rng = random.Random(f"structured-{s.seed}")

    def gen():
        while True:
            yield "\n".join(_structured_line(rng) for _ in range(rng.randint(2, 30))) + "\n"

    return _take(gen(), chars)


_SERVICES = ("api", "auth", "db", "cache", "worker", "billing")
_PATHS = ("/users", "/orders", "/items", "/login", "/search", "/health", "/cart")
_STATUS = {"INFO": (200, 200, 201, 204), "WARN": (301, 404, 429), "ERROR": (500, 502, 503)}


def _logs_line(rng: random.Random) -> str:
    level = rng.choice(("INFO", "INFO", "INFO", "INFO", "WARN", "ERROR"))
    ts = (
        f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    )
    method = rng.choice(("GET", "GET", "GET", "POST", "PUT", "DELETE"))
    return (
        f"{ts} {level} {rng.choice(_SERVICES)} {method} {rng.choice(_PATHS)}/{rng.randint(1, 999)} "
        f"{rng.choice(_STATUS[level])} {rng.randint(1, 400)}ms"
    )


def _logs_domain(s: CorpusSettings, chars: int) -> list[str]:
    rng = random.Random(f"logs-{s.seed}")

    def gen():
        while True:
            yield "\n".join(_logs_line(rng) for _ in range(rng.randint(4, 40))) + "\n"

    return _take(gen(), chars)


_GENERATORS: dict[str, Callable[[CorpusSettings, int], list[str]]] = {
    "code": _code_domain,
    "docs": _docs_domain,
    "arithmetic": _arithmetic_domain,
    "structured": _structured_domain,
    "logs": _logs_domain,
}


def _split_tail(docs: list[str], chars: int) -> tuple[list[str], list[str]]:
    """(head, tail): the tail is the last documents covering at least ``chars`` characters."""
    held, n = 0, len(docs)
    while n > 1 and held < chars:
        n -= 1
        held += len(docs[n])
    return docs[:n], docs[n:]


def generate_domain(domain: str, settings: CorpusSettings) -> tuple[list[str], list[str], list[str]]:
    """(training, validation, test documents) of one domain: whole documents, the last ones generated are
    held out (test last, validation before it)."""
    if domain not in _GENERATORS:
        raise ValueError(f"domain: expected one of {list(_GENERATORS)}, got {domain!r}")
    s = settings
    docs = _GENERATORS[domain](s, s.chars(domain) + s.val_chars + s.test_chars)
    rest, test = _split_tail(docs, s.test_chars)
    train, val = _split_tail(rest, s.val_chars)
    if not train or not val or not test:
        raise RuntimeError(f"domain {domain!r} produced too little text ({len(docs)} documents)")
    return train, val, test


def _write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[str]:
    """The ``"text"`` field of every line of a corpus file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


HELD_OUT = ("val", "test")


def build_corpus(out_dir: str | os.PathLike, settings: CorpusSettings | None = None) -> dict[str, dict]:
    """Write every domain's training, validation, test and small documents under ``out_dir``; returns
    per-domain stats."""
    settings = settings or CorpusSettings()
    out = Path(out_dir)
    for sub in (*HELD_OUT, "small"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict] = {}
    for domain in DOMAINS:
        train, val, test = generate_domain(domain, settings)
        small, chars = [], 0
        for doc in train:
            if chars >= settings.small_chars:
                break
            small.append(doc)
            chars += len(doc)
        _write_jsonl(out / f"{domain}.jsonl", train)
        _write_jsonl(out / "val" / f"{domain}.jsonl", val)
        _write_jsonl(out / "test" / f"{domain}.jsonl", test)
        _write_jsonl(out / "small" / f"{domain}.jsonl", small)
        stats[domain] = {
            f"{name}_{what}": f(docs)
            for name, docs in (("train", train), ("val", val), ("test", test), ("small", small))
            for what, f in (("docs", len), ("chars", lambda d: sum(map(len, d))))
        }
    return stats


def corpus_files(corpus_dir: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """domain -> (training file, validation file) of a corpus written by :func:`build_corpus` (what the
    tokenizer and the teacher read: the test files are read by nothing here)."""
    d = Path(corpus_dir)
    return {dom: (d / f"{dom}.jsonl", d / "val" / f"{dom}.jsonl") for dom in DOMAINS}
