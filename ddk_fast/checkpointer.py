"""The checkpointer: when and how the loop's state is written, resumed and exported.

* single process and DDP: rank 0 writes ``trainable.safetensors`` + ``adapter/`` + ``state.pt`` with
  :func:`ddk_fast.checkpoint.save_checkpoint` (every rank holds the same replica); every rank loads them.
  The format does not depend on the world size, so a 2-rank checkpoint resumes on 1 rank and vice versa.
* FSDP: :func:`ddk_fast.checkpoint.save_sharded_checkpoint` (torch.distributed.checkpoint, all ranks),
  loadable under another world size and also by a single process.
* ``final/``: always a Hugging Face (full) or peft (adapters) folder plus the tokenizer, written by rank 0;
  under FSDP the full state dict is gathered to rank 0 first.

Atomicity is the same everywhere: a ``.tmp`` folder renamed when complete, then ``latest`` replaced.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .bundle import ModelBundle
from .distributed import ParallelContext

log = logging.getLogger("ddk_fast")


class Checkpointer:
    def __init__(self, run_dir: Path, keep_last: int, ctx: ParallelContext, models: ModelBundle, optimizer):
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.ctx = ctx
        self.models = models
        self.optimizer = optimizer

    def save(self, step: int, state: dict) -> Path:
        """Collective. ``state`` holds everything but the trainable weights and the optimizer."""
        ctx = self.ctx
        if ctx.mode == "fsdp":
            path = ckpt.save_sharded_checkpoint(
                self.root,
                step,
                self.models.objective,
                self.optimizer,
                state,
                self.keep_last,
                ctx.rank,
                ctx.barrier,
            )
        else:
            path = self.root / f"step_{step:08d}"
            if ctx.is_main:
                full = {**state, "optimizer": self.optimizer.state_dict()}
                path = ckpt.save_checkpoint(self.root, step, self.models.student, full, self.keep_last)
            ctx.barrier()
        if ctx.is_main:
            log.info("checkpoint: %s", path)
        return path

    def load_latest(self) -> tuple[Path, dict] | None:
        """Load the latest checkpoint's weights and optimizer state in place; None when there is none."""
        ctx = self.ctx
        name = ckpt.latest_checkpoint(self.root) if ctx.is_main else None
        name = ctx.broadcast_object(None if name is None else name.name)  # all ranks load the same one
        if name is None:
            return None
        path = self.root / name
        if ckpt.is_sharded_checkpoint(path):
            state = ckpt.load_sharded_checkpoint(path, self.models.objective, self.optimizer)
        elif ctx.mode == "fsdp":
            raise RuntimeError(
                f"checkpoint {path} was written without FSDP (trainable.safetensors); resume it with "
                '[train] parallel = "ddp" (or in a single process)'
            )
        else:
            state = ckpt.load_checkpoint(path, self.models.student)
            self.optimizer.load_state_dict(state["optimizer"])
        return path, state

    def export(self, tokenizer, student_mode: str) -> Path:
        """The final student in Hugging Face format: adapters (peft) or the full model, plus the tokenizer."""
        out = self.run_dir / "final"
        tmp = self.run_dir / "final.tmp"
        sd = None
        if self.ctx.mode == "fsdp":  # gather the shards (collective), keep them on rank 0 only
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.models.objective, options=opts)
            sd = {k.removeprefix("student."): v for k, v in full.items()}
        if self.ctx.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            if sd is None:
                self.models.student.save_pretrained(tmp)
            else:
                self.models.student.save_pretrained(tmp, state_dict=sd)
            tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            log.info("final student (%s): %s", student_mode, out)
        self.ctx.barrier()
        return out
