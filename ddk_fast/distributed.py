"""Data parallelism in one place: process group, DDP / FSDP2 wrapping, and the few collectives the loop needs.

``torchrun --nproc_per_node N -m ddk_fast.train --config run.toml`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`init_parallel` reads them, picks the backend (nccl on CUDA, gloo on CPU) and returns a
:class:`ParallelContext`. Plain ``python -m ddk_fast.train`` gets a context of world size 1 and mode
``none``: no process group, no wrapper, every collective a no-op, so the single-process path is unchanged.

Modes (``[train] parallel``; ``auto`` = ``ddp`` when the world size is > 1):

* ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` over the objective module (student forward +
  KD loss in one ``forward``, so DDP sees every trainable parameter used); each rank holds a full replica
  and gradients are all-reduced (averaged) in backward.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per student decoder layer, then the objective
  as the root (embeddings, final norm and lm_head). Parameters, gradients and optimizer state are sharded
  over the ranks; layers are all-gathered just in time in forward and backward.

The teacher is frozen and replicated by default; ``[model] shard_teacher = true`` shards its decoder with
FSDP2 (layers, then the decoder as root; the lm_head stays replicated, the loss reads it directly).

Both DDP and FSDP2 average gradients over ranks, so the loop multiplies each rank's loss by the world size
and divides by the global token count: the result is the gradient of the mean over the global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("ddk_fast")
T = TypeVar("T")


@dataclass
class ParallelContext:
    """Who this process is in the job, and the collectives the loop uses (no-ops in a world of one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_parallel created the process group (and closes it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    # -- collectives (every rank must call them, in the same order) ------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks; returns the tensor. No-op when not distributed."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def all_gather_object(self, obj: T) -> list[T]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on every other rank (for steps that write shared files: the others
        then find them, e.g. the tokenised shard cache or the student's initial weights)."""
        if not self.distributed:
            return fn()
        out = fn() if self.is_main else None
        self.barrier()
        if not self.is_main:
            out = fn()
        self.barrier()
        return out

    def main_only(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 alone and give its result to every rank (one broadcast, also a barrier).

        An exception on rank 0 is raised on every rank with the same type and message, so the ranks stop
        together (and exit with the same code) instead of waiting in the next collective for rank 0.
        """
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank below, then raised here too
                error = exc
        failed = None if error is None else (type(error), str(error))
        result, failed = self.broadcast_object((result, failed))
        if error is not None:
            raise error
        if failed is not None:
            raise _rebuild(*failed)
        return result

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _rebuild(cls: type[BaseException], message: str) -> BaseException:
    """Rank 0's exception for another rank: its class with its message (errors whose constructor takes
    other arguments, like ConfigError, get the message alone)."""
    try:
        return cls(message)
    except TypeError:
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        return exc


def env_world() -> tuple[int, int, int, bool]:
    """(rank, local_rank, world_size, launched) from torchrun's environment variables."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    rank = int(os.environ.get("RANK", "0")) if launched else 0
    local = int(os.environ.get("LOCAL_RANK", str(rank))) if launched else 0
    return rank, local, world, launched


def resolve_mode(parallel: str, world_size: int, launched: bool) -> str:
    """``auto`` -> ``ddp`` when world > 1 else ``none``; an explicit mode needs a torchrun launch."""
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if not launched:
        raise ConfigError(
            "train.parallel",
            parallel,
            "auto, or a launch with torchrun (e.g. torchrun --nproc_per_node 2 -m ddk_fast.train ...)",
        )
    return parallel


def check_batch_divides(batch_size: int, world_size: int) -> int:
    """``[data] batch_size`` is the global micro-batch: each rank takes ``batch_size / world_size`` rows."""
    if batch_size % world_size != 0:
        raise ConfigError(
            "data.batch_size",
            batch_size,
            f"a multiple of the world size {world_size} (the global micro-batch is split evenly over the "
            f"ranks: use e.g. {max(world_size, batch_size - batch_size % world_size)})",
        )
    return batch_size // world_size


def init_parallel(parallel: str, batch_size: int, device_name: str) -> ParallelContext:
    """Read torchrun's environment, validate, create the process group; ConfigError on a bad setting.

    The configuration checks (mode, batch divisibility) run before any process group exists, so a bad
    config exits 2 on every rank without a hang.
    """
    rank, local, world, launched = env_world()
    mode = resolve_mode(parallel, world, launched)
    check_batch_divides(batch_size, world)
    if mode == "none":
        return ParallelContext(device=resolve_device(device_name))
    import torch.distributed as dist

    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        owns = True
    ctx = ParallelContext(rank, world, local, mode, device, owns)
    log.info("parallel: %s over %d ranks (backend %s)", mode, world, dist.get_backend())
    return ctx


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``[train] device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a torch device; a bare ``cuda`` under
    torchrun is ``cuda:LOCAL_RANK``. ConfigError when CUDA is asked for and there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "auto or cpu: no CUDA device is available here")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__}: FSDP needs a decoder with a `layers` list to shard")
    return list(layers)


def wrap_objective(objective: nn.Module, ctx: ParallelContext) -> nn.Module:
    """The module the loop calls: the objective itself, DDP around it, or FSDP2-sharded in place."""
    if ctx.mode == "none":
        return objective
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(objective, device_ids=ids, broadcast_buffers=False)  # buffers are constants here
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(objective.student):
            fully_shard(layer)
        fully_shard(objective)
        return objective
    raise ValueError(f"parallel mode: expected none, ddp or fsdp, got {ctx.mode!r}")


def shard_teacher(teacher: nn.Module, ctx: ParallelContext) -> nn.Module:
    """FSDP2 over the frozen teacher's decoder (its layers, then the decoder as root); lm_head replicated."""
    if not ctx.distributed:
        return teacher
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(teacher.get_decoder())
    return teacher


def no_grad_sync(module: nn.Module, ctx: ParallelContext, sync: bool):
    """A context for one micro-batch: gradients are reduced over ranks only when ``sync`` (the last one)."""
    import contextlib

    if ctx.mode == "ddp" and not sync:
        return module.no_sync()
    if ctx.mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard, e.g. a clipped gradient norm) as a plain tensor; others unchanged."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
