"""Write a teacher cache: run the teacher once over every training sequence of every domain.

:func:`build_cache` in its steps: check the options (:class:`CacheOptions`), open the inputs (tokenizer,
prepared domains, the teacher), refuse a folder holding another teacher's cache, plan the sequences of each
domain (``--epochs auto``: what the run in the config can draw, ``coverage.py``; printed before any work),
measure the teacher's val / test CE per domain, then write each domain's shards, the ``lm_head`` (hidden kind)
and the manifest.

Sequences ``[0, n_d)`` of each domain's packed stream are rebuilt exactly as the sampler builds them and run
through the teacher in batches of ``[data] batch_size`` (on a GPU in its bf16 path, ``[model] dtype = auto``).
``topk``: logits formed a chunk of tokens at a time from the final hidden states (never a [tokens x vocab]
tensor for a whole batch) and reduced to the top-k of the first ``vocab_size`` columns
(:func:`ddk_fast.ops.topk_reference.teacher_topk`). ``hidden``: the final hidden states themselves.

Resumable: a shard's files are written under temporary names and renamed, its record (``<start>.json``,
carrying the build key) last; a rerun keeps every shard whose record matches the build key and recomputes the
rest. The manifest is (re)written at the end and merges domains cached by earlier runs with ``--domains``
(same teacher, tokenizer, seq_len, kind and settings, else refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import prepare_config_domains, validation_batches
from ..data.corpus import tokenizer_fingerprint
from ..distributed import resolve_device
from ..errors import ConfigError
from ..models.evaluation import domain_losses
from ..models.loading import (
    check_student_tokenizer,
    final_hidden,
    head_spec,
    load_teacher,
    load_tokenizer,
    resolve_dtype,
)
from ..ops.topk_reference import teacher_topk
from ..optim import progress_bar
from .addressing import domain_sequences, sequence_tokens
from .coverage import epochs_for, sequences_needed
from .store import (
    FORMAT,
    HEAD_FILE,
    KINDS,
    MANIFEST,
    VERSION,
    TeacherCacheError,
    bytes_per_token,
    sha256_file,
)

log = logging.getLogger("ddk_fast.teacher_cache")

_SHARD_BYTES = 64 << 20  # target size of one shard's files
_CHUNK_TOKENS = 1024  # topk: logits formed this many tokens at a time
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CacheOptions:
    """What to cache (the CLI's flags), validated by :meth:`check`."""

    kind: str = "topk"
    top_k: int = 64
    dtype: str = "bfloat16"  # topk: the log-probabilities' dtype; hidden: the hidden states'
    epochs: float | str = "auto"
    domains: tuple[str, ...] | None = None
    shard_sequences: int | None = None

    def check(self, names: list[str]) -> None:
        if self.kind not in KINDS:
            raise ConfigError("--kind", self.kind, f"one of {', '.join(KINDS)}")
        if self.kind == "topk" and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ConfigError("--top-k", self.top_k, "an integer >= 1")
        allowed = ("bfloat16", "float16") if self.kind == "topk" else ("bfloat16", "float32")
        if self.dtype not in allowed:
            raise ConfigError("--dtype", self.dtype, f"{' or '.join(allowed)} for a {self.kind} cache")
        if self.epochs != "auto" and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ConfigError("--epochs", self.epochs, "auto or a number > 0")
        for name in self.domains or ():
            if name not in names:
                raise ConfigError("--domains", name, f"a domain of the config ({', '.join(names)})")
        if self.shard_sequences is not None and self.shard_sequences < 1:
            raise ConfigError("--shard-sequences", self.shard_sequences, "an integer >= 1")


@dataclass
class _Inputs:
    tokenizer: object
    prepared: list  # the prepared domains (config order)
    teacher: torch.nn.Module
    device: torch.device

    @property
    def sep(self) -> int:
        return self.tokenizer.eos_token_id


def build_cache(cfg, out: Path, options: CacheOptions | None = None) -> dict:
    """Write (or complete) the cache of ``cfg``'s teacher in ``out``; returns the manifest."""
    opts = options or CacheOptions()
    opts.check([dom.name for dom in cfg.data.domains])
    inputs = _open_inputs(cfg, opts)
    head = _identity(cfg, opts, inputs)
    out.mkdir(parents=True, exist_ok=True)
    old = _existing_manifest(out, head)
    jobs = _plan(cfg, opts, inputs, head)
    ce = _teacher_ce(cfg, inputs, jobs)
    if opts.kind == "hidden":
        head["head"] = _write_head(inputs.teacher, out)
    shard_n = opts.shard_sequences or max(1, _SHARD_BYTES // (cfg.data.seq_len * bytes_per_token(head)))
    domains_out = dict(old.get("domains", {}))
    total = sum(n for _, _, n in jobs) * cfg.data.seq_len
    bar = progress_bar(total, unit="tok", desc="teacher cache", enabled=cfg.output.progress)
    progress = _Progress(bar)
    try:
        for (i, dom, n), (val_ce, test_ce) in zip(jobs, ce):
            stream_len = dom.train.num_tokens + dom.train.num_docs
            domains_out[dom.name] = {
                "index": i,
                "data_key": dom.train.meta.get("cache_key", ""),
                "stream_len": stream_len,
                "sequences": n,
                "epochs": epochs_for(n, stream_len, cfg.data.seq_len),
                "teacher_val_ce": val_ce,
                "teacher_test_ce": test_ce,
                "shards": _write_domain(cfg, opts, out, head, inputs, i, dom, n, shard_n, progress),
            }
    finally:
        bar.close()
    manifest = {**head, "domains": domains_out}
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    wall = time.perf_counter() - progress.t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("teacher cache %s: %d tokens computed in %.1f s (%.0f tok/s), %d kept; %.1f MB on disk",
             out, progress.computed, wall, progress.computed / max(wall, 1e-9), total - progress.computed,
             size / 1e6)  # fmt: skip
    return manifest


# ------------------------------------------------------------------------------------------------ the steps
def _open_inputs(cfg, opts: CacheOptions) -> _Inputs:
    tokenizer = load_tokenizer(cfg.model)
    check_student_tokenizer(cfg.model, tokenizer)
    vocab = len(tokenizer)
    if opts.kind == "topk" and opts.top_k > vocab:
        raise ConfigError("--top-k", opts.top_k, f"at most the vocabulary size {vocab}")
    prepared = prepare_config_domains(cfg.data, tokenizer)
    device = resolve_device(cfg.train.device)
    teacher = load_teacher(cfg.model, device, resolve_dtype(cfg.model, device), cfg.train.seed)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_t < vocab:
        raise ConfigError(
            "model.teacher", v_t, f"a teacher vocabulary of at least the tokenizer's {vocab} tokens"
        )
    return _Inputs(tokenizer, prepared, teacher, device)


def teacher_identity(teacher, source: str) -> dict:
    """sha256 of the teacher's config (json) and of its weights (every state-dict tensor's bytes, by name)."""
    cfg = hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode()).hexdigest()
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"source": source, "config_sha256": cfg, "weights_sha256": h.hexdigest()}


