"""The prompt search as a library call: :func:`run_search` loads the teacher, searches every domain
(:mod:`.search`) and writes ``prompts.json`` + ``prompts.md``; ``python -m ddk_fast.prompts`` and the
comparison harness call it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..data import prepare_config_domains
from ..distributed import resolve_device
from ..errors import ConfigError
from ..models.loading import load_teacher, load_tokenizer, resolve_dtype
from ..optim import progress_bar
from .file import FORMAT, teacher_config_identity, teacher_weights_identity, tokenizer_identity
from .search import domain_entry, search_domain


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
    """Search every domain's prefix (or ``only`` these) with the teacher of ``cfg`` and write ``out``
    (prompts.json) and its ``.md`` table; returns the prompts.json object."""
    p = cfg.teacher_prompt
    names = [d.name for d in cfg.data.domains]
    for n in only or []:
        if n not in names:
            raise ConfigError("--domains", n, f"a domain of the config ({', '.join(names)})")
    tokenizer = load_tokenizer(cfg.model)
    domains = prepare_config_domains(cfg.data, tokenizer)
    device = resolve_device(cfg.train.device)
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
