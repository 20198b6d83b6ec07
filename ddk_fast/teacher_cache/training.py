"""Training from a teacher cache (``[model] teacher_cache = "DIR"``): open and check the cache for this run,
and make the sampler's batches carry the cached rows of the sequences they hold.

The rows are looked up by (domain, sequence index): :func:`~ddk_fast.teacher_cache.batch_sequence_indices`
replays the sampler's largest-deficit walk from its state before the batch (and checks the domains it gets
against the batch), so the lookup follows DDK's mixture, resume and ranks exactly. The hook runs inside
``DomainSampler._produce``, i.e. in the prefetch thread when prefetching is on: the cache reads overlap
the training step like the token reads do.
"""

from __future__ import annotations

import logging

import numpy as np

from . import TeacherCache, TeacherCacheError, batch_sequence_indices

log = logging.getLogger("ddk_fast")


def open_for_run(path: str, *, tokenizer_sha256: str, seq_len: int, seed: int, sep_token_id: int,
                 domains: dict[str, str]) -> TeacherCache:  # fmt: skip
    """Open ``path`` (checksums verified) and refuse it unless it was written for this run's tokenizer,
    seq_len, seed, separator and domains (``{name: data key}``); TeacherCacheError names what differs."""
    cache = TeacherCache(path, verify=True)
    cache.check_run(
        {"tokenizer_sha256": tokenizer_sha256, "seq_len": seq_len, "seed": seed, "sep_token_id": sep_token_id,
         "domains": domains}
    )  # fmt: skip
    t = cache.manifest["teacher"]
    log.info(
        "teacher cache %s: top-%d, %s log-probs, teacher %s (weights sha256 %s...); the teacher is not run",
        path, cache.top_k, cache.manifest["logprob_dtype"], t["source"], t["weights_sha256"][:12],
    )  # fmt: skip
    return cache


class CacheRows:
    """``DomainSampler.batch_hook``: adds ``topk_ids`` int32 ``[B, L, k]``, ``topk_logprobs`` (bf16 bits /
    fp16) ``[B, L, k]``, ``tail_logmass`` fp32 ``[B, L]`` and ``sequence_index`` int64 ``[B]`` to a batch."""

    def __init__(self, cache: TeacherCache, names: list[str], world_size: int, rank: int):
        self.cache, self.names, self.world_size, self.rank = cache, names, world_size, rank

    def __call__(self, batch: dict, state_before: tuple, weights: np.ndarray) -> dict:
        seq_index, window, _ = state_before
        b = batch["input_ids"].shape[0]
        doms, idx = batch_sequence_indices(weights, window, seq_index, self.world_size, b, self.rank)
        if not np.array_equal(doms, batch["domain_ids"][:, 0]):
            raise TeacherCacheError(
                "the sampler's domain choices differ from the replayed walk "
                f"({batch['domain_ids'][:, 0].tolist()} vs {doms.tolist()}): cache rows cannot be matched"
            )
        ids, lps, tail = self.cache.rows(self.names, doms, idx)
        return {"topk_ids": ids, "topk_logprobs": lps, "tail_logmass": tail, "sequence_index": idx}


def open_for_schedule(cfg, tokenizer, schedule) -> TeacherCache:
    """Open ``[model] teacher_cache`` for a run whose data is set up (a
    :class:`~ddk_fast.schedule.DomainSchedule`), and install the rows hook on its sampler."""
    from ..data.corpus import tokenizer_fingerprint

    cache = open_for_run(
        cfg.model.teacher_cache,
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        seq_len=cfg.data.seq_len,
        seed=cfg.train.seed,
        sep_token_id=tokenizer.eos_token_id,
        domains={dom.name: dom.train.meta.get("cache_key", "") for dom in schedule.domains},
    )
    s = schedule.sampler
    s.batch_hook = CacheRows(cache, schedule.names, s.world_size, s.rank)
    return cache


def teacher_for_student_init(cfg, run_dir, device, dtype):
    """The teacher of a cached run, which is never run: loaded only when the student is built from its layers
    (``student_from_teacher_layers``) and no current ``student_init`` exists; the caller drops it right
    after."""
    from ..models import load_teacher, student_init_current

    m = cfg.model
    if m.student_from_teacher_layers and not student_init_current(m, run_dir, dtype, cfg.train.seed):
        log.info("teacher loaded once to take the student's layers from it (not run)")
        return load_teacher(m, device, dtype, cfg.train.seed)
    return None


def cached_vocab_size(student, tokenizer, cache: TeacherCache) -> int:
    """The student's vocabulary size, checked to cover the tokenizer and the cache's vocabulary."""
    from ..errors import ConfigError

    v_s = student.get_output_embeddings().weight.shape[0]
    need = max(len(tokenizer), int(cache.manifest["vocab_size"]))
    if v_s < need:
        raise ConfigError(
            "model.student", v_s, f"a student vocabulary of at least {need} rows (tokenizer/cache)"
        )
    return v_s