def _identity(cfg, opts: CacheOptions, inputs: _Inputs) -> dict:
    """The manifest's head: what a cache was built from and with (a rerun must match it)."""
    head = {
        "format": FORMAT,
        "version": VERSION,
        "kind": opts.kind,
        "teacher": teacher_identity(inputs.teacher, cfg.model.teacher or "inline teacher_config"),
        "tokenizer_sha256": tokenizer_fingerprint(inputs.tokenizer),
        "vocab_size": len(inputs.tokenizer),
        "seq_len": cfg.data.seq_len,
        "seed": cfg.train.seed,
        "sep_token_id": inputs.sep,
    }
    if opts.kind == "topk":
        head.update(top_k=opts.top_k, logprob_dtype=opts.dtype)
    else:
        head.update(hidden_size=int(head_spec(inputs.teacher)["weight"].shape[1]), hidden_dtype=opts.dtype)
    return head


def _existing_manifest(out: Path, head: dict) -> dict:
    """The manifest already in ``out`` ({} when none); TeacherCacheError when it was built differently."""
    if not (out / MANIFEST).is_file():
        return {}
    old = json.loads((out / MANIFEST).read_text())
    old.setdefault("kind", "topk")
    diffs = [f"{k}: cache {old.get(k)!r}, this run {v!r}" for k, v in head.items()
             if k != "version" and old.get(k) != v]  # fmt: skip
    if diffs:
        raise TeacherCacheError(f"teacher cache {out} was built differently: " + "; ".join(diffs))
    return old


