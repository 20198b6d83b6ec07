"""``metrics.jsonl`` (always) and tensorboard events (when installed and enabled); rank 0 alone writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .runfolder import truncate_metrics

log = logging.getLogger("ddk_fast")


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
        """On resume, drop rows logged after the checkpoint (they will be produced again) and a line torn by
        a crash mid-write; atomically."""
        truncate_metrics(self.path, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
