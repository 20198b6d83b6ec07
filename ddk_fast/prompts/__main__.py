"""``python -m ddk_fast.prompts --config run.toml [--out prompts.json] [--domains A B] [--set k=v]``.

Searches a teacher prefix per domain (:mod:`ddk_fast.prompts.search`) and writes ``prompts.json`` (schema in
:mod:`ddk_fast.prompts.file`) and ``prompts.md`` next to it; the table is also printed. Train with it by
setting ``[teacher_prompt] use = "<out>"``. The config's own ``use`` is ignored here (the search always
starts from the plain teacher), so one run.toml serves both steps.

Exit codes: 0 done, 2 bad configuration (the message names the key and the value).
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
    ap = argparse.ArgumentParser(prog="python -m ddk_fast.prompts", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run.toml (its [model], [data] and [teacher_prompt])")
    ap.add_argument("--out", help="prompts.json to write (default: [teacher_prompt] out, else <output.dir>)")
    ap.add_argument("--domains", nargs="+", help="search only these domains (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )

    from ..config import load_config
    from ..errors import ConfigError, RunError
    from .run import report_markdown, run_search

    try:
        cfg = load_config(args.config, [*args.set, 'teacher_prompt.use=""'])
        out = Path(args.out or cfg.teacher_prompt.out or Path(cfg.output.dir) / "prompts.json")
        data = run_search(cfg, out, args.domains)
    except (ConfigError, RunError) as exc:
        print(f"prompt search error: {exc}", file=sys.stderr)
        return 2
    print(report_markdown(data))
    print(f"prompts: {out} (table: {out.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
