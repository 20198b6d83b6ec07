"""The domain schedule: DDK's measurement and re-weighting (§3), and the sampler that follows the weights.

It owns the prepared domains, the fixed validation sets (and the test sets, scored once at the end; they
never steer anything), the :class:`~ddk_fast.ddk.DomainMixer` and the
:class:`~ddk_fast.data.DomainSampler`. At step 0 the teacher's per-domain validation losses are measured once
(the teacher is frozen) and the student's too, giving r_0 (Eq. 1); every K = ``[ddk] interval`` steps the
student is re-measured and the weights smoothly updated (Eq. 2); the sampler draws the next K steps with them.

Across ranks: validation is shared out and all-reduced (:func:`..models.evaluation.domain_ce_sums`), so every
rank derives the same weights from the same float64 sums; :meth:`DomainSchedule.update` checks that they are
bit-identical on all ranks. The sampler walks the global micro-batch (``[data] batch_size`` sequences) and
each rank materialises its ``batch_size / world_size`` rows, so the global batch of a step does not depend on
the world size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import RunConfig
from ..data import DomainSampler, prepare_config_domains
from ..ddk import COLLAPSE_WEIGHT, DomainMixer, collapse_advice
from ..distributed import ParallelContext
from ..models.evaluation import ScoreFn
from .curriculum import Curriculum
from .nonfinite import TeacherGuard
from .scoring import mean_losses, score_sets, split_sets

log = logging.getLogger("ddk_fast")


class DomainSchedule:
    def __init__(self, cfg: RunConfig, ctx: ParallelContext, tokenizer):
        self.cfg, self.ctx = cfg, ctx
        d = cfg.data
        self.domains = ctx.main_first(lambda: prepare_config_domains(d, tokenizer))
        self.names = [dom.name for dom in self.domains]
        sep = tokenizer.eos_token_id
        self.val_sets = split_sets(self.domains, d, sep, "val")
        # the test split is packed here but only scored after the last step: it never steers DDK
        self.test_sets = split_sets(self.domains, d, sep, "test")
        self.mixer = DomainMixer(
            len(self.domains),
            cfg.ddk.mixing,
            cfg.ddk.alpha,
            cfg.ddk.smoothing,
            [dom.weight for dom in d.domains],
            factor=cfg.ddk.factor,
            factor_temperature=cfg.ddk.factor_temperature,
            max_weight=cfg.ddk.max_weight,
            min_weight=cfg.ddk.min_weight,
        )
        self.sampler = DomainSampler(
            [dom.train for dom in self.domains],
            self.mixer.initial(),
            seq_len=d.seq_len,
            batch_size=d.batch_size // ctx.world_size,
            sep_token_id=sep,
            seed=cfg.train.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            backend=d.sampler_backend,
        )
        # [curriculum]: the stages (enabled False: none, and the weights are the mixer's over every domain)
        self.curriculum = Curriculum(cfg, self.names)
        self.teacher_losses: list[float] | None = None
        self.eval_history: list[dict] = []
        # the teacher's non-finite checks: its validation losses here, its training forwards in the loop
        self.teacher_guard = TeacherGuard(self.names)
        log.info("sampler backend: %s", self.sampler.backend)
        log.info(
            "domains: %s",
            ", ".join(f"{dom.name} ({dom.train.num_tokens:,} train tokens)" for dom in self.domains),
        )

    # -- measurement ------------------------------------------------------------------------------
    def _losses(self, score: ScoreFn, sets: list[dict], device) -> list[float]:
        """The one measurement path (val and test splits, teacher and student), shared over the ranks."""
        sums = score_sets(
            score,
            sets,
            device,
            self.cfg.ddk.eval_batch_size,
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.all_reduce_sum if self.ctx.distributed else None,
            lockstep=self.ctx.mode == "fsdp",
        )
        return mean_losses(sums)

    def _teacher_losses(self, split: str, teacher) -> list[float]:
        """The teacher's CE per domain on ``split``, from whatever source it has (the teacher decides)."""
        sets = self.val_sets if split == "val" else self.test_sets
        return teacher.domain_losses(split, lambda score: self._losses(score, sets, teacher.device))

    def _student_losses(self, sets: list[dict], models) -> list[float]:
        was_training = models.model.training
        models.model.eval()
        try:
            return self._losses(models.student_score(), sets, models.device)
        finally:
            models.model.train(was_training)

    def evaluate(self, step: int, teacher, models) -> list[float]:
        """Student (and, the first time, teacher) validation CE per domain; recorded in ``eval_history``."""
        if self.teacher_losses is None:  # the teacher is frozen: measured once (DDK §3 step 1)
            self.teacher_losses = self._teacher_losses("val", teacher)
            self.teacher_guard.check_losses(step, self.teacher_losses)  # its own error, not the student's
        student = self._student_losses(self.val_sets, models)
        self.eval_history.append({"step": step, "student_loss": student})
        gaps = ", ".join(f"{n} {s:.3f}/{t:.3f}" for n, s, t in zip(self.names, student, self.teacher_losses))
        log.info("step %d validation CE student/teacher: %s", step, gaps)
        return student

    def due(self, step: int) -> bool:
        """A DDK update is due at every multiple of K, and at every curriculum stage start, not yet done (a
        resumed run may have done it)."""
        at = step % self.cfg.ddk.interval == 0 or self.curriculum.is_boundary(step)
        return at and not any(h["step"] == step for h in self.mixer.history)

    def update(self, step: int, teacher, models) -> list[float]:
        student = self.evaluate(step, teacher, models)
        cur = self.curriculum
        if not cur.enabled:
            weights = self.mixer.update(step, student, self.teacher_losses)
        else:  # over the active domains only (inactive: exactly 0), then the replay floor
            if cur.needs_ranking:  # at step 0: easiest (lowest CE) first
                order = cur.rank(self.teacher_losses, student)
                log.info(
                    "curriculum: domains ranked by %s: %s", cur.order, ", ".join(self.names[i] for i in order)
                )
            weights = cur.weights(self.mixer, step, student, self.teacher_losses)
        if self.ctx.distributed:  # derived from all-reduced sums: must agree to the last bit
            seen = self.ctx.all_gather_object([float(w) for w in weights])
            if any(s != seen[0] for s in seen):
                raise RuntimeError(f"step {step}: domain weights differ between ranks: {seen}")
        self.sampler.set_weights(weights)
        log.info(
            "step %d domain weights: %s", step, ", ".join(f"{n} {w:.3f}" for n, w in zip(self.names, weights))
        )
        if self.mixer.collapsed and cur.num_active(step) > 1:
            share = self.mixer.factor_share or weights
            top = max(range(len(share)), key=share.__getitem__)
            log.warning(
                "step %d: the DDK factor collapsed onto domain %s (factor share %.3f > %.1f before the "
                "floor; weight %.3f for the next %d steps). %s",
                step,
                self.names[top],
                share[top],
                COLLAPSE_WEIGHT,
                weights[top],
                self.cfg.ddk.interval,
                collapse_advice(self.cfg.ddk.factor),
            )
        return weights

    def evaluate_test(self, step: int, teacher, models) -> tuple[list[float], list[float]]:
        """Student and teacher mean CE per domain on the test split (reported only; never steers)."""
        teacher_ce = self._teacher_losses("test", teacher)
        student = self._student_losses(self.test_sets, models)
        gaps = ", ".join(f"{n} {s:.3f}/{t:.3f}" for n, s, t in zip(self.names, student, teacher_ce))
        log.info("step %d test CE student/teacher: %s", step, gaps)
        return student, teacher_ce

    def collapsed_updates(self) -> int:
        n_active = self.curriculum.num_active
        return sum(
            n_active(h["step"]) > 1 and max(h.get("factor", h["weights"])) > COLLAPSE_WEIGHT
            for h in self.mixer.history
        )

    # -- accounting and state ---------------------------------------------------------------------
    def tokens_per_domain(self) -> list[int]:
        """Training tokens drawn per domain over all ranks (a collective when distributed)."""
        local = np.asarray(self.sampler.sequences_per_domain, dtype=np.float64)
        if self.ctx.distributed:
            t = torch.as_tensor(local, device=self.ctx.device)
            local = self.ctx.all_reduce_sum(t).cpu().numpy()
        return [int(x) * self.cfg.data.seq_len for x in local]

    def state_dict(self) -> dict:
        """Sampler state with the global per-domain counters (a collective when distributed)."""
        sampler = self.sampler.state_dict()
        sampler["sequences_per_domain"] = [x // self.cfg.data.seq_len for x in self.tokens_per_domain()]
        state = {
            "sampler": sampler,
            "mixer": self.mixer.state_dict(),
            "eval_history": self.eval_history,
            "teacher_losses": self.teacher_losses,
        }
        if self.curriculum.enabled:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume, also under another world size: the sampler state is global; rank 0 takes the counters."""
        sampler = dict(state["sampler"])
        if not self.ctx.is_main:
            sampler["sequences_per_domain"] = [0] * len(self.names)
        self.sampler.load_state_dict(sampler)
        self.mixer.load_state_dict(state["mixer"])
        self.eval_history = state["eval_history"]
        self.teacher_losses = state["teacher_losses"]
        if self.curriculum.enabled:
            if "curriculum" not in state:
                raise KeyError("no [curriculum] state in the checkpoint (written without [curriculum])")
            self.curriculum.load_state_dict(state["curriculum"])
        elif "curriculum" in state:
            raise ValueError("the checkpoint was written with [curriculum] stages, this config has none")
