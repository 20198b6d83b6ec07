"""On-policy distillation in the library's loop (``[onpolicy]``), DDK choosing where the student practises.

GKD (Agarwal et al. 2024) trains the student on sequences it wrote itself, scored by the teacher. Here a share
λ = ``[onpolicy] fraction`` of every optimizer step's sequences becomes on-policy, inside the usual batch:

1. **Which rows** (:meth:`OnPolicy.plan`): the step's global batch is walked in its global order (micro-batch,
   rank, row), the same for every world size; sequence number j of the run (``step * S + index``, S the
   step's sequences) is generated when ``floor((j + 1) λ) > floor(j λ)``. Every step gets floor or ceil of
   ``λ S`` generated sequences, the long-run share is exactly λ, and nothing needs state.
2. **Prompts**: the first ``prompt_tokens`` tokens of those rows. The sampler drew each row's domain with the
   DDK weights, so DDK decides which domains the student practises on, as it decides what it reads.
3. **Generation** (:meth:`OnPolicy.prepare`): each rank's generated rows of the whole step go through the
   student's ``generate`` together (chunks of ``generate_batch_size``), through the objective module (so
   FSDP gathers a sharded student; ranks run the same number of calls), in eval mode, under ``no_grad``,
   with the KV cache and the adapters active (``ddk_fast/models/generation.py``: a counter-based sampler,
   keyed by (seed, step, index), so a resumed run or another world size generates the same tokens).
4. **Rows rewritten in place**: ``prompt + generation`` then padding; labels only on the generated tokens
   (the positions ``prompt_tokens - 1 ..`` that predict them), ``-100`` elsewhere; the micro-batch carries
   ``kd_only_rows``. The teacher scores the whole micro-batch in its usual single forward, and the objective
   gives those rows the KD term alone (no CE on tokens without a reference), while the other rows keep CE +
   KD; the trainer's global-mean normalisation counts every labelled token once.
5. **Accounting**: per-domain KD sums and token counts of the generated tokens, logged beside the
   off-policy ones (``metrics.jsonl``: ``onpolicy_kd``, ``domain_onpolicy_kd``, ``domain_onpolicy_tokens``,
   ``gen_tokens_per_s``, ``gen_time_share``; the report); the generated tokens per domain in the
   checkpoint. DDK's measurement (validation CE) does not change.

:func:`continuation_teacher_ce` is the on-policy measure of a student: the teacher's per-token CE on the
student's own continuations of held-out prompts (lower: the student writes what the teacher would).

Why the prompt's KV cache is not reused: the student's cache from ``generate`` was computed under
``no_grad`` in eval mode, and the training forward needs gradients through the prompt positions (the
generated tokens attend to them); the teacher never saw the prompt, so it has no cache to reuse: it scores
prompt + generation in one forward, as every other row.
"""

from __future__ import annotations

import logging
import math
import time
from fractions import Fraction

import numpy as np
import torch

from ..config import RunConfig
from ..distributed import ParallelContext
from ..errors import ConfigError
from ..models.evaluation import head_ce_sum, sharded_domain_losses
from ..models.generation import SampleSpec, content_keys, sample_continuations, sequence_key
from .bundle import ModelBundle
from .teacher import Teacher

log = logging.getLogger("ddk_fast")

IGNORE = -100


