"""The DDK distillation loop: a short loop that composes parts with one job each.

* :class:`~.teacher.Teacher` (``teacher.py``): the teacher signal, wherever it comes from (the online model,
  with or without prompts, sharded or not; a top-k or hidden-state cache); the loop asks it for each
  micro-batch's signal and never branches on its source.
* :class:`~.bundle.ModelBundle` (``bundle.py``): the student, the objective module (student forward + fused
  KD loss, ``ddk_fast/models/objective.py``) and its parallel wrapping.
* :class:`~.schedule.DomainSchedule` (``schedule.py``): validation, DDK weights (§3), the sampler.
* :class:`~.checkpointer.Checkpointer` (``checkpointer.py``): save, resume, export.
* :mod:`ddk_fast.distributed`: the process group, DDP / FSDP2 and the collectives; the only place that
  knows about parallelism.
* :class:`~.metrics.MetricsWriter`: ``metrics.jsonl`` / tensorboard (rank 0).
* :class:`~.onpolicy.OnPolicy` (``onpolicy.py``): ``[onpolicy]``, the share of each step's rows the student
  generates before the step (a no-op when off).

One optimizer step (:meth:`Trainer.train_step`) over ``grad_accum`` global micro-batches: the loss of each
micro-batch is its token sum divided by the token count of the whole global batch (all ranks, all
micro-batches), so the gradient is that of the global mean whatever the world size. Loss and per-domain sums
stay on the device; the host reads one flag per step (loss and gradient norm finite on all ranks,
:meth:`Trainer._all_ranks_finite`) and the metrics once per logging interval. A step whose flag is false is
skipped on every rank; the teacher is checked then (:class:`~.nonfinite.TeacherGuard`), so a
non-finite teacher gets its own error instead of being blamed on the student. The same host read carries
the stop request of SIGINT / SIGTERM (:mod:`.signals`): the loop then writes a checkpoint of the step it
finished and raises :class:`~ddk_fast.errors.Interrupted`.

Resume tells the truth: keys that may change on ``--resume`` (learning rate and schedule, cadences: see
``RESUMABLE_KEYS``) take effect from the resumed step (:meth:`Trainer.resume` re-applies the schedule), and
:meth:`Trainer.fit` records the config it trains with, from that step (``config.toml`` and
``config_history.jsonl``, :func:`.runfolder.record_config`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from ..distributed import ParallelContext, full_value, init_parallel, no_grad_sync
from ..errors import Interrupted, RunError, TrainingStopped
from ..models.loading import base_model_record, check_student_tokenizer, load_tokenizer
from ..optim import build_optimizer, lr_lambda, progress_bar
from . import checkpoint as ckpt
from .bundle import ModelBundle, build_models
from .checkpointer import Checkpointer
from .metrics import MetricsWriter
from .nonfinite import step_flags
from .onpolicy import OnPolicy, continuation_teacher_ce
from .runfolder import config_changes, record_config
from .schedule import DomainSchedule
from .signals import NoSignals
from .teacher import Teacher, open_teacher

log = logging.getLogger("ddk_fast")


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
    # [curriculum]: one dict per stage (stage, start, end, domains, active, temperature, kd_weight, ...)
    curriculum: list[dict] = field(default_factory=list)
    # [onpolicy]: settings, generated tokens per domain, generation seconds (empty when off)
    onpolicy: dict = field(default_factory=dict)


def _row_hash(row: np.ndarray) -> int:
    return int.from_bytes(
        hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).digest(), "little"
    )


@dataclass
class _StepStats:
    """One optimizer step's statistics, on the device until :meth:`Trainer._read_stats`."""

    loss: torch.Tensor  # float64 scalar: this rank's share of the global mean loss
    sums: torch.Tensor  # float64 [3, n_domains]: this rank's CE sums, KD sums, token counts
    grad_norm: torch.Tensor
    row_hashes: list[list[int]]  # per micro-batch, this rank's sequence fingerprints (host)
    hidden: torch.Tensor | None = None  # float64 [1 + n_domains]: [hidden] loss share, per-domain sums