def _plan(cfg, opts: CacheOptions, inputs: _Inputs, head: dict) -> list[tuple[int, object, int]]:
    """(domain index, prepared domain, sequences to cache) per chosen domain; logged before any work."""
    needed = sequences_needed(cfg) if opts.epochs == "auto" else None
    jobs, parts = [], []
    for i, dom in enumerate(inputs.prepared):
        if opts.domains and dom.name not in opts.domains:
            continue
        stream_len = dom.train.num_tokens + dom.train.num_docs
        n = needed[i] if needed is not None else domain_sequences(stream_len, cfg.data.seq_len, opts.epochs)
        jobs.append((i, dom, n))
        parts.append(f"{dom.name} {n} sequences ({epochs_for(n, stream_len, cfg.data.seq_len):g} epochs)")
    how = "--epochs auto: the most this run can draw" if needed is not None else f"--epochs {opts.epochs:g}"
    tokens = sum(n for _, _, n in jobs) * cfg.data.seq_len
    log.info("teacher cache plan (%s, %s): %s; %s tokens, %.1f MB", opts.kind, how, ", ".join(parts),
             f"{tokens:,}", tokens * bytes_per_token(head) / 1e6)  # fmt: skip
    return jobs


def _teacher_ce(cfg, inputs: _Inputs, jobs) -> list[tuple[float, float]]:
    """The teacher's mean CE per planned domain on the val split (DDK's denominator) and the test split."""
    d = cfg.data
    v_t = inputs.teacher.get_output_embeddings().weight.shape[0]
    per_split = []
    for split, count in (("val", d.val_sequences), ("test", d.num_test_sequences)):
        sets = [
            validation_batches(getattr(dom, split), d.seq_len, count, inputs.sep, i) for i, dom, _ in jobs
        ]
        per_split.append(domain_losses(inputs.teacher, sets, inputs.device, v_t, cfg.ddk.eval_batch_size))
    return list(zip(*per_split))


def _write_head(teacher, out: Path) -> dict:
    """The teacher's ``lm_head`` (weight, bias) as ``head.safetensors``, in the teacher's dtype (what the
    online teacher multiplies by), and its logit transform; returns the manifest's ``head`` entry."""
    from safetensors.torch import save_file

    spec = head_spec(teacher)
    tensors = {"weight": spec["weight"].detach().cpu().contiguous()}
    if spec["bias"] is not None:
        tensors["bias"] = spec["bias"].detach().cpu().contiguous()
    tmp = out / f"{HEAD_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / HEAD_FILE)
    return {
        "sha256": sha256_file(out / HEAD_FILE),
        "vocab_rows": int(tensors["weight"].shape[0]),
        "logit_scale": spec["logit_scale"],
        "softcap": spec["softcap"],
        "bias": "bias" in tensors,
    }


class _Progress:
    def __init__(self, bar):
        self.bar, self.t0, self.computed = bar, time.perf_counter(), 0

    def kept(self, tokens: int) -> None:
        self.bar.update(tokens)

    def done(self, tokens: int, name: str) -> None:
        self.computed += tokens
        self.bar.update(tokens)
        rate = self.computed / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{name} {rate:,.0f} teacher tok/s")


