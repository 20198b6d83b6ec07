"""The checkpointer: when and how the loop's state is written, resumed and exported.

* single process and DDP: rank 0 writes ``trainable.safetensors`` + ``adapter/`` + ``state.pt`` with
  :func:`.checkpoint.save_checkpoint` (every rank holds the same replica); every rank loads them.
  The format does not depend on the world size, so a 2-rank checkpoint resumes on 1 rank and vice versa.
* FSDP: :func:`.checkpoint.save_sharded_checkpoint` (torch.distributed.checkpoint, all ranks),
  loadable under another world size and also by a single process.
* ``final/``: always a Hugging Face (full) or peft (adapters) folder plus the tokenizer, written by rank 0;
  under FSDP the full state dict is gathered to rank 0 first. Its ``adapter_config.json`` names the base
  model by Hub id (and revision) or absolute path, so it loads from any working directory; ``FINAL_INFO``
  (``ddk_fast_final.json``) records the student mode, base model and compute dtype for
  ``python -m ddk_fast.export``.

Atomicity and trust are the same everywhere: a ``.tmp`` folder renamed when complete (with its manifest),
then ``latest`` replaced; weights that are not finite are never written; resuming takes the newest checkpoint
that verifies (:func:`.checkpoint.select_checkpoint`, chosen on rank 0 for every rank). A failure on
rank 0 (disk full, non-finite weights) is raised on every rank, so all ranks stop with the same error.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..distributed import ParallelContext
from ..errors import CheckpointWriteError, RunError
from ..models.loading import FINAL_INFO
from . import checkpoint as ckpt
from .bundle import ModelBundle

log = logging.getLogger("ddk_fast")


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        keep_last: int,
        ctx: ParallelContext,
        models: ModelBundle,
        optimizer,
        config: dict | None = None,
        export_projections: bool = False,
        final_info: dict | None = None,
    ):
        self.run_dir = run_dir
        self.final_info = final_info or {}  # base model (Hub id / absolute path), revision, mode, dtype
        self.export_projections = export_projections  # [hidden] export_projections
        self.config = config  # the resolved config, recorded in each manifest (resume compatibility)
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
                ctx,
                config=self.config,
            )
        else:  # every rank holds the same replica: rank 0 writes it, its errors reach every rank

            def write() -> Path:
                full = {**state, "optimizer": self.optimizer.state_dict()}
                return ckpt.save_checkpoint(
                    self.root, step, self.models.student, full, self.keep_last, config=self.config
                )

            path = ctx.main_only(write)
        if ctx.is_main:
            log.info("checkpoint: %s", path)
        return path

    def load_latest(self) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that verifies (chosen on rank 0, the same on every rank) in place;
        None when none does."""

        def choose() -> Path | None:
            path, rejected = ckpt.select_checkpoint(self.root)
            for bad, reason in rejected:
                log.warning("resume: skipping checkpoint %s: %s", bad, reason)
            return path

        path = self.ctx.main_only(choose)
        if path is None:
            return None
        return path, self.load(path)

    def load(self, path: Path) -> dict:
        """Load ``path``'s weights and optimizer state in place (collective under FSDP); returns the rest of
        its state. RunError when the checkpoint does not fit this model, optimizer or parallel mode."""
        if ckpt.is_sharded_checkpoint(path):
            return ckpt.load_sharded_checkpoint(path, self.models.objective, self.optimizer)
        if self.ctx.mode == "fsdp":
            raise RunError(
                f"checkpoint {path} was written without FSDP (trainable.safetensors); resume it with "
                '[train] parallel = "ddp" (or in a single process)'
            )
        state = ckpt.load_checkpoint(path, self.models.student)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {path} cannot be resumed with this config: {exc}") from None
        return state

    def _export_projections(self, folder: Path, full_state: dict | None) -> None:
        """``[hidden] export_projections``: the learned projections (``projections.<i>.weight/bias``, one
        per layer pair) and ``hidden_projections.json`` (pairs, widths, loss) next to the final student.
        ``full_state``: the gathered objective state under FSDP (keys ``hidden.projections.*``)."""
        from safetensors.torch import save_file

        hidden = self.models.objective.hidden
        if hidden is None:
            return
        if full_state is None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in hidden.state_dict().items()}
        else:
            tensors = {
                k.removeprefix("hidden."): v.contiguous()
                for k, v in full_state.items()
                if k.startswith("hidden.")
            }
        if tensors:
            save_file(tensors, str(folder / "hidden_projections.safetensors"))
        first = next((v for k, v in sorted(tensors.items()) if k.endswith("weight")), None)
        meta = {
            "pairs": [list(p) for p in hidden.pairs],
            "loss": hidden.loss,
            "student_width": None if first is None else int(first.shape[1]),
            "teacher_width": None if first is None else int(first.shape[0]),
            "projected": bool(tensors),
        }
        (folder / "hidden_projections.json").write_text(json.dumps(meta, indent=1) + "\n")

    def export(self, tokenizer, student_mode: str) -> Path:
        """The final student in Hugging Face format: adapters (peft) or the full model, plus the tokenizer."""
        out = self.run_dir / "final"
        tmp = self.run_dir / "final.tmp"
        sd = full = None
        if self.ctx.mode == "fsdp":  # gather the shards (collective), keep them on rank 0 only
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.models.objective, options=opts)
            sd = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
        if self.ctx.is_main:
            try:
                self._write_final(tmp, sd, full, tokenizer, student_mode)
            except Exception as exc:  # a full disk whatever the writer raised; the last checkpoint is kept
                full_disk = ckpt.disk_full(self.run_dir, exc)
                shutil.rmtree(tmp, ignore_errors=True)
                if not full_disk and not isinstance(exc, OSError):
                    raise
                kept = ckpt.latest_checkpoint(self.root)
                what = "disk full" if full_disk else "write failed"
                raise CheckpointWriteError(
                    f"{what} while writing {out} ({type(exc).__name__}: {str(exc)[:150]}); the checkpoint "
                    f"{kept} is kept: free space and run again with --resume to write final/"
                ) from exc
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            log.info("final student (%s): %s", student_mode, out)
        self.ctx.barrier()
        return out

    def _write_final(self, tmp: Path, sd, full, tokenizer, student_mode: str) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        if sd is None:
            self.models.student.save_pretrained(tmp)
        else:
            self.models.student.save_pretrained(tmp, state_dict=sd)
        tokenizer.save_pretrained(tmp)
        if self.export_projections:
            self._export_projections(tmp, full)
        info = {"student_mode": student_mode, **self.final_info}
        adapter = tmp / "adapter_config.json"
        if adapter.exists() and info.get("base_model"):  # portable: Hub id or absolute path
            conf = json.loads(adapter.read_text())
            conf["base_model_name_or_path"] = info["base_model"]
            conf["revision"] = info.get("revision")
            adapter.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        (tmp / FINAL_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