class OnPolicy:
    """The on-policy part of a run (module doc). With ``[onpolicy] fraction = 0`` every method is a no-op
    and the run is the off-policy one, bit for bit."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, teacher: Teacher, pad_token_id: int, names):
        op = cfg.onpolicy
        self.cfg, self.ctx, self.names = op, ctx, list(names)
        self.enabled = op.enabled
        if self.enabled and not teacher.can_score_new_tokens:
            raise ConfigError(
                "onpolicy.fraction",
                op.fraction,
                f"0 with this teacher ({teacher.describe()}): it cannot score the tokens the student "
                "generates; train with the online teacher",
            )
        self.share = Fraction(str(op.fraction))  # exact: 0.3 is 3/10, not the nearest binary fraction
        self.spec = SampleSpec(op.max_new_tokens, op.temperature, op.top_p, int(pad_token_id))
        self.pad = int(pad_token_id)
        self.global_batch = cfg.data.batch_size
        self.local_batch = cfg.data.batch_size // ctx.world_size
        self.grad_accum = cfg.train.grad_accum
        self.generated = np.zeros(len(self.names), dtype=np.int64)  # this rank's (+ a checkpoint's) tokens
        self.gen_seconds = 0.0  # this process's time in generation, whole run
        self._window = [0, 0.0]  # generated tokens, seconds since the last metrics row (this rank)
        self._sums: torch.Tensor | None = None  # [2, D] of the current step: KD sums, token counts
        if self.enabled:
            log.info(
                "on-policy: %.3g of each step's sequences generated by the student (prompt %d tokens, %d "
                "new, T %g, top_p %g); KD only on generated tokens",
                op.fraction, op.prompt_tokens, op.max_new_tokens, op.temperature, op.top_p,
            )  # fmt: skip

    # ----------------------------------------------------------------------------------------- which rows
    def _generated(self, j: int) -> bool:
        return math.floor((j + 1) * self.share) > math.floor(j * self.share)

    def plan(self, step: int, rank: int | None = None) -> list[list[tuple[int, int]]]:
        """Per micro-batch, the generated rows of ``rank`` (default: this one) at ``step`` as (row in the
        rank's micro-batch, index in the step's global batch)."""
        rank = self.ctx.rank if rank is None else rank
        per_step = self.grad_accum * self.global_batch
        out = []
        for m in range(self.grad_accum):
            first = m * self.global_batch + rank * self.local_batch
            out.append(
                [
                    (b, first + b)
                    for b in range(self.local_batch)
                    if self._generated(step * per_step + first + b)
                ]
            )
        return out

    def _calls(self, step: int, n_mine: int) -> tuple[int, int]:
        """(generate calls, rows per call). Under FSDP every rank makes the same number of calls (each
        decoding step's forward gathers the sharded layers: a collective); ranks with fewer rows pad with
        discarded calls. The plan is global, so every rank computes every rank's count without talking."""
        chunk = self.cfg.generate_batch_size
        if self.ctx.mode != "fsdp":
            chunk = chunk or max(1, n_mine)
            return -(-n_mine // chunk), chunk
        most = max(sum(len(r) for r in self.plan(step, k)) for k in range(self.ctx.world_size))
        chunk = chunk or max(1, most)
        return -(-most // chunk), chunk

    # ----------------------------------------------------------------------------------------- the step
    def prepare(self, step: int, micro: list[dict], objective) -> None:
        """Generate this rank's on-policy rows of the step and rewrite them in ``micro`` (module doc)."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        self._sums = None
        P, N = self.cfg.prompt_tokens, self.cfg.max_new_tokens
        plan = self.plan(step)
        picks = [(m, b, idx) for m, rows in enumerate(plan) for b, idx in rows]
        prompts = np.zeros((len(picks), P), dtype=np.int64)
        for i, (m, b, _) in enumerate(picks):
            prompts[i] = micro[m]["input_ids"][b, :P]
        keys = np.array([sequence_key(self.cfg.seed, step, idx) for _, _, idx in picks], dtype=np.int64)
        tokens = self._generate(prompts, keys, objective, *self._calls(step, len(picks)))
        for (m, b, _), gen in zip(picks, tokens):
            batch = micro[m]
            batch["input_ids"][b, P : P + N] = gen
            batch["input_ids"][b, P + N :] = self.pad
            batch["labels"][b] = IGNORE
            batch["labels"][b, P - 1 : P + N - 1] = gen  # position i predicts token i + 1
            self.generated[int(batch["domain_ids"][b, 0])] += N
        for m, rows in enumerate(plan):
            micro[m]["kd_only_rows"] = tuple(b for b, _ in rows)
        seconds = time.perf_counter() - t0
        self.gen_seconds += seconds
        self._window[0] += len(picks) * N
        self._window[1] += seconds

    def _generate(self, prompts: np.ndarray, keys: np.ndarray, objective, calls: int, chunk: int):
        device = next(objective.parameters()).device
        out = []
        for c in range(calls):
            part = slice(c * chunk, (c + 1) * chunk)
            real = part.start < len(prompts)
            p = prompts[part] if real else np.zeros((1, prompts.shape[1]), dtype=np.int64)
            k = keys[part] if real else np.zeros(1, dtype=np.int64)  # a discarded lock-step call (FSDP)
            gen = objective(
                torch.as_tensor(p, device=device),
                None,
                sample=self.spec,
                sample_keys=torch.as_tensor(k, device=device),
            )
            if real:
                out.append(gen.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.cfg.max_new_tokens), dtype=np.int64)

    def loss_kwargs(self, batch: dict) -> dict:
        """The objective's extra arguments for a micro-batch (none when off: the off-policy call)."""
        return {"kd_only_rows": batch["kd_only_rows"]} if self.enabled else {}

    def observe(self, objective) -> None:
        """After a micro-batch's loss: add its generated rows' per-domain (KD sum, tokens) to the step's."""
        last, objective.last_onpolicy = objective.last_onpolicy, None
        if not self.enabled or last is None:
            return
        self._sums = last.double() if self._sums is None else self._sums + last.double()

    # ----------------------------------------------------------------------------------------- metrics
    def metrics(self, elapsed: float) -> dict:
        """The metrics row's on-policy fields: the step's generated-token KD per domain, and generation
        tokens/s and share of the wall time since the last row. Collective (every rank calls it)."""
        if not self.enabled:
            return {}
        D = len(self.names)
        sums = self._sums if self._sums is not None else torch.zeros(2, D, dtype=torch.float64)
        window = torch.tensor(self._window, dtype=torch.float64)
        packed = torch.cat([sums.reshape(-1).to(self.ctx.device), window.to(self.ctx.device)])
        packed = self.ctx.all_reduce_sum(packed).cpu()
        kd, tok = packed[:D], packed[D : 2 * D]
        gen_tokens, seconds = float(packed[2 * D]), float(packed[2 * D + 1]) / self.ctx.world_size
        self._window = [0, 0.0]
        return {
            "onpolicy_kd": float(kd.sum() / tok.sum().clamp(min=1)),
            "domain_onpolicy_kd": (kd / tok.clamp(min=1)).tolist(),
            "domain_onpolicy_tokens": tok.long().tolist(),
            "gen_tokens_per_s": gen_tokens / max(seconds, 1e-9),
            "gen_time_share": min(1.0, seconds / max(elapsed, 1e-9)),
        }

    @staticmethod
    def postfix(row: dict) -> str:
        """The progress bar's on-policy part: the generated-token KD and generation speed apart."""
        if "gen_tokens_per_s" not in row:
            return ""
        return (
            f" | gen kd {row['onpolicy_kd']:.3f} {row['gen_tokens_per_s']:,.0f} tok/s "
            f"({row['gen_time_share']:.0%} of time)"
        )

    # ----------------------------------------------------------------------------------------- state
    def totals(self) -> list[int]:
        """Generated tokens per domain over all ranks, this run and the one it resumed (collective)."""
        if not self.ctx.distributed:
            return [int(x) for x in self.generated]
        t = torch.as_tensor(self.generated.astype(np.float64), device=self.ctx.device)
        return [int(x) for x in self.ctx.all_reduce_sum(t).cpu().tolist()]

    def state_dict(self) -> dict:
        """The checkpoint's ``onpolicy`` entry (nothing when off). The sampling noise is keyed by the step,
        so the step (in the checkpoint already) is its whole state. Collective."""
        if not self.enabled:
            return {}
        return {"onpolicy": {"generated_per_domain": self.totals(), "seed": self.cfg.seed}}

    def load_state_dict(self, state: dict) -> None:
        """Resume (rank 0 takes the global counters, as the sampler's)."""
        saved = state.get("onpolicy")
        if not self.enabled or saved is None:
            return
        counts = saved["generated_per_domain"]
        if len(counts) != len(self.names):
            raise ValueError(
                f"onpolicy: {len(counts)} domain counters in the checkpoint, {len(self.names)} here"
            )
        self.generated[:] = counts if self.ctx.is_main else 0

    def summary(self) -> dict:
        """The report's on-policy facts (collective); empty when off."""
        if not self.enabled:
            return {}
        return {
            "fraction": self.cfg.fraction,
            "prompt_tokens": self.cfg.prompt_tokens,
            "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "generated_per_domain": self.totals(),
            "gen_seconds": self.gen_seconds,
        }


# --------------------------------------------------------------------------------------------- measure
def continuation_teacher_ce(
    models: ModelBundle,
    teacher: Teacher,
    sets: list[dict],
    cfg: RunConfig,
    ctx: ParallelContext | None = None,
    writer: str = "student",
) -> list[float]:
    """The teacher's mean per-token CE (nats) on the student's own continuations, per domain.

    Each sequence of ``sets`` (a split's per-domain sets, e.g. ``trainer.test_sets``) gives a prompt, its
    first ``[onpolicy] prompt_tokens`` tokens; the student continues it with ``max_new_tokens`` tokens at the
    ``[onpolicy]`` temperature / top_p, its sampling noise keyed by the prompt's tokens and ``[onpolicy]
    seed`` (two students given the same prompts see the same noise: a paired comparison); the teacher
    scores prompt + continuation and its CE is averaged over the generated tokens. Lower = the student
    writes what the teacher would. Works for any run (``fraction`` 0 or not) whose teacher can score new
    tokens; shared over the ranks like the validation CE (collective).

    ``writer = "teacher"``: the teacher continues the prompts itself (without ``[teacher_prompt]``
    prefixes), the reference to read a student's value against: its CE on its own samples is its entropy
    rate, and a student writing repetitive, likely text can score below it.
    """
    if writer not in ("student", "teacher"):
        raise ValueError(f"writer: expected 'student' or 'teacher', got {writer!r}")
    op = cfg.onpolicy
    if not teacher.can_score_new_tokens:
        raise ValueError(
            f"the teacher ({teacher.describe()}) cannot score new tokens: use the online teacher"
        )
    P = op.prompt_tokens
    if any(s["input_ids"].shape[1] <= P for s in sets):
        raise ValueError(f"[onpolicy] prompt_tokens = {P}: expected fewer than the sets' sequence length")
    ctx = ctx or ParallelContext(device=models.device)
    spec = SampleSpec(op.max_new_tokens, op.temperature, op.top_p)
    objective = models.objective

    def score(ids, labels, domain):
        prompts = ids[:, :P]
        keys = content_keys(prompts, op.seed)
        if writer == "teacher":
            gen = sample_continuations(teacher.model, prompts, keys, spec)
        else:
            gen = objective(prompts, None, sample=spec, sample_keys=keys)
        seq = torch.cat([prompts, gen], dim=1)
        target = torch.full_like(seq, IGNORE)
        target[:, P - 1 : -1] = gen
        signal = teacher.score(seq, torch.full((seq.shape[0],), domain, dtype=torch.long))
        return head_ce_sum(signal.hidden, signal.head, target, teacher.vocab_size)

    score.by_domain = True
    return sharded_domain_losses(
        score,
        sets,
        models.device,
        cfg.ddk.eval_batch_size,
        ctx.rank,
        ctx.world_size,
        ctx.all_reduce_sum if ctx.distributed else None,
        lockstep=ctx.mode == "fsdp",
    )
