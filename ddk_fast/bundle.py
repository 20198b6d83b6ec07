"""The model bundle: tokenizer, frozen teacher, student, the objective module and its parallel wrapping.

Built once by :func:`build_models`; the loop only calls :meth:`ModelBundle.teacher_inputs` and the wrapped
objective. Training from a teacher cache (``[model] teacher_cache``) there is no teacher: its inputs are the
cached top-k rows the sampler attached to the batch. Writing files that several ranks read (the student's
initial weights in the run directory) happens on rank 0 first
(:meth:`~ddk_fast.distributed.ParallelContext.main_first`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backend import BackendChoice, resolve_loss_backend
from .config import RunConfig
from .distributed import ParallelContext, shard_teacher, wrap_objective
from .evaluation import ScoreFn, model_score_fn, prompted_score_fn
from .hidden import build_hidden_loss, capture_layers
from .models import (
    check_vocab,
    final_hidden,
    head_weight,
    load_student,
    load_teacher,
    resolve_dtype,
    trainable_parameters,
)
from .objective import DistillObjective
from .prompts import TeacherPrompts, build_prompts, row_domains
from .teacher_cache import TeacherCache
from .teacher_cache.training import cached_vocab_size, teacher_for_student_init

log = logging.getLogger("ddk_fast")


@dataclass
class ModelBundle:
    teacher: nn.Module | None  # None when training from a teacher cache
    student: nn.Module  # the bare student (peft or transformers model): checkpoints and export use it
    objective: DistillObjective  # student + loss (sharded in place under FSDP)
    model: nn.Module  # what the loop calls: the objective, or DDP around it
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    loss_backend: BackendChoice
    teacher_cache: TeacherCache | None = None
    prompts: TeacherPrompts | None = None  # [teacher_prompt] use: the teacher's per-domain prefixes

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.objective.parameters() if p.requires_grad]

    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor, domain_ids=None) -> torch.Tensor:
        """The teacher's final hidden states; with prompts, each row after its domain's prefix (the plain
        positions only, so one teacher row per student row)."""
        if self.prompts is not None:
            return self.prompts.hidden(input_ids, row_domains(domain_ids))
        return final_hidden(self.teacher, input_ids)

    def teacher_weight(self) -> torch.Tensor:
        return head_weight(self.teacher)

    def teacher_inputs(self, input_ids: torch.Tensor, batch: dict) -> dict:
        """The objective's teacher arguments for one micro-batch: the teacher's final hidden states and head
        weight, or the cached top-k rows of the batch's sequences (read by the sampler's hook)."""
        if self.teacher_cache is None:
            hidden = self.objective.hidden
            if hidden is None:
                return {
                    "teacher_hidden": self.teacher_hidden(input_ids, batch.get("domain_ids")),
                    "teacher_weight": self.teacher_weight(),
                }
            with capture_layers(self.teacher, hidden.teacher_layers) as caught:  # [hidden]: the mapped layers
                final = self.teacher_hidden(input_ids, batch.get("domain_ids"))
            layers = [caught[t] for t in hidden.teacher_layers]
            return {
                "teacher_hidden": final,
                "teacher_weight": self.teacher_weight(),
                "teacher_layers": layers,
            }
        dev = self.device
        rows = (
            torch.as_tensor(batch["topk_ids"], device=dev),
            self.teacher_cache.logprobs_tensor(batch["topk_logprobs"]).to(dev),
            torch.as_tensor(batch["tail_logmass"], device=dev),
        )
        return {"teacher_topk": rows}

    def teacher_score(self) -> ScoreFn:
        if self.prompts is not None:  # val/test CE of the teacher that makes the targets: with its prefix
            return prompted_score_fn(self.prompts, self.teacher, self.vocab_size)
        return model_score_fn(self.teacher, self.vocab_size)

    def student_score(self) -> ScoreFn:
        """Validation scoring through the objective's forward (FSDP gathers a sharded student there; DDP's
        wrapper is bypassed: no gradient, nothing to reduce)."""
        return lambda ids, labels: self.objective(ids, labels)


def build_models(
    cfg: RunConfig,
    ctx: ParallelContext,
    tokenizer,
    run_dir: Path,
    teacher_cache: TeacherCache | None = None,
    prompts: dict | None = None,
) -> ModelBundle:
    """``teacher_cache``: train from it (:func:`ddk_fast.teacher_cache.training.open_for_schedule`); the
    teacher is then not kept (loaded at most once, to take the student's layers from it). ``prompts``: the
    checked prompts.json of ``[teacher_prompt] use`` (:func:`ddk_fast.prompts.open_prompts`)."""
    device = ctx.device
    dtype = resolve_dtype(cfg.model, device)
    seed = cfg.train.seed
    if teacher_cache is None:
        teacher = load_teacher(cfg.model, device, dtype, seed)
    else:
        teacher = teacher_for_student_init(cfg, run_dir, device, dtype)
    student = ctx.main_first(
        lambda: load_student(cfg.model, teacher, device, dtype, run_dir, seed, shard=ctx.mode == "fsdp")
    )
    if teacher_cache is None:
        vocab_size = check_vocab(teacher, student, tokenizer)
    else:
        teacher = None
        vocab_size = cached_vocab_size(student, tokenizer, teacher_cache)
    loss_backend = resolve_loss_backend(cfg.loss.backend, device.type == "cuda")
    n_train, n_total = trainable_parameters(student)
    log.info(
        "device %s, dtype %s; student %s: %s trainable of %s parameters",
        device,
        str(dtype).replace("torch.", ""),
        cfg.model.student_mode,
        f"{n_train:,}",
        f"{n_total:,}",
    )
    log.info("loss backend: %s", loss_backend)
    autocast = ("cuda", torch.bfloat16) if device.type == "cuda" and dtype == torch.bfloat16 else None
    hidden = None
    if teacher is not None:  # [hidden] weight > 0 is refused with a teacher cache (config check)
        hidden = build_hidden_loss(cfg.hidden, student, teacher)
    if hidden is not None:
        hidden.to(device)
        log.info(
            "hidden-state loss: %s x %s over (student, teacher) layers %s, %d projection parameters",
            cfg.hidden.weight,
            cfg.hidden.loss,
            hidden.pairs,
            sum(p.numel() for p in hidden.parameters()),
        )
    objective = DistillObjective(
        student, cfg.loss, len(cfg.data.domains), vocab_size, loss_backend.name, autocast, hidden
    )
    teacher_prompts = None
    # [teacher_prompt]: the prefix keys/values are computed here, before a sharded teacher's FSDP wrapping
    if prompts is not None and teacher is not None:  # refused with a teacher cache (config check)
        teacher_prompts = build_prompts(cfg, prompts, teacher)
    if cfg.model.shard_teacher and teacher is not None:
        teacher = shard_teacher(teacher, ctx)
    model = wrap_objective(objective, ctx)
    return ModelBundle(
        teacher,
        student,
        objective,
        model,
        vocab_size,
        dtype,
        device,
        loss_backend,
        teacher_cache,
        teacher_prompts,
    )
