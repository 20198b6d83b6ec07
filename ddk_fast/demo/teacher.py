"""The demo's teacher: a tiny Llama trained from scratch on the demo corpus, in a fixed number of steps.

Training is plain next-token cross-entropy on an equal mix of the domains: every step draws ``batch_size``
windows of ``seq_len + 1`` tokens, the domains taking turns (sequence i of step s comes from domain
``(s * batch_size + i) mod N``), each window starting at a seeded random offset in that domain's token
stream (its training documents, tokenised once and joined with eos). AdamW, linear warm-up, cosine decay to
``min_lr_ratio * lr``, gradient clipping. The step budget is fixed (not a time budget), so the same settings
give the same model on any machine, up to floating-point reduction order.

Every Linear's input and output size is a multiple of 64 (hidden, intermediate and the vocabulary padded up
to a multiple of 64), so a student cut from this teacher can be quantised to 4-bit NF4 (blocks of 64).

Validation: each domain's held-out documents, joined with eos, cut into consecutive windows of
``seq_len + 1`` tokens (at most ``valid_windows``); the loss is the mean cross-entropy over all their
targets. The *unigram baseline* scores the same targets with the domain's add-one-smoothed training
unigram distribution: a model that knows anything about the domain must beat it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ddk_fast.demo.corpus import corpus_files, read_jsonl
from ddk_fast.optim import build_optimizer, progress_bar
from ddk_fast.training.metrics import MetricsWriter

logger = logging.getLogger(__name__)

REPORT_NAME = "teacher_report.json"
_BLOCK = 64  # NF4 quantisation block: every Linear dimension must be a multiple of it


@dataclass(frozen=True)
class TeacherSettings:
    """Architecture and training budget of the demo teacher. Changing any value retrains it."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup_steps: int = 25
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    valid_windows: int = 32
    log_every: int = 25

    @classmethod
    def tiny(cls) -> TeacherSettings:
        return cls(
            hidden_size=64,
            intermediate_size=192,
            num_layers=4,
            num_heads=4,
            max_position_embeddings=128,
            seq_len=32,
            batch_size=8,
            steps=40,
            warmup_steps=4,
            valid_windows=8,
            log_every=5,
        )

    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size"):
            v = getattr(self, name)
            if v <= 0 or v % _BLOCK:
                raise ValueError(f"teacher.{name}: expected a positive multiple of {_BLOCK} (NF4), got {v}")
        if self.num_layers < 4 or self.num_layers % 2:
            raise ValueError(f"teacher.num_layers: expected an even number >= 4, got {self.num_layers}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"teacher.num_heads: expected a divisor of hidden_size={self.hidden_size}, "
                f"got {self.num_heads}"
            )
        if not 0 < self.seq_len < self.max_position_embeddings:
            raise ValueError(
                f"teacher.seq_len: expected 0 < seq_len < {self.max_position_embeddings}, got {self.seq_len}"
            )


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """``len(tokenizer)`` rounded up to a multiple of 64 (the lm_head's output dimension)."""
    return -(-len(tokenizer) // _BLOCK) * _BLOCK


def build_teacher(tokenizer: PreTrainedTokenizerBase, settings: TeacherSettings) -> LlamaForCausalLM:
    """A freshly initialised Llama (seeded with ``settings.seed``) sized for ``tokenizer``."""
    settings.validate()
    config = LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(config)


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by eos (int64, 1-D)."""
    eos = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids = np.fromiter((t for e in encs for t in (*e.ids, eos)), dtype=np.int64)
    return torch.from_numpy(ids)


def _windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Consecutive windows of seq_len + 1 tokens sharing their boundary token: (n, seq_len + 1)."""
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    if n < 1:
        raise ValueError(f"validation stream of {stream.numel()} tokens is shorter than seq_len + 1")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every target of ``windows`` (n, seq_len + 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size]
        logits = model(input_ids=w[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_loss(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of the windows' targets under the add-one-smoothed unigram of ``train_stream``."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[windows[:, 1:].flatten()].mean())


def train_teacher(
    tokenizer: PreTrainedTokenizerBase,
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TeacherSettings | None = None,
    *,
    progress: bool = True,
    num_threads: int | None = None,
) -> dict:
    """Pretrain the teacher on ``corpus_dir``; save model, tokenizer and report to ``out_dir``; return it.

    ``out_dir`` then loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``;
    ``out_dir/teacher_report.json`` holds the settings, throughput and per-domain validation losses.
    ``num_threads`` sets torch's intra-op threads for the call (the tiny test model runs fastest on one:
    its matrices are too small to split, and on a busy machine spinning OpenMP threads only lose time).
    """
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_teacher(tokenizer, corpus_dir, out_dir, settings, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train_teacher(
    tokenizer: PreTrainedTokenizerBase,
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TeacherSettings | None,
    progress: bool,
) -> dict:
    settings = settings or TeacherSettings()
    t_start = time.perf_counter()
    files = corpus_files(corpus_dir)
    domains = list(files)
    train = {d: tokenize_documents(tokenizer, read_jsonl(tr)) for d, (tr, _) in files.items()}
    valid = {
        d: _windows(tokenize_documents(tokenizer, read_jsonl(va)), settings.seq_len, settings.valid_windows)
        for d, (_, va) in files.items()
    }
    for d, stream in train.items():
        if stream.numel() <= settings.seq_len + 1:
            raise ValueError(f"domain {d!r}: {stream.numel()} training tokens, need > seq_len + 1")

    model = build_teacher(tokenizer, settings)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    logger.info(
        "teacher: Llama %d layers, hidden %d, %d heads, vocab %d, %.2fM params; %d steps x %d x %d tokens",
        settings.num_layers,
        settings.hidden_size,
        settings.num_heads,
        vocab,
        n_params / 1e6,
        settings.steps,
        settings.batch_size,
        settings.seq_len,
    )
    initial = {d: mean_loss(model, w) for d, w in valid.items()}

    # the library's optimizer and schedule: AdamW (no decay on 1-D tensors), warm-up + cosine
    opt, sched = build_optimizer(
        model.parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        max_steps=settings.steps,
        min_lr_ratio=settings.min_lr_ratio,
        betas=(0.9, 0.95),
        decay_1d=False,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    B, T = settings.batch_size, settings.seq_len
    span = torch.arange(T + 1)
    curve: list[list[float]] = []
    model.train()
    tokens_per_step = B * T
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(out, tensorboard=False, domain_names=domains)
    t_train = t_log = time.perf_counter()
    logged_step = 0
    bar = progress_bar(settings.steps, enabled=progress, desc="teacher")
    ema = None
    for step in range(settings.steps):
        rows = []
        for i in range(B):
            stream = train[domains[(step * B + i) % len(domains)]]
            start = int(torch.randint(0, stream.numel() - T, (1,), generator=gen))
            rows.append(stream[start + span])
        batch = torch.stack(rows)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if step % settings.log_every == 0 or step == settings.steps - 1:
            curve.append([step, round(value, 4)])
            now = time.perf_counter()
            rate = tokens_per_step * (step + 1 - logged_step) / max(now - t_log, 1e-9)
            t_log, logged_step = now, step + 1
            metrics.write(
                {"step": step + 1, "loss": value, "lr": sched.get_last_lr()[0], "tokens_per_s": rate}
            )
        bar.set_postfix_str(f"loss {ema:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    metrics.close()
    train_seconds = time.perf_counter() - t_train

    final = {d: mean_loss(model, w) for d, w in valid.items()}
    unigram = {d: unigram_loss(train[d], valid[d], vocab) for d in domains}
    report = {
        "settings": asdict(settings),
        "params": n_params,
        "vocab_size": vocab,
        "tokenizer_size": len(tokenizer),
        "steps": settings.steps,
        "tokens_trained": settings.steps * tokens_per_step,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(settings.steps * tokens_per_step / train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "valid_tokens": {d: int(valid[d][:, 1:].numel()) for d in domains},
        "train_tokens": {d: int(train[d].numel()) for d in domains},
        "valid_loss": final,
        "initial_valid_loss": initial,
        "unigram_loss": unigram,
        "train_loss_curve": curve,
    }
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_losses(report: dict) -> str:
    """A small table: domain, teacher valid loss, unigram baseline, untrained loss."""
    lines = [f"{'domain':<12} {'teacher':>8} {'unigram':>8} {'untrained':>9}"]
    for d, loss in report["valid_loss"].items():
        lines.append(
            f"{d:<12} {loss:>8.3f} {report['unigram_loss'][d]:>8.3f} {report['initial_valid_loss'][d]:>9.3f}"
        )
    return "\n".join(lines)
