"""Write a teacher cache: run the teacher once over every training sequence of every domain.

For each domain (config order, or ``--domains``), sequences ``[0, n_d)`` of its packed stream are rebuilt
exactly as the sampler builds them, run through the teacher in batches (``[data] batch_size`` sequences; on a
GPU in the teacher's bf16 path, ``[model] dtype = auto``), and their logits, formed a chunk of tokens at a
time from the final hidden states (no [tokens x vocab] tensor for a whole batch), reduced to the top-k of the
first ``vocab_size`` (tokenizer) columns by :func:`ddk_fast.ops.topk_reference.teacher_topk`.

Resumable: a shard's files are written under temporary names and renamed, and its record
(``<start>.json``, carrying the build key) is written last; a rerun keeps every shard whose record matches the
build key and recomputes the rest. The manifest is (re)written at the end of every run and merges domains
cached by earlier runs with ``--domains`` (same teacher, tokenizer, seq_len, top-k and seed, else refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from . import FILES, FORMAT, MANIFEST, VERSION, TeacherCacheError, domain_sequences, sequence_tokens

log = logging.getLogger("ddk_fast.teacher_cache")

_SHARD_BYTES = 64 << 20  # target size of one shard's files
_CHUNK_TOKENS = 1024  # logits formed this many tokens at a time


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "domain"


def teacher_identity(teacher, source: str) -> dict:
    """sha256 of the teacher's config (json) and of its weights (every state-dict tensor's bytes, by name)."""
    cfg = hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"source": source, "config_sha256": cfg, "weights_sha256": h.hexdigest()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def _teacher_rows(teacher, seqs: np.ndarray, vocab: int, top_k: int, batch: int, device, lp_dtype):
    """Top-k ids, log-probs and tail of every token of ``seqs`` (``[n, L + 1]``; inputs are ``[:, :-1]``)."""
    from ..models import final_hidden, head_weight
    from ..ops.topk_reference import teacher_topk

    n, length = seqs.shape[0], seqs.shape[1] - 1
    ids = np.empty((n, length, top_k), dtype="<i4")
    lps = torch.empty((n * length, top_k), dtype=lp_dtype)
    tail = np.empty((n, length), dtype="<f4")
    w = head_weight(teacher)[:vocab]
    for b in range(0, n, batch):
        inp = torch.as_tensor(seqs[b : b + batch, :-1], device=device)
        hid = final_hidden(teacher, inp).reshape(-1, w.shape[1])
        rows = []
        for i in range(0, hid.shape[0], _CHUNK_TOKENS):
            rows.append(teacher_topk((hid[i : i + _CHUNK_TOKENS] @ w.T).float(), top_k))
        i_, l_, t_ = (torch.cat(x).cpu() for x in zip(*rows))
        r0, r1 = b * length, min(b + batch, n) * length
        ids.reshape(-1, top_k)[r0:r1] = i_.numpy()
        lps[r0:r1] = l_.to(lp_dtype)
        tail.reshape(-1)[r0:r1] = t_.numpy()
    lp_bytes = lps.view(torch.int16).numpy().tobytes()
    return ids, lp_bytes, tail


def build_cache(cfg, out: Path, top_k: int, domains: list[str] | None = None, epochs: float = 1.0,
                logprob_dtype: str = "bfloat16", shard_sequences: int | None = None) -> dict:  # fmt: skip
    """Write (or complete) the cache of ``cfg``'s teacher in ``out``; returns the manifest."""
    from tqdm.auto import tqdm

    from ..data import prepare_config_domains, validation_batches
    from ..data.corpus import tokenizer_fingerprint
    from ..errors import ConfigError
    from ..evaluation import domain_losses
    from ..models import check_student_tokenizer, load_teacher, load_tokenizer, resolve_dtype
    from ..trainer import resolve_device

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError("--top-k", top_k, "an integer >= 1")
    if not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ConfigError("--epochs", epochs, "a number > 0")
    if logprob_dtype not in ("bfloat16", "float16"):
        raise ConfigError("--logprob-dtype", logprob_dtype, "bfloat16 or float16")
    d, m = cfg.data, cfg.model
    names = [dom.name for dom in d.domains]
    chosen = names if not domains else domains
    for name in chosen:
        if name not in names:
            raise ConfigError("--domains", name, f"a domain of the config ({', '.join(names)})")
    tokenizer = load_tokenizer(m)
    check_student_tokenizer(m, tokenizer)
    vocab = len(tokenizer)
    if top_k > vocab:
        raise ConfigError("--top-k", top_k, f"at most the vocabulary size {vocab}")
    prepared = prepare_config_domains(d, tokenizer)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(m, device)
    teacher = load_teacher(m, device, dtype, cfg.train.seed)
    if teacher.get_output_embeddings().weight.shape[0] < vocab:
        raise ConfigError("model.teacher", teacher.get_output_embeddings().weight.shape[0],
                          f"a teacher vocabulary of at least the tokenizer's {vocab} tokens")  # fmt: skip
    sep = tokenizer.eos_token_id
    head = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_identity(teacher, m.teacher or "inline teacher_config"),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "seq_len": d.seq_len,
        "top_k": top_k,
        "logprob_dtype": logprob_dtype,
        "seed": cfg.train.seed,
        "sep_token_id": sep,
    }
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        diffs = [f"{k}: cache {old.get(k)!r}, this run {v!r}" for k, v in head.items() if old.get(k) != v]
        if diffs:
            raise TeacherCacheError(f"teacher cache {out} was built differently: " + "; ".join(diffs))
    per_seq = d.seq_len * (top_k * 6 + 4)
    shard_n = shard_sequences or max(1, _SHARD_BYTES // per_seq)
    lp_torch = torch.bfloat16 if logprob_dtype == "bfloat16" else torch.float16
    jobs, total = [], 0
    for i, dom in enumerate(prepared):
        if dom.name not in chosen:
            continue
        n = domain_sequences(dom.train.num_tokens + dom.train.num_docs, d.seq_len, epochs)
        jobs.append((i, dom, n))
        total += n * d.seq_len
    # the teacher's per-domain CE on the validation split (DDK's denominator) and on the test split (report)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    val = [validation_batches(dom.val, d.seq_len, d.val_sequences, sep, i) for i, dom, _ in jobs]
    test = [validation_batches(dom.test, d.seq_len, d.num_test_sequences, sep, i) for i, dom, _ in jobs]
    ce = domain_losses(teacher, val, device, v_t, cfg.ddk.eval_batch_size)
    test_ce = domain_losses(teacher, test, device, v_t, cfg.ddk.eval_batch_size)
    domains_out = dict(old.get("domains", {}))
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="teacher cache", disable=not cfg.output.progress
    )
    t0, computed = time.perf_counter(), 0
    try:
        for (i, dom, n), dom_ce, dom_test_ce in zip(jobs, ce, test_ce):
            data_key = dom.train.meta.get("cache_key", "")
            key_src = {**head, "data_key": data_key, "domain": i, "shard_sequences": shard_n}
            build_key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
            (out / _safe(dom.name)).mkdir(exist_ok=True)
            shards = []
            for start in range(0, n, shard_n):
                count = min(shard_n, n - start)
                prefix = f"{_safe(dom.name)}/{start:010d}"
                rec_path = out / f"{prefix}.json"
                if rec_path.is_file():
                    rec = json.loads(rec_path.read_text())
                    same = rec.get("build_key") == build_key and rec["shard"]["count"] == count
                    if same and all((out / f"{prefix}.{f}").is_file() for f in FILES):
                        shards.append(rec["shard"])
                        bar.update(count * d.seq_len)
                        continue
                seqs = sequence_tokens(dom.train, i, cfg.train.seed, d.seq_len, sep, start, count)
                ids, lp_bytes, tail = _teacher_rows(
                    teacher, seqs, vocab, top_k, d.batch_size, device, lp_torch
                )
                sums = {}
                for f, data in (("ids", ids.tobytes()), ("logprobs", lp_bytes), ("tail", tail.tobytes())):
                    _atomic_write(out / f"{prefix}.{f}", data)
                    sums[f] = hashlib.sha256(data).hexdigest()
                shard = {"prefix": prefix, "start": start, "count": count, "sha256": sums}
                _atomic_write(rec_path, json.dumps({"build_key": build_key, "shard": shard}).encode())
                shards.append(shard)
                computed += count * d.seq_len
                bar.update(count * d.seq_len)
                bar.set_postfix_str(f"{dom.name} {computed / (time.perf_counter() - t0):,.0f} teacher tok/s")
            domains_out[dom.name] = {
                "index": i,
                "data_key": data_key,
                "stream_len": dom.train.num_tokens + dom.train.num_docs,
                "sequences": n,
                "epochs": epochs,
                "teacher_val_ce": dom_ce,
                "teacher_test_ce": dom_test_ce,
                "shards": shards,
            }
    finally:
        bar.close()
    manifest = {**head, "domains": domains_out}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("teacher cache %s: %d tokens computed in %.1f s (%.0f tok/s), %d kept; %.1f MB on disk",
             out, computed, wall, computed / max(wall, 1e-9), total - computed, size / 1e6)  # fmt: skip
    return manifest