def _write_domain(cfg, opts, out: Path, head: dict, inputs: _Inputs, i: int, dom, n: int, shard_n: int,
                  progress: _Progress) -> list[dict]:  # fmt: skip
    """Every shard of one domain (a finished one kept when its record carries this build key)."""
    L = cfg.data.seq_len
    key_src = {
        **head,
        "data_key": dom.train.meta.get("cache_key", ""),
        "domain": i,
        "shard_sequences": shard_n,
    }
    build_key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    (out / _safe(dom.name)).mkdir(exist_ok=True)
    shards = []
    for start in range(0, n, shard_n):
        count = min(shard_n, n - start)
        prefix = f"{_safe(dom.name)}/{start:010d}"
        rec_path = out / f"{prefix}.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if (
                rec.get("build_key") == build_key
                and rec["shard"]["count"] == count
                and all((out / f"{prefix}.{f}").is_file() for f in rec["shard"]["sha256"])
            ):
                shards.append(rec["shard"])
                progress.kept(count * L)
                continue
        seqs = sequence_tokens(dom.train, i, cfg.train.seed, L, inputs.sep, start, count)
        files = _rows(opts, inputs, seqs, head, cfg.data.batch_size)
        sums = {}
        for f, data in files.items():
            _atomic_write(out / f"{prefix}.{f}", data)
            sums[f] = hashlib.sha256(data).hexdigest()
        shard = {"prefix": prefix, "start": start, "count": count, "sha256": sums}
        _atomic_write(rec_path, json.dumps({"build_key": build_key, "shard": shard}).encode())
        shards.append(shard)
        progress.done(count * L, dom.name)
    return shards


@torch.no_grad()
def _rows(opts: CacheOptions, inputs: _Inputs, seqs: np.ndarray, head: dict, batch: int) -> dict[str, bytes]:
    """The cached files of ``seqs`` (``[n, L + 1]``; the teacher's inputs are ``[:, :-1]``) as bytes."""
    teacher, dev = inputs.teacher, inputs.device
    n, length = seqs.shape[0], seqs.shape[1] - 1
    dtype = _TORCH_DTYPES[opts.dtype]
    if opts.kind == "hidden":
        rows = torch.empty((n * length, int(head["hidden_size"])), dtype=dtype)
        for b in range(0, n, batch):
            hid = final_hidden(teacher, torch.as_tensor(seqs[b : b + batch, :-1], device=dev))
            rows[b * length : min(b + batch, n) * length] = hid.reshape(-1, hid.shape[-1]).to("cpu", dtype)
        return {"hidden": _tensor_bytes(rows)}
    vocab, k = int(head["vocab_size"]), opts.top_k
    ids = np.empty((n * length, k), dtype="<i4")
    lps = torch.empty((n * length, k), dtype=dtype)
    tail = np.empty(n * length, dtype="<f4")
    w = head_spec(teacher)["weight"][:vocab]
    for b in range(0, n, batch):
        hid = final_hidden(teacher, torch.as_tensor(seqs[b : b + batch, :-1], device=dev)).reshape(
            -1, w.shape[1]
        )
        parts = [
            teacher_topk((hid[i : i + _CHUNK_TOKENS] @ w.T).float(), k)
            for i in range(0, hid.shape[0], _CHUNK_TOKENS)
        ]
        i_, l_, t_ = (torch.cat(x).cpu() for x in zip(*parts))
        r0, r1 = b * length, min(b + batch, n) * length
        ids[r0:r1], lps[r0:r1], tail[r0:r1] = i_.numpy(), l_.to(dtype), t_.numpy()
    return {"ids": ids.tobytes(), "logprobs": _tensor_bytes(lps), "tail": tail.tobytes()}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (bf16 / fp16 through their 16-bit integer view)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.contiguous().numpy().tobytes()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "domain"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
