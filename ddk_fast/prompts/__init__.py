"""Teacher prompt search (AKD, ``[teacher_prompt]``): a per-domain prefix shown to the teacher only.

* :mod:`.search` -- the PromptAid-style search (explore templates, perturb the best by keyword swaps in the
  teacher's embedding space and by few-shot documents, test each candidate by the teacher's CE on a dev
  slice of the domain's train split, iterate for a fixed budget); ``python -m ddk_fast.prompts`` runs it
  and writes ``prompts.json`` + ``prompts.md``.
* :mod:`.prefix` -- the prefixed teacher forward used in training and evaluation: each prefix's keys/values
  computed once, the plain tokens' positions continuing after it, rows of different domains in one forward.
* :mod:`.file` -- the prompts.json schema and the checks that it fits a run (domains, tokenizer, teacher).

Training with ``use = "prompts.json"`` (:func:`open_prompts` before any model loads, :func:`build_prompts`
once the teacher is loaded): the teacher sees ``prefix + text`` and its hidden states at the text positions
feed the KD loss (and ``[hidden]``); the student sees the plain text. The teacher's val and test CE per
domain (DDK's reference, the report) are measured *with* the prefix: it is that teacher whose outputs are
the targets, and measuring both splits the same way keeps the DDK gap and the report consistent.
"""

from __future__ import annotations

import logging

from .file import check_loaded_teacher, check_prompts_file, check_prompts_identity, run_prefixes
from .prefix import TeacherPrompts, prefix_kv, prefixed_hidden, row_domains

log = logging.getLogger("ddk_fast")

__all__ = ["TeacherPrompts", "build_prompts", "open_prompts", "prefix_kv", "prefixed_hidden", "row_domains"]


def open_prompts(cfg, tokenizer) -> dict | None:
    """The prompts.json of ``[teacher_prompt] use``, checked against the domains, the tokenizer and the
    teacher's config (ConfigError naming the key); None when off. No model weight is read."""
    path = cfg.teacher_prompt.use
    if not path:
        return None
    data = check_prompts_file(path, [d.name for d in cfg.data.domains])
    check_prompts_identity(data, path, tokenizer, cfg.model, cfg.train.seed)
    return data


def build_prompts(cfg, data: dict, teacher) -> TeacherPrompts:
    """The run's :class:`TeacherPrompts` (prefix keys/values computed here, once per domain)."""
    from ..errors import ConfigError

    path = cfg.teacher_prompt.use
    check_loaded_teacher(data, path, teacher)
    names = [d.name for d in cfg.data.domains]
    prefixes = run_prefixes(data, names)
    limit = getattr(teacher.config, "max_position_embeddings", None)
    for d, ids in prefixes.items():
        if limit is not None and len(ids) + cfg.data.seq_len > limit:
            raise ConfigError(
                "teacher_prompt.use",
                path,
                f"prefixes of at most {limit - cfg.data.seq_len} tokens (teacher max_position_embeddings "
                f"{limit} - seq_len {cfg.data.seq_len})",
                f"domain {names[d]!r} has {len(ids)}",
            )
    for name in names:
        if name not in data["domains"]:
            log.warning("teacher prompts: %s has no entry in %s; its teacher sees no prefix", name, path)
    log.info(
        "teacher prompts from %s: %s",
        path,
        ", ".join(f"{n} {len(prefixes.get(i, []))} tokens" for i, n in enumerate(names)),
    )
    return TeacherPrompts(teacher, prefixes)
