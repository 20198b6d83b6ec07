"""The DDK distillation loop: config -> data -> models -> loss -> loop -> checkpoint/report.

The loop itself holds no data, loss or kernel code: batches come from :class:`~ddk_fast.data.DomainSampler`,
the loss from :func:`ddk_fast.fused_linear_kd_loss` (hidden states + lm_head weights, so no [tokens x vocab]
logits exist), the domain weights from :class:`~ddk_fast.ddk.DomainMixer` (DDK §3), per-domain validation
losses from :mod:`ddk_fast.evaluation`, persistence from :mod:`ddk_fast.checkpoint`.

Schedule of one run (K = ``[ddk] interval``): at step 0 the teacher's per-domain validation losses are
measured once (the teacher is frozen) and the student's too, giving r_0 (Eq. 1); every K steps the student
is re-measured and the weights are smoothly updated (Eq. 2); the sampler draws the next K steps' sequences
with those weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .backend import resolve_loss_backend
from .config import RunConfig, dump_toml
from .ddk import COLLAPSE_WEIGHT, DomainMixer
from .evaluation import domain_losses
from .losses import fused_linear_kd_loss
from .models import (
    check_student_tokenizer,
    check_vocab,
    final_hidden,
    head_weight,
    load_student,
    load_teacher,
    load_tokenizer,
    resolve_dtype,
    trainable_parameters,
)

log = logging.getLogger("ddk_fast")


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval_history: list[dict] = field(default_factory=list)
    weight_history: list[dict] = field(default_factory=list)
    teacher_losses: list[float] = field(default_factory=list)
    bad_steps: int = 0
    tokens_per_domain: list[int] = field(default_factory=list)
    tokens_per_second: float = 0.0
    wall_seconds: float = 0.0
    # end of run, on the test split (never seen by DDK): student and teacher mean CE per domain
    test_losses: list[float] = field(default_factory=list)
    teacher_test_losses: list[float] = field(default_factory=list)
    collapsed_updates: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("train.device", name, "auto or cpu: no CUDA device is available here")
    return dev


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``min_ratio`` (DDK §4 schedule)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MetricsWriter:
    """``metrics.jsonl`` (always) and tensorboard events (when installed and enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool, domain_names: list[str]):
        self.path = run_dir / "metrics.jsonl"
        self.names = domain_names
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing or broken: metrics.jsonl is enough
                log.info("tensorboard disabled: %s", exc)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])
                elif isinstance(v, list) and len(v) == len(self.names):
                    for name, x in zip(self.names, v):
                        if isinstance(x, (int, float)):
                            self.tb.add_scalar(f"{k}/{name}", x, row["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be produced again)."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir)

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from .data import DomainSampler, prepare_domains, validation_batches

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(dump_toml(cfg))
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.model, self.device)

        # data first: a bad domain is an error before any model weight is read
        self.tokenizer = load_tokenizer(cfg.model)
        check_student_tokenizer(cfg.model, self.tokenizer)
        d = cfg.data
        self.domains = prepare_domains(
            d.domains,
            self.tokenizer,
            d.cache_dir,
            seq_len=d.seq_len,
            val_sequences=d.val_sequences,
            test_sequences=d.test_sequences or d.val_sequences,
            seed=d.split_seed,
        )
        self.names = [dom.name for dom in self.domains]
        sep = self.tokenizer.eos_token_id
        self.val_sets = [
            validation_batches(dom.val, d.seq_len, d.val_sequences, sep, i)
            for i, dom in enumerate(self.domains)
        ]
        # the test split is packed here but only scored after the last step: it never steers DDK
        self.test_sets = [
            validation_batches(dom.test, d.seq_len, d.test_sequences or d.val_sequences, sep, i)
            for i, dom in enumerate(self.domains)
        ]
        self.mixer = DomainMixer(
            len(self.domains),
            cfg.ddk.mixing,
            cfg.ddk.alpha,
            cfg.ddk.smoothing,
            [dom.weight for dom in d.domains],
            factor=cfg.ddk.factor,
            factor_temperature=cfg.ddk.factor_temperature,
            max_weight=cfg.ddk.max_weight,
        )
        self.sampler = DomainSampler(
            [dom.train for dom in self.domains],
            self.mixer.initial(),
            seq_len=d.seq_len,
            batch_size=d.batch_size,
            sep_token_id=sep,
            seed=cfg.train.seed,
            backend=d.sampler_backend,
        )

        self.teacher = load_teacher(cfg.model, self.device, self.dtype, cfg.train.seed)
        self.student = load_student(
            cfg.model, self.teacher, self.device, self.dtype, self.run_dir, cfg.train.seed
        )
        self.vocab_size = check_vocab(self.teacher, self.student, self.tokenizer)
        self.loss_backend = resolve_loss_backend(cfg.loss.backend, self.device.type == "cuda")
        n_train, n_total = trainable_parameters(self.student)
        log.info(
            "device %s, dtype %s; student %s: %s trainable of %s parameters",
            self.device,
            str(self.dtype).replace("torch.", ""),
            cfg.model.student_mode,
            f"{n_train:,}",
            f"{n_total:,}",
        )
        log.info("loss backend: %s", self.loss_backend)
        log.info("sampler backend: %s", self.sampler.backend)
        log.info(
            "domains: %s",
            ", ".join(f"{dom.name} ({dom.train.num_tokens:,} train tokens)" for dom in self.domains),
        )

        params = [p for p in self.student.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        self.step = 0
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.eval_history: list[dict] = []
        self.teacher_losses: list[float] | None = None
        self.metrics = MetricsWriter(self.run_dir, cfg.output.tensorboard, self.names)

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "sampler": self.sampler.state_dict(),
            "mixer": self.mixer.state_dict(),
            "eval_history": self.eval_history,
            "teacher_losses": self.teacher_losses,
            "bad_total": self.bad_total,
        }

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.student, self.state(), self.cfg.checkpoint.keep_last
        )
        log.info("checkpoint: %s", path)
        return path

    def resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from step 0", self.run_dir / "checkpoints")
            return False
        state = ckpt.load_checkpoint(path, self.student)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.mixer.load_state_dict(state["mixer"])
        self.eval_history = state["eval_history"]
        self.teacher_losses = state["teacher_losses"]
        self.bad_total = state["bad_total"]
        self.step = state["step"]
        ckpt.set_rng_state(state["rng"])
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s (step %d)", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------ DDK
    def evaluate(self) -> list[float]:
        c = self.cfg
        if self.teacher_losses is None:  # the teacher is frozen: measured once (DDK §3 step 1)
            self.teacher_losses = domain_losses(
                self.teacher, self.val_sets, self.device, self.vocab_size, c.ddk.eval_batch_size
            )
        student = domain_losses(
            self.student, self.val_sets, self.device, self.vocab_size, c.ddk.eval_batch_size
        )
        self.eval_history.append({"step": self.step, "student_loss": student})
        gaps = ", ".join(f"{n} {s:.3f}/{t:.3f}" for n, s, t in zip(self.names, student, self.teacher_losses))
        log.info("step %d validation CE student/teacher: %s", self.step, gaps)
        return student

    def update_weights(self) -> None:
        student = self.evaluate()
        weights = self.mixer.update(self.step, student, self.teacher_losses)
        self.sampler.set_weights(weights)
        log.info(
            "step %d domain weights: %s",
            self.step,
            ", ".join(f"{n} {w:.3f}" for n, w in zip(self.names, weights)),
        )
        if self.mixer.collapsed:
            top = max(range(len(weights)), key=weights.__getitem__)
            log.warning(
                "step %d: the DDK factor collapsed onto domain %s (weight %.3f > %.1f): the next %d steps "
                "train almost only on it. With large student-teacher gaps prefer [ddk] factor = "
                '"excess_loss" (or a larger factor_temperature, or max_weight < 1).',
                self.step,
                self.names[top],
                weights[top],
                COLLAPSE_WEIGHT,
                self.cfg.ddk.interval,
            )

    def evaluate_test(self) -> tuple[list[float], list[float]]:
        """Student and teacher mean CE per domain on the test split (reported only; never steers)."""
        c = self.cfg
        args = (self.test_sets, self.device, self.vocab_size, c.ddk.eval_batch_size)
        teacher = domain_losses(self.teacher, *args)
        student = domain_losses(self.student, *args)
        gaps = ", ".join(f"{n} {s:.3f}/{t:.3f}" for n, s, t in zip(self.names, student, teacher))
        log.info("step %d test CE student/teacher: %s", self.step, gaps)
        return student, teacher

    # ------------------------------------------------------------------------------------------ step
    def _loss(self, batch: dict):
        c = self.cfg
        ids = torch.as_tensor(batch["input_ids"], device=self.device)
        labels = torch.as_tensor(batch["labels"], device=self.device).reshape(-1)
        dom = torch.as_tensor(batch["domain_ids"], device=self.device).reshape(-1)
        with torch.no_grad():
            t_hidden = final_hidden(self.teacher, ids)
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.dtype == torch.bfloat16
        )
        with autocast:
            s_hidden = final_hidden(self.student, ids)
        L = c.loss
        return fused_linear_kd_loss(
            s_hidden.reshape(-1, s_hidden.shape[-1]),
            head_weight(self.student),
            t_hidden.reshape(-1, t_hidden.shape[-1]),
            head_weight(self.teacher),
            labels=labels,
            domain_ids=dom,
            num_domains=len(self.names),
            divergence=L.divergence,
            beta=L.beta,
            skew_lambda=L.skew_lambda,
            temperature=L.temperature,
            kd_weight=L.kd_weight,
            ce_weight=L.ce_weight,
            scale_by_t2=L.scale_by_t2,
            backend=self.loss_backend.name,
        )

    def train_step(self, batches) -> dict | None:
        """One optimizer step over ``grad_accum`` micro-batches; None when the loss was not finite."""
        c = self.cfg
        n_dom = len(self.names)
        sums = {k: torch.zeros(n_dom, dtype=torch.float64) for k in ("ce", "kd", "tokens")}
        loss_total, fingerprint = 0.0, 0
        for _ in range(c.train.grad_accum):
            batch = next(batches)
            fingerprint = (fingerprint * 1000003 + int(np.asarray(batch["input_ids"]).sum())) % (1 << 61)
            out = self._loss(batch)
            (out.loss / c.train.grad_accum).backward()
            loss_total += float(out.loss.detach()) / c.train.grad_accum  # the loop's one host sync
            sums["ce"] += out.domain_ce_sum.detach().double().cpu()
            sums["kd"] += out.domain_kd_sum.detach().double().cpu()
            sums["tokens"] += out.domain_tokens.detach().double().cpu()
        if not math.isfinite(loss_total):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, c.train.max_grad_norm if c.train.max_grad_norm > 0 else float("inf")
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tok = sums["tokens"].clamp(min=1)
        return {
            "loss": loss_total,
            "ce": float(sums["ce"].sum() / tok.sum()),
            "kd": float(sums["kd"].sum() / tok.sum()),
            "grad_norm": float(grad_norm),
            "domain_ce": (sums["ce"] / tok).tolist(),
            "domain_kd": (sums["kd"] / tok).tolist(),
            "domain_tokens": sums["tokens"].long().tolist(),
            "batch_fingerprint": fingerprint,
        }

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to ``[train] max_steps`` (or ``stop_at``, a test hook that simulates an interruption)."""
        from tqdm.auto import tqdm

        c = self.cfg
        t = c.train
        K = c.ddk.interval
        end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
        tokens_per_step = c.data.batch_size * c.data.seq_len * t.grad_accum
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not c.output.progress,
            unit="step",
            dynamic_ncols=True,
        )
        t_start, tokens_done = time.perf_counter(), 0
        batches = self._batches()
        try:
            while self.step < end:
                if self.step % K == 0 and not any(h["step"] == self.step for h in self.mixer.history):
                    batches.close()
                    self.update_weights()
                    batches = self._batches()
                t0 = time.perf_counter()
                row = self.train_step(batches)
                if row is None:
                    self.bad_in_a_row += 1
                    self.bad_total += 1
                    log.warning(
                        "step %d: non-finite loss, step skipped (%d in a row)", self.step, self.bad_in_a_row
                    )
                    if self.bad_in_a_row >= t.max_bad_steps:
                        raise TrainingStopped(
                            f"{self.bad_in_a_row} consecutive non-finite losses at step {self.step}; "
                            f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
                        )
                    continue
                self.bad_in_a_row = 0
                self.step += 1
                dt = time.perf_counter() - t0
                tokens_done += tokens_per_step
                row.update(
                    step=self.step,
                    lr=self.scheduler.get_last_lr()[0],
                    tokens_per_s=tokens_per_step / dt,
                    weights=list(self.sampler.weights),
                    bad_steps=self.bad_total,
                )
                if self.step % t.log_every == 0 or self.step == end:
                    self.metrics.write(row)
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {row['loss']:.3f} ce {row['ce']:.3f} kd {row['kd']:.3f} "
                    f"{row['tokens_per_s']:,.0f} tok/s w=[{' '.join(f'{w:.2f}' for w in row['weights'])}]"
                )
                if self.step % c.checkpoint.every == 0 and self.step < t.max_steps:
                    self.save()
        finally:
            batches.close()
            bar.close()
        wall = time.perf_counter() - t_start
        test_losses, teacher_test = [], []
        if self.step >= t.max_steps:
            if not self.eval_history or self.eval_history[-1]["step"] != self.step:
                self.evaluate()
            test_losses, teacher_test = self.evaluate_test()
            self.save()
            self.export()
        self.metrics.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            eval_history=self.eval_history,
            weight_history=self.mixer.history,
            teacher_losses=self.teacher_losses or [],
            bad_steps=self.bad_total,
            tokens_per_domain=list(map(int, self.sampler.tokens_per_domain)),
            tokens_per_second=tokens_done / wall if wall > 0 else 0.0,
            wall_seconds=wall,
            test_losses=test_losses,
            teacher_test_losses=teacher_test,
            collapsed_updates=sum(
                len(h["weights"]) > 1 and max(h["weights"]) > COLLAPSE_WEIGHT for h in self.mixer.history
            ),
        )

    def _batches(self):
        d = self.cfg.data
        if d.prefetch > 0:
            return self.sampler.prefetch(depth=d.prefetch)
        return _Plain(self.sampler)

    def export(self) -> Path:
        """The final student in Hugging Face format: adapters (peft) or the full model, plus the tokenizer."""
        out = self.run_dir / "final"
        tmp = self.run_dir / "final.tmp"
        self.student.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        log.info("final student (%s): %s", self.cfg.model.student_mode, out)
        return out


class _Plain:
    """``next_batch`` as a closable iterator (the no-prefetch twin of ``sampler.prefetch``)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __next__(self):
        return self.sampler.next_batch()

    def __iter__(self):
        return self

    def close(self) -> None:
        pass
