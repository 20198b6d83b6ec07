"""``python -m ddk_fast.teacher_cache --config run.toml [--kind topk|hidden] [--top-k 64]
[--dtype bfloat16|float16|float32] [--epochs auto|E] [--out DIR] [--domains A B ...]``.

Runs the teacher once over every training sequence (``ddk_fast/teacher_cache/__init__.py`` says what each kind
caches and how a sequence is addressed). ``--epochs auto`` (the default) caches what the run in the config can
draw in the worst case its mixing allows, and prints the plan before any work. ``--verify DIR`` only checks an
existing cache's checksums.

Exit codes: 0 done, 2 bad configuration, a cache built differently, or a corrupt shard (the message names it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _epochs(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number > 0, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="python -m ddk_fast.teacher_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="run.toml (teacher, domains, seq_len, seed, run length)")
    ap.add_argument("--kind", default="topk", choices=["topk", "hidden"],
                    help="topk: the teacher's top-k log-probabilities (default); hidden: its final hidden "
                    "states and lm_head (exact dense loss)")  # fmt: skip
    ap.add_argument("--top-k", type=int, default=64, help="topk: token ids kept per position (default 64)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="row dtype: topk log-probs bfloat16|float16, hidden states bfloat16|float32 "
                    "(default bfloat16)")  # fmt: skip
    ap.add_argument("--logprob-dtype", choices=["bfloat16", "float16"], help="topk: same as --dtype")
    ap.add_argument("--out", help="cache folder (default: <data.cache_dir>/../teacher_<kind>[<k>])")
    ap.add_argument("--domains", nargs="+", help="cache only these domains (default: all)")
    ap.add_argument("--epochs", type=_epochs, default="auto",
                    help="auto (default: what the config's run can draw) or passes over each domain's "
                    "stream")  # fmt: skip
    ap.add_argument("--shard-sequences", type=int, default=None, help="sequences per shard (default ~64 MB)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    ap.add_argument("--verify", metavar="DIR", help="only verify the checksums of the cache in DIR")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )

    from ..errors import ConfigError
    from .store import TeacherCacheError, open_cache

    try:
        if args.verify:
            cache = open_cache(args.verify, verify=True)
            n = len(cache.domains)
            print(f"teacher cache {args.verify}: {cache.kind}, {n} domains, every checksum matches")
            return 0
        if not args.config:
            raise ConfigError("--config", None, "a run.toml (or --verify DIR)")
        from ..config import load_config
        from .writer import CacheOptions, build_cache

        cfg = load_config(args.config, args.set)
        if cfg.teacher_prompt.use:  # the cache would silently hold the plain teacher
            raise ConfigError(
                "teacher_prompt.use",
                cfg.teacher_prompt.use,
                "empty when writing a teacher cache (it caches the teacher without prefixes, and "
                "[teacher_prompt] use is refused with [model] teacher_cache)",
            )
        if args.dtype and args.logprob_dtype and args.dtype != args.logprob_dtype:
            raise ConfigError("--logprob-dtype", args.logprob_dtype, f"the same as --dtype ({args.dtype})")
        options = CacheOptions(
            kind=args.kind,
            top_k=args.top_k,
            dtype=args.dtype or args.logprob_dtype or "bfloat16",
            epochs=args.epochs,
            domains=tuple(args.domains) if args.domains else None,
            shard_sequences=args.shard_sequences,
        )
        name = f"teacher_top{args.top_k}" if args.kind == "topk" else f"teacher_hidden_{options.dtype}"
        out = Path(args.out) if args.out else Path(cfg.data.cache_dir).parent / name
        build_cache(cfg, out, options)
        print(f"teacher cache: {out}")
        return 0
    except (ConfigError, TeacherCacheError) as exc:
        print(f"teacher cache error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
