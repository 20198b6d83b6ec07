"""``metrics.jsonl`` (always) and the trackers of ``[output] report_to``; rank 0 alone writes.

Every tracker gets the same scalars as ``metrics.jsonl``: each number of a row, and each per-domain list
(``domain_ce``, ``domain_kd``, ``weights``, ...) as ``<key>/<domain>``, at the row's step.

* ``tensorboard``: event files in ``<run>/tensorboard`` (when tensorboard is installed; skipped with a log
  line otherwise).
* ``wandb``: a wandb run (``pip install 'ddk_fast[wandb]'``; the pre-flight refuses ``report_to`` with wandb
  when it is not installed), named after the run folder, its files under ``<run>/wandb``. Its id is kept in
  ``<run>/wandb_id.txt`` so ``--resume`` continues the same wandb run. ``WANDB_MODE=offline`` writes a local
  run (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from .runfolder import truncate_metrics

log = logging.getLogger("ddk_fast")
WANDB_ID = "wandb_id.txt"


def tracker_scalars(row: dict, names: list[str]) -> dict[str, float]:
    """The scalars of a metrics row, per-domain lists flattened to ``<key>/<domain>`` (``step`` left out)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, list) and len(v) == len(names):
            for name, x in zip(names, v):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{k}/{name}"] = x
    return out


class MetricsWriter:
    """``metrics.jsonl`` and the trackers (module doc). ``tensorboard``: write tensorboard events (when
    installed); ``wandb``: keyword arguments of ``wandb.init`` (project, config), or None."""

    def __init__(self, run_dir: Path, tensorboard: bool, domain_names: list[str], wandb: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.names = domain_names
        self.tb = None
        self.wandb_run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing or broken: metrics.jsonl is enough
                log.info("tensorboard disabled: %s", exc)
        if wandb is not None:
            self.wandb_run = _start_wandb(Path(run_dir), wandb)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None and self.wandb_run is None:
            return
        scalars = tracker_scalars(row, self.names)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=int(row["step"]))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be produced again) and a line torn by
        a crash mid-write; atomically."""
        truncate_metrics(self.path, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(run_dir: Path, init: dict):
    import wandb  # an optional extra: the pre-flight checked it is installed

    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    run = wandb.init(dir=str(run_dir), name=run_dir.resolve().name, id=run_id, resume="allow", **init)
    log.info("wandb: run %s (project %s, mode %s)", run_id, init.get("project"), run.settings.mode)
    return run
