"""The model bundle: the student, the objective module (student forward + loss) and its parallel wrapping.

Built once by :func:`build_models` from a :class:`~ddk_fast.training.teacher.Teacher` (whatever its source:
it is loaded here, gives the model a student is cut from, checks the vocabularies and is finalised after the
student). The loop calls the wrapped objective with the teacher's signal. Writing files that several ranks
read (the student's initial weights in the run directory) happens on rank 0 first
(:meth:`~ddk_fast.distributed.ParallelContext.main_first`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backend import BackendChoice, resolve_loss_backend
from ..config import RunConfig
from ..distributed import ParallelContext, wrap_objective
from ..models.hidden import build_hidden_loss
from ..models.loading import load_student, resolve_dtype, trainable_parameters
from ..models.objective import DistillObjective
from .teacher import Teacher

log = logging.getLogger("ddk_fast")


@dataclass
class ModelBundle:
    student: nn.Module  # the bare student (peft or transformers model): checkpoints and export use it
    objective: DistillObjective  # student + loss (sharded in place under FSDP)
    model: nn.Module  # what the loop calls: the objective, or DDP around it
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    loss_backend: BackendChoice

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.objective.parameters() if p.requires_grad]

    def student_score(self):
        """Validation scoring through the objective's forward (FSDP gathers a sharded student there; DDP's
        wrapper is bypassed: no gradient, nothing to reduce)."""
        return lambda ids, labels: self.objective(ids, labels)


def build_models(
    cfg: RunConfig, ctx: ParallelContext, tokenizer, run_dir: Path, teacher: Teacher
) -> ModelBundle:
    """Load ``teacher`` (:meth:`~ddk_fast.training.teacher.Teacher.load`), build the student (cut from the
    teacher's layers when the config says so, cached in ``<run>/student_init``), the objective and the
    parallel wrapping; the teacher is finalised (prompt keys/values, sharding) once the student exists."""
    device = ctx.device
    dtype = resolve_dtype(cfg.model, device)
    seed = cfg.train.seed
    teacher.load(device, dtype)
    source = teacher.student_source()
    student = ctx.main_first(
        lambda: load_student(cfg.model, source, device, dtype, run_dir, seed, shard=ctx.mode == "fsdp")
    )
    vocab_size = teacher.check_vocab(student, tokenizer)
    loss_backend = resolve_loss_backend(cfg.loss.backend, device.type == "cuda")
    n_train, n_total = trainable_parameters(student)
    log.info(
        "device %s, dtype %s; student %s: %s trainable of %s parameters; teacher: %s",
        device,
        str(dtype).replace("torch.", ""),
        cfg.model.student_mode,
        f"{n_train:,}",
        f"{n_total:,}",
        teacher.describe(),
    )
    log.info("loss backend: %s", loss_backend)
    autocast = ("cuda", torch.bfloat16) if device.type == "cuda" and dtype == torch.bfloat16 else None
    hidden = None
    if teacher.model is not None:  # [hidden] weight > 0 is refused with a teacher cache (config check)
        hidden = build_hidden_loss(cfg.hidden, student, teacher.model)
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
    teacher.finalize(ctx)
    model = wrap_objective(objective, ctx)
    return ModelBundle(student, objective, model, vocab_size, dtype, device, loss_backend)
