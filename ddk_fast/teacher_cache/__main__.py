"""``python -m ddk_fast.teacher_cache --config run.toml --top-k 64 [--out DIR] [--domains A B ...]``.

Runs the teacher once over every training sequence (see ``ddk_fast/teacher_cache/__init__.py`` for what is
cached and how it is addressed). ``--verify DIR`` only checks an existing cache's checksums.

Exit codes: 0 done, 2 bad configuration, a cache built differently, or a corrupt shard (the message names it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="python -m ddk_fast.teacher_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="run.toml (its [model] teacher, [data] domains, seq_len, seed)")
    ap.add_argument("--top-k", type=int, default=64, help="teacher token ids kept per position (default 64)")
    ap.add_argument("--out", help="cache folder (default: <data.cache_dir>/../teacher_top<k>)")
    ap.add_argument("--domains", nargs="+", help="cache only these domains (default: all)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over each domain's stream to cache")
    ap.add_argument("--logprob-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--shard-sequences", type=int, default=None, help="sequences per shard (default ~64 MB)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    ap.add_argument("--verify", metavar="DIR", help="only verify the checksums of the cache in DIR")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )

    from ..errors import ConfigError
    from . import TeacherCache, TeacherCacheError

    try:
        if args.verify:
            cache = TeacherCache(args.verify, verify=True)
            print(f"teacher cache {args.verify}: {len(cache.domains)} domains, every checksum matches")
            return 0
        if not args.config:
            raise ConfigError("--config", None, "a run.toml (or --verify DIR)")
        from ..config import load_config
        from .writer import build_cache

        cfg = load_config(args.config, args.set)
        if cfg.teacher_prompt.use:  # the cache would silently hold the plain teacher
            raise ConfigError(
                "teacher_prompt.use",
                cfg.teacher_prompt.use,
                "empty when writing a teacher cache (it caches the teacher without prefixes, and "
                "[teacher_prompt] use is refused with [model] teacher_cache)",
            )
        out = Path(args.out) if args.out else Path(cfg.data.cache_dir).parent / f"teacher_top{args.top_k}"
        build_cache(cfg, out, args.top_k, args.domains, args.epochs, args.logprob_dtype, args.shard_sequences)
        print(f"teacher cache: {out}")
        return 0
    except (ConfigError, TeacherCacheError) as exc:
        print(f"teacher cache error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
