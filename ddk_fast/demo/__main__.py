"""Build the offline demo's assets: ``python -m ddk_fast.demo --out .cache/demo [--force] [--tiny]``.

Three steps, each cached in its own folder under ``--out``::

    corpus/      <domain>.jsonl (train), val/, test/ and small/<domain>.jsonl   (ddk_fast.demo.corpus)
    tokenizer/   byte-level BPE, AutoTokenizer-loadable       (ddk_fast.demo.tokenizer)
    teacher/     tiny Llama (safetensors) + tokenizer + teacher_report.json   (ddk_fast.demo.teacher)

A step is done when its folder holds a stamp (``.stamp.json``) whose version and settings hash match; the
hash of a later step includes the content hash of the steps it reads, so a changed corpus retrains the
tokenizer and the teacher. A step writes into a temporary sibling folder and renames it into place only when
it has finished, so an interrupted run never leaves a folder that looks done.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads spin-wait between parallel regions. When other jobs already keep the CPUs busy
# (measured on a 2-core box at load ~4), spinning threads are descheduled mid-barrier and a training step
# becomes 3-8x slower than with OMP_WAIT_POLICY=PASSIVE (~2k vs ~8-11k tokens/s for the demo teacher); on an
# idle box spinning is faster (~15k). The policy is read once, when OpenMP starts (before torch is imported).
_BUSY_AT_START = "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] >= 1.0
if _BUSY_AT_START:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

logger = logging.getLogger("ddk_fast.demo")

STAMP_NAME = ".stamp.json"
# Bump a step's version when its code changes what it writes: the cached folder is then rebuilt.
STEP_VERSIONS = {"corpus": 3, "tokenizer": 1, "teacher": 1}


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _content_hash(folder: Path) -> str:
    """SHA-256 of every file's relative path and bytes (stamp excluded), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAMP_NAME):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def read_stamp(folder: str | os.PathLike) -> dict | None:
    """The stamp of a finished step folder, or None."""
    try:
        return json.loads((Path(folder) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _run_step(
    name: str, folder: Path, settings: dict, build: Callable[[Path], dict | None], force: bool
) -> tuple[dict, bool]:
    """Run ``build(tmp_folder)`` unless ``folder`` holds a matching stamp; returns (stamp, was_built)."""
    key = {"step": name, "version": STEP_VERSIONS[name], "settings": settings}
    settings_hash = _hash(key)
    stamp = read_stamp(folder)
    if not force and stamp is not None and stamp.get("settings_hash") == settings_hash:
        logger.info("%-9s cached   %s", name, folder)
        return stamp, False
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger.info("%-9s building %s", name, folder)
    t0 = time.perf_counter()
    try:
        info = build(tmp) or {}
        seconds = time.perf_counter() - t0
        stamp = {
            "step": name,
            "version": STEP_VERSIONS[name],
            "settings_hash": settings_hash,
            "settings": settings,
            "content_hash": _content_hash(tmp),
            "seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "info": info,
        }
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%-9s done in %.1f s", name, seconds)
    return stamp, True


def prepare_demo(
    out_dir: str | os.PathLike, *, force: bool = False, tiny: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Build (or reuse) the demo corpus, tokenizer and teacher under ``out_dir``.

    Args:
        out_dir: folder for the three step folders (created if missing).
        force: rebuild every step even when its cached folder is up to date.
        tiny: a tiny corpus, tokenizer and teacher (seconds; for tests).
        progress: show the teacher's tqdm bar.

    Returns:
        Paths: ``out``, ``corpus`` (``<domain>.jsonl``: training documents), ``val`` and ``test``
        (``<domain>.jsonl``: documents held out before the tokenizer and the teacher train),
        ``tokenizer``, ``teacher`` (model + tokenizer, ``from_pretrained``-loadable) and
        ``teacher_report`` (json with the teacher's per-domain validation losses, the unigram baselines
        and the settings), plus ``built``:
        the names of the steps this call (re)built, empty on a full cache hit.
    """
    from ddk_fast.demo.corpus import CorpusSettings, build_corpus, corpus_files, read_jsonl
    from ddk_fast.demo.teacher import REPORT_NAME, TeacherSettings, format_losses, train_teacher
    from ddk_fast.demo.tokenizer import TokenizerSettings, save_tokenizer, train_tokenizer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus_s = CorpusSettings.tiny() if tiny else CorpusSettings()
    tok_s = TokenizerSettings.tiny() if tiny else TokenizerSettings()
    teacher_s = TeacherSettings.tiny() if tiny else TeacherSettings()
    built: list[str] = []
    t_all = time.perf_counter()

    # The stdlib differs between Python versions: the corpus is rebuilt for another version (its later
    # steps only if the text actually changed, through the content hash).
    corpus_key = {**asdict(corpus_s), "python": list(sys.version_info[:2])}
    corpus_stamp, b = _run_step(
        "corpus", out / "corpus", corpus_key, lambda d: build_corpus(d, corpus_s), force
    )
    built += ["corpus"] * b

    def _tokenizer(d: Path) -> dict:
        texts = [t for train, _ in corpus_files(out / "corpus").values() for t in read_jsonl(train)]
        tok = train_tokenizer(texts, tok_s)
        save_tokenizer(tok, d)
        return {"size": len(tok)}

    tok_key = {**asdict(tok_s), "corpus": corpus_stamp["content_hash"]}
    tok_stamp, b = _run_step("tokenizer", out / "tokenizer", tok_key, _tokenizer, force)
    built += ["tokenizer"] * b

    def _teacher(d: Path) -> dict:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        report = train_teacher(
            tok, out / "corpus", d, teacher_s, progress=progress, num_threads=1 if tiny else None
        )
        return {
            k: report[k] for k in ("params", "steps", "tokens_trained", "tokens_per_second", "valid_loss")
        }

    teacher_key = {
        **asdict(teacher_s),
        "corpus": corpus_stamp["content_hash"],
        "tokenizer": tok_stamp["content_hash"],
    }
    _, b = _run_step("teacher", out / "teacher", teacher_key, _teacher, force)
    built += ["teacher"] * b

    if "teacher" in built:
        report = json.loads((out / "teacher" / REPORT_NAME).read_text())
        logger.info(
            "teacher: %.2fM params, %d steps, %.0f tokens/s; validation loss (nats/token):\n%s",
            report["params"] / 1e6,
            report["steps"],
            report["tokens_per_second"],
            format_losses(report),
        )
    logger.info("demo assets ready in %s (%.1f s)", out, time.perf_counter() - t_all)
    return {
        "out": out,
        "corpus": out / "corpus",
        "val": out / "corpus" / "val",
        "test": out / "corpus" / "test",
        "tokenizer": out / "tokenizer",
        "teacher": out / "teacher",
        "teacher_report": out / "teacher" / REPORT_NAME,
        "built": built,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddk_fast.demo",
        description="Build the offline demo's corpus, tokenizer and teacher (cached; seconds on a re-run).",
    )
    parser.add_argument("--out", default=".cache/demo", help="output folder (default: .cache/demo)")
    parser.add_argument("--force", action="store_true", help="rebuild every step even if cached")
    parser.add_argument("--tiny", action="store_true", help="tiny corpus and teacher (for tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if _BUSY_AT_START:
        logger.info("load average %.1f at start: OMP_WAIT_POLICY=PASSIVE (busy machine)", os.getloadavg()[0])
    paths = prepare_demo(args.out, force=args.force, tiny=args.tiny, progress=not args.no_progress)
    print(json.dumps({k: str(v) for k, v in paths.items() if k != "built"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