_SCHEDULE_KEYS = (
    "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.max_steps", "train.weight_decay"
)  # fmt: skip


class Trainer:
    def __init__(self, cfg: RunConfig, stop=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output.dir)
        self.stop = stop or NoSignals()  # SIGINT / SIGTERM requests (signals.StopSignals), set by the CLI
        self._stop_agreed = False
        self._changes: dict = {}  # keys changed on --resume: recorded with the resumed step

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self, ctx: ParallelContext | None = None) -> None:
        """Build every part. ``ctx``: a parallel context made by the caller (``train.run`` makes it first,
        for its rank-0 pre-flight); by default one is made here."""
        cfg = self.cfg
        if ctx is None:
            ctx = init_parallel(cfg.train.parallel, cfg.data.batch_size, cfg.train.device)
        self.ctx: ParallelContext = ctx
        if ctx.is_main:  # config.toml is written when training starts (fit): what it states is used
            self.run_dir.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.device = ctx.device

        # files and data first: a bad cache, prompts file or domain fails before any model weight is read
        self.tokenizer = load_tokenizer(cfg.model)
        check_student_tokenizer(cfg.model, self.tokenizer)
        self.teacher: Teacher = open_teacher(cfg, self.tokenizer)
        self.schedule = DomainSchedule(cfg, ctx, self.tokenizer)
        self.teacher_guard = self.schedule.teacher_guard
        self.teacher.attach(self.schedule)  # a cache: fits the data and covers the run, else an error here
        self.onpolicy = OnPolicy(cfg, ctx, self.teacher, self.tokenizer.eos_token_id, self.schedule.names)
        self.models: ModelBundle = build_models(cfg, ctx, self.tokenizer, self.run_dir, self.teacher)
        if ctx.rank > 0:  # distinct dropout masks per rank (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.train.seed + ctx.rank)

        t = cfg.train
        self.optimizer, self.scheduler = build_optimizer(
            self.models.trainable(),
            lr=t.lr,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            min_lr_ratio=t.min_lr_ratio,
        )
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.checkpoint.keep_last,
            ctx,
            self.models,
            self.optimizer,
            config=cfg.to_dict(),
            export_projections=cfg.hidden.export_projections,
            final_info={
                **base_model_record(cfg.model, self.run_dir),
                "dtype": str(self.models.dtype).replace("torch.", ""),
            },
        )
        self.step = 0
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.stage = None  # [curriculum]: the stage being trained (its loss config is the objective's)
        self.metrics = None
        if ctx.is_main:
            trackers = cfg.output.trackers
            wandb = (
                {"project": cfg.output.wandb_project, "config": cfg.to_dict()}
                if "wandb" in trackers
                else None
            )
            self.metrics = MetricsWriter(self.run_dir, "tensorboard" in trackers, self.names, wandb)

    # names the report, the CLI and the tests use
    @property
    def names(self) -> list[str]:
        return self.schedule.names

    @property
    def sampler(self):
        return self.schedule.sampler

    @property
    def student(self):
        return self.models.student

    @property
    def prompts(self) -> dict | None:
        """The prompts.json of ``[teacher_prompt] use`` (None without prompts): the report's table."""
        return self.teacher.prompts_data

    @property
    def loss_backend(self):
        return self.models.loss_backend

    @property
    def eval_history(self) -> list[dict]:
        return self.schedule.eval_history

    @property
    def mixer(self):
        return self.schedule.mixer

    @property
    def val_sets(self) -> list[dict]:
        return self.schedule.val_sets

    @property
    def test_sets(self) -> list[dict]:
        return self.schedule.test_sets

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything but the weights and the optimizer (the checkpointer adds those). Collective."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            **self.schedule.state_dict(),
            "bad_total": self.bad_total,
            **self._hidden_state(),
            "teacher_prompts": self.teacher.state_key(),
            **self.onpolicy.state_dict(),
        }

    def _hidden_state(self) -> dict:
        """The [hidden] projections (not part of the student, so not in trainable.safetensors). Under FSDP
        they are in the sharded objective state already."""
        hidden = self.models.objective.hidden
        if hidden is None or self.ctx.mode == "fsdp":
            return {}
        return {"hidden_projections": {k: v.detach().cpu().clone() for k, v in hidden.state_dict().items()}}

    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.state())

    def resume(self, path: Path | None = None) -> bool:
        """Load ``path`` (default: the newest checkpoint that verifies; every rank must pass the same one).
        RunError when there is none, or when the checkpoint does not fit this model, data or settings
        (nothing is trained then)."""
        if path is None:
            loaded = self.checkpointer.load_latest()
            if loaded is None:
                raise RunError(f"--resume: no valid checkpoint in {self.run_dir / 'checkpoints'}")
            path, state = loaded
        else:
            state = self.checkpointer.load(Path(path))
        try:  # a checkpoint of other data or settings is a clear error, not a traceback
            self.scheduler.load_state_dict(state["scheduler"])
            self.schedule.load_state_dict(state)
            self.bad_total = state["bad_total"]
            if state.get("teacher_prompts") != self.teacher.state_key():
                raise ValueError(
                    "its teacher saw other [teacher_prompt] prefixes (a different `use` file or none); "
                    "its teacher losses were measured with them"
                )
            hidden = self.models.objective.hidden
            projections = hidden is not None and any(True for _ in hidden.parameters())
            if projections and "hidden_projections" in state:
                hidden.load_state_dict(state["hidden_projections"])
            elif projections and not ckpt.is_sharded_checkpoint(Path(path)):  # sharded: in the DCP state
                raise KeyError("no [hidden] projections in the checkpoint (written with [hidden] off)")
            self.onpolicy.load_state_dict(state)
            self.step = state["step"]
            ckpt.set_rng_state(state["rng"])
        except (ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {path} cannot be resumed with this config: {exc}") from None
        saved = ckpt.read_manifest(Path(path)).get("config") or {}
        self._changes = config_changes(saved, self.cfg.to_dict())
        if any(k in self._changes for k in _SCHEDULE_KEYS):
            self._apply_schedule()
        if self.ctx.rank > 0:
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + 7919 * self.step)
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
        log.info("resumed from %s (step %d)", path, self.step)
        return True

    def _apply_schedule(self) -> None:
        """After a resume that changed the learning rate or the schedule: the optimizer and the scheduler
        restored the checkpoint's values; the config's take effect from the resumed step."""
        t = self.cfg.train
        scale = lr_lambda(self.scheduler.last_epoch, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.scheduler.base_lrs = [t.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * scale
            group["weight_decay"] = t.weight_decay
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        log.info("resume: learning rate %.3g at step %d (lr %g, schedule to step %d)",
                 t.lr * scale, self.step, t.lr, t.max_steps)  # fmt: skip

    # ------------------------------------------------------------------------------------------ DDK
    def evaluate(self) -> list[float]:
        return self.schedule.evaluate(self.step, self.teacher, self.models)

    def update_weights(self) -> None:
        self.schedule.update(self.step, self.teacher, self.models)

    def evaluate_test(self) -> tuple[list[float], list[float]]:
        return self.schedule.evaluate_test(self.step, self.teacher, self.models)

    def continuation_teacher_ce(self, split: str = "test", writer: str = "student") -> list[float]:
        """The on-policy measure (:func:`~.onpolicy.continuation_teacher_ce`) on ``split``'s prompts."""
        sets = self.test_sets if split == "test" else self.val_sets
        return continuation_teacher_ce(self.models, self.teacher, sets, self.cfg, self.ctx, writer)

    # ------------------------------------------------------------------------------------------ step
    def _loss(self, batch: dict):
        """The objective on one micro-batch (this rank's rows): a :class:`~ddk_fast.KDOutput`."""
        dev = self.device
        ids = torch.as_tensor(batch["input_ids"], device=dev)
        labels = torch.as_tensor(batch["labels"], device=dev)
        dom = torch.as_tensor(batch["domain_ids"], device=dev).reshape(-1)
        hidden = self.models.objective.hidden
        teacher = self.teacher.signal(ids, batch, hidden.teacher_layers if hidden is not None else None)
        if teacher.hidden is not None:  # a dense teacher's states are checked (a sparse one has none)
            self.teacher_guard.observe(self.step, teacher.hidden, batch["domain_ids"], dom)
        return self.models.model(ids, labels, dom, teacher=teacher, **self.onpolicy.loss_kwargs(batch))

    def _all_ranks_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """The non-finite policy's one check: True when the step's loss and gradient norm are finite on
        every rank; with it, whether a rank was asked to stop (``self._stop_agreed``).

        Both are folded into one flag vector on the device and reduced with MIN over ranks, so every rank
        takes the same decisions; reading it is the step's one host sync.
        """
        finite, self._stop_agreed = step_flags(
            loss, grad_norm, self.ctx.all_reduce_min, stop_requested=self.stop.requested
        )
        return finite

    def _global_tokens(self, counts: list[int]) -> torch.Tensor | float:
        """Counted (non-ignored) label tokens of the whole global batch: all micro-batches, all ranks."""
        if not self.ctx.distributed:
            return float(max(1, sum(counts)))
        n = torch.tensor([float(sum(counts))], dtype=torch.float64, device=self.device)
        return self.ctx.all_reduce_sum(n).clamp(min=1).reshape(())

    def train_step(self, batches) -> _StepStats | None:
        """One optimizer step over ``grad_accum`` micro-batches; None when the loss was not finite."""
        c = self.cfg
        G, W = c.train.grad_accum, self.ctx.world_size
        micro = [next(batches) for _ in range(G)]
        self.onpolicy.prepare(self.step, micro, self.models.objective)  # [onpolicy]: the generated rows
        counts = [int((np.asarray(b["labels"]) != -100).sum()) for b in micro]  # host: no device sync
        total = self._global_tokens(counts)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.zeros(3, len(self.names), dtype=torch.float64, device=self.device)
        objective = self.models.objective
        hidden = None
        if objective.hidden is not None:
            hidden = torch.zeros(1 + len(self.names), dtype=torch.float64, device=self.device)
        row_hashes = []
        self.teacher_guard.start_step()
        for i, (batch, n) in enumerate(zip(micro, counts)):
            row_hashes.append([_row_hash(r) for r in np.asarray(batch["input_ids"])])
            # share of the global mean: this micro-batch's token sum over the global token count; x W
            # because DDP / FSDP average gradients over ranks
            scale = n * W / total
            with no_grad_sync(self.models.model, self.ctx, sync=i == G - 1):
                out = self._loss(batch)
                (out.loss * scale).backward()
            loss += out.loss.detach().double() * (n / total)
            sums += torch.stack([out.domain_ce_sum, out.domain_kd_sum, out.domain_tokens]).detach().double()
            self.onpolicy.observe(objective)
            if hidden is not None and objective.last_hidden is not None:
                h, h_domain = objective.last_hidden
                hidden[0] += h.double() * (n / total)
                hidden[1:] += h_domain
        # clip first: a finite loss can still have a NaN/inf gradient, which must not reach the weights
        max_norm = c.train.max_grad_norm if c.train.max_grad_norm > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.models.trainable(), max_norm))
        if not self._all_ranks_finite(loss, grad_norm):
            # a non-finite teacher gets its own error (every rank raises: the counts are all-reduced)
            self.teacher_guard.check(self.step, all_reduce_sum=self.ctx.all_reduce_sum)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _StepStats(loss, sums, grad_norm, row_hashes, hidden)

    def _read_stats(self, stats: _StepStats) -> dict:
        """The metrics row of a step: all-reduced over ranks and read to the host (a logging step only)."""
        ctx = self.ctx
        parts = [stats.loss.reshape(1), stats.sums.reshape(-1)]
        if stats.hidden is not None:
            parts.append(stats.hidden)
        packed = ctx.all_reduce_sum(torch.cat(parts)).cpu()
        n_sums = stats.sums.numel()
        loss, sums = float(packed[0]), packed[1 : 1 + n_sums].reshape(3, -1)
        tok = sums[2].clamp(min=1)
        # the global batch's fingerprint: its sequences in global order (micro-batch, then rank, then row),
        # the same for every world size
        fp = 0
        per_rank = ctx.all_gather_object(stats.row_hashes)
        for m in range(len(stats.row_hashes)):
            for r in range(ctx.world_size):
                for h in per_rank[r][m]:
                    fp = (fp * 1000003 + h) % (1 << 61)
        row = {
            "loss": loss,
            "ce": float(sums[0].sum() / tok.sum()),
            "kd": float(sums[1].sum() / tok.sum()),
            "grad_norm": float(full_value(stats.grad_norm)),
            "domain_ce": (sums[0] / tok).tolist(),
            "domain_kd": (sums[1] / tok).tolist(),
            "domain_tokens": sums[2].long().tolist(),
            "batch_fingerprint": fp,
        }
        if stats.hidden is not None:  # [hidden]: the mean hidden-state loss (unweighted), and per domain
            h = packed[1 + n_sums :]
            row["hidden"] = float(h[0])
            row["domain_hidden"] = (h[1:] / tok).tolist()
        return row

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to ``[train] max_steps`` (or ``stop_at``, a test hook that simulates an interruption)."""
        c, t = self.cfg, self.cfg.train
        end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
        tokens_per_step = c.data.batch_size * c.data.seq_len * t.grad_accum  # global
        bar = progress_bar(t.max_steps, initial=self.step, enabled=c.output.progress and self.ctx.is_main)
        t_start, tokens_done = time.perf_counter(), 0
        t_log, steps_since_log = time.perf_counter(), 0
        if self.ctx.is_main:  # what this start trains with, from this step (and what was changed on resume)
            record_config(self.run_dir, c, self.step, self._changes)
        if self.stop.requested:  # a signal came while the run was being set up: nothing trained yet
            raise Interrupted(self.stop.signum, self.step, None)
        batches = self._batches()
        try:
            while self.step < end:
                if self.schedule.due(self.step):
                    batches.close()
                    self.update_weights()
                    batches = self._batches()
                self._enter_stage()
                stats = self.train_step(batches)
                if stats is None:
                    if self._stop_agreed:
                        self._interrupt(bar)
                    self._skipped()
                    continue
                self.bad_in_a_row = 0
                self.step += 1
                tokens_done += tokens_per_step
                steps_since_log += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    row = self._read_stats(stats)
                    row.update(
                        step=self.step,
                        lr=self.scheduler.get_last_lr()[0],
                        tokens_per_s=tokens_per_step * steps_since_log / max(now - t_log, 1e-9),
                        weights=list(self.sampler.weights),
                        bad_steps=self.bad_total,
                    )
                    row.update(self.onpolicy.metrics(now - t_log))
                    if self.stage is not None:
                        row.update(
                            self.schedule.curriculum.metrics(self.stage, self.models.objective.loss_cfg)
                        )
                    t_log, steps_since_log = now, 0
                    if self.metrics is not None:
                        self.metrics.write(row)
                    hid = f"hid {row['hidden']:.3f} " if "hidden" in row else ""
                    bar.set_postfix_str(
                        f"loss {row['loss']:.3f} ce {row['ce']:.3f} kd {row['kd']:.3f} {hid}"
                        f"{row['tokens_per_s']:,.0f} tok/s "
                        f"w=[{' '.join(f'{w:.2f}' for w in row['weights'])}]"
                        + (f" stage {row['stage']} T={row['temperature']:.2f}" if "stage" in row else "")
                        + self.onpolicy.postfix(row)
                    )
                saved = self.step % c.checkpoint.every == 0 and self.step < t.max_steps
                if saved:
                    self.save()
                if self._stop_agreed and self.step < end:
                    self._interrupt(bar, saved)
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
        onpolicy = self.onpolicy.summary()  # collective
        if onpolicy and test_losses:  # the on-policy measure on the test prompts (collective)
            onpolicy["test_continuation_teacher_ce"] = self.continuation_teacher_ce("test")
        if self.metrics is not None:
            self.metrics.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            eval_history=self.eval_history,
            weight_history=self.schedule.mixer.history,
            teacher_losses=self.schedule.teacher_losses or [],
            bad_steps=self.bad_total,
            tokens_per_domain=self.schedule.tokens_per_domain(),
            tokens_per_second=tokens_done / wall if wall > 0 else 0.0,
            wall_seconds=wall,
            test_losses=test_losses,
            teacher_test_losses=teacher_test,
            collapsed_updates=self.schedule.collapsed_updates(),
            curriculum=self.schedule.curriculum.table(c.loss) if self.schedule.curriculum.enabled else [],
            onpolicy=onpolicy,
        )

    def _interrupt(self, bar, saved: bool = False) -> None:
        """SIGINT / SIGTERM: the step is finished; write its checkpoint (unless just written) and stop."""
        bar.close()
        path = None
        if self.step > 0:
            path = (self.run_dir / "checkpoints" / f"step_{self.step:08d}") if saved else self.save()
        if self.metrics is not None:
            self.metrics.close()
        raise Interrupted(self.stop.signum or 15, self.step, path)

    def _enter_stage(self) -> None:
        """[curriculum]: at a stage change (and on the first step of a run or a resume) give the objective
        the stage's loss config; every rank derives the same stage from the step."""
        cur = self.schedule.curriculum
        if not cur.enabled:
            return
        stage = cur.stage_at(self.step)
        if stage is self.stage:
            return
        self.stage = stage
        loss = cur.loss_config(stage, self.cfg.loss)
        self.models.objective.loss_cfg = loss
        log.info(
            "step %d: curriculum stage %d/%d (steps %d-%d): domains %s; T %g, kd_weight %g%s",
            self.step,
            stage.index,
            len(cur.stages),
            stage.start + 1,
            stage.end,
            ", ".join(self.names[i] for i in cur.active(stage)),
            loss.temperature,
            loss.kd_weight,
            ", T^2 scaling" if loss.scale_by_t2 else "",
        )

    def _skipped(self) -> None:
        """A non-finite step (the same decision on every rank): count it, stop after too many in a row."""
        self.bad_in_a_row += 1
        self.bad_total += 1
        log.warning(
            "step %d: non-finite loss or gradient norm, step skipped (%d in a row)",
            self.step,
            self.bad_in_a_row,
        )
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_in_a_row} consecutive non-finite losses at step {self.step}; "
                f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
            )

    def _batches(self):
        d = self.cfg.data
        if d.prefetch > 0:
            return self.sampler.prefetch(depth=d.prefetch)
        return _Plain(self.sampler)

    def export(self) -> Path:
        """The final student in Hugging Face format: adapters (peft) or the full model, plus the tokenizer."""
        return self.checkpointer.export(self.tokenizer, self.cfg.model.student_mode)

    def close(self) -> None:
        """Leave the process group (when this trainer created it)."""
        self.ctx.close()


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
