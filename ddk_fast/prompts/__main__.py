"""``python -m ddk_fast.prompts --config run.toml [--out prompts.json] [--domains A B] [--set k=v]``.

Searches a teacher prefix per domain (:mod:`ddk_fast.prompts.search`) and writes ``prompts.json`` (schema in
:mod:`ddk_fast.prompts.file`) and ``prompts.md`` next to it; the table is also printed. Train with it by
setting ``[teacher_prompt] use = "<out>"``. The config's own ``use`` is ignored here (the search always
starts from the plain teacher), so one run.toml serves both steps.

Exit codes: 0 done, 2 bad configuration (the message names the key and the value).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def report_markdown(data: dict) -> str:
    """The per-domain table of a prompts.json."""
    s = data["settings"]
    lines = [
        "# Teacher prompt search",
        "",
        f"Teacher `{data['teacher'].get('path') or 'inline config'}`; budget {s['budget']} candidates per "
        f"domain; dev slice {s['dev_sequences']} x {s['seq_len']} tokens from the end of each train split. "
        "CE in nats/token on the dev slice; delta = with - without (negative = the prefix helps).",
        "",
        "| domain | prefix | kind | tokens | dev CE with | dev CE without | delta | evaluations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in data["domains"].items():
        lines.append(
            f"| {name} | {_short(e['prefix'])} | {e['kind']} | {len(e['prefix_ids'])} | {e['dev_ce']:.4f} | "
            f"{e['no_prefix_ce']:.4f} | {e['dev_ce'] - e['no_prefix_ce']:+.4f} | {e['evaluations']} |"
        )
    return "\n".join(lines) + "\n"


def _short(text: str, n: int = 40) -> str:
    t = json.dumps(text)[1:-1].replace("|", "\\|")
    return f"`{t[:n]}{'...' if len(t) > n else ''}`" if t else "(none)"


def run_search(cfg, out: Path, only: list[str] | None = None) -> dict:
    from ..data import prepare_config_domains
    from ..distributed import _device
    from ..errors import ConfigError
    from ..models import load_teacher, load_tokenizer, resolve_dtype
    from ..optim import progress_bar
    from .file import FORMAT, teacher_config_identity, teacher_weights_identity, tokenizer_identity
    from .search import domain_entry, search_domain

    p = cfg.teacher_prompt
    names = [d.name for d in cfg.data.domains]
    for n in only or []:
        if n not in names:
            raise ConfigError("--domains", n, f"a domain of the config ({', '.join(names)})")
    tokenizer = load_tokenizer(cfg.model)
    domains = prepare_config_domains(cfg.data, tokenizer)
    device = _device(cfg.train.device, 0)
    teacher = load_teacher(cfg.model, device, resolve_dtype(cfg.model, device), cfg.train.seed)
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit is not None and p.max_prefix_tokens + cfg.data.seq_len > limit:
        raise ConfigError(
            "teacher_prompt.max_prefix_tokens",
            p.max_prefix_tokens,
            f"at most {limit - cfg.data.seq_len} (teacher max_position_embeddings {limit} - seq_len)",
        )
    todo = [(i, d) for i, d in enumerate(domains) if not only or d.name in only]
    bar = progress_bar(p.budget * len(todo), unit="cand", desc="prompt search", enabled=cfg.output.progress)
    t0, done = time.perf_counter(), [0]

    def tick():
        done[0] += 1
        bar.update(1)
        bar.set_postfix_str(f"{done[0] / max(time.perf_counter() - t0, 1e-9):.2f} cand/s")

    entries = {}
    try:
        for i, dom in todo:
            result, info = search_domain(
                teacher, tokenizer, dom.name, i, dom.train, p, cfg.data.seq_len, cfg.ddk.eval_batch_size, tick
            )
            entries[dom.name] = domain_entry(tokenizer, result, info)
    finally:
        bar.close()
    data = {
        "format": FORMAT,
        "teacher": {
            **teacher_config_identity(cfg.model, cfg.train.seed),
            **teacher_weights_identity(teacher),
        },
        "tokenizer": tokenizer_identity(tokenizer),
        "settings": {
            "budget": p.budget,
            "dev_sequences": p.dev_sequences,
            "max_fewshot": p.max_fewshot,
            "max_prefix_tokens": p.max_prefix_tokens,
            "seed": p.seed,
            "seq_len": cfg.data.seq_len,
            "templates": list(p.templates),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "domains": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(report_markdown(data))
    return data


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
