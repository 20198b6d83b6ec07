"""``python -m ddk_fast.train --config run.toml [--set section.key=value ...] [--resume]``.

Under ``torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint host:port] -m
ddk_fast.train --config run.toml`` every rank runs the same command (see :mod:`ddk_fast.distributed`).

Exit codes: 0 done, 2 bad configuration or input (message names the key, the value and what was expected,
no traceback), 3 training stopped after too many non-finite losses (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never wait ~46 s on a lookup
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m ddk_fast.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run.toml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 logs progress, the others warnings only
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
        datefmt="%H:%M:%S",
    )

    from .config import load_config
    from .errors import BackendUnavailableError, ConfigError

    try:
        cfg = load_config(args.config, args.set)
        return run(cfg, resume=args.resume)
    except (ConfigError, BackendUnavailableError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def run(cfg, resume: bool = False) -> int:
    """Set up, (resume,) train, report. Under torchrun every rank runs this; rank 0 alone writes files."""
    from .report import write_report
    from .trainer import Trainer, TrainingStopped

    log = logging.getLogger("ddk_fast")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if resume:
            trainer.resume()
        try:
            result = trainer.fit()
        except TrainingStopped as exc:
            log.error("%s", exc)
            return 3
        ctx = trainer.ctx
        if ctx.is_main:
            parallel = f"{ctx.mode} over {ctx.world_size} ranks" if ctx.distributed else "none (1 process)"
            report = write_report(
                result,
                trainer.names,
                {
                    "loss backend": str(trainer.loss_backend),
                    "sampler backend": str(trainer.sampler.backend),
                    "parallel": parallel,
                },
            )
            log.info("report: %s", report)
        return 0
    finally:
        if hasattr(trainer, "ctx"):
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
