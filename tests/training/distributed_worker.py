"""Runs training scenarios for tests/training/test_distributed.py, under torchrun or as a plain process.

``python -m tests.training.distributed_worker SPEC.json``: SPEC holds ``runs``, each ``{"cfg": raw config
dict, "stop_at": int | null, "resume": bool, "out": path}``; every rank writes ``<out>.rank<r>.json`` with
what the test compares (weight history, per-domain validation losses, steps, rank and world size). The process
group (gloo) is created once here, so the trainers share it."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(spec_path: str) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the same kernels (and so the same bits) in every process
    from ddk_fast.config import build_config
    from ddk_fast.training.trainer import Trainer

    spec = json.loads(open(spec_path).read())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    for run in spec["runs"]:
        t = Trainer(build_config(run["cfg"]))
        t.setup()
        if run.get("resume"):
            if not t.resume():
                raise RuntimeError("expected a checkpoint to resume from")
        result = t.fit(stop_at=run.get("stop_at"))
        out = {
            "rank": rank,
            "world_size": world,
            "step": result.step,
            "weight_history": result.weight_history,
            "eval_history": result.eval_history,
            "tokens_per_domain": result.tokens_per_domain,
            "trainable": {
                n: p.detach().double().sum().item()
                for n, p in t.student.named_parameters()
                if p.requires_grad and not hasattr(p, "full_tensor")
            },
        }
        with open(f"{run['out']}.rank{rank}.json", "w") as f:
            json.dump(out, f)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
