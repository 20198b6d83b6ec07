"""``python -m ddk_fast.train --config run.toml [--set section.key=value ...] [--resume]``.

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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
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
    from .report import write_report
    from .trainer import Trainer, TrainingStopped

    log = logging.getLogger("ddk_fast")
    trainer = Trainer(cfg)
    trainer.setup()
    if resume:
        trainer.resume()
    try:
        result = trainer.fit()
    except TrainingStopped as exc:
        log.error("%s", exc)
        return 3
    report = write_report(
        result,
        trainer.names,
        {"loss backend": str(trainer.loss_backend), "sampler backend": str(trainer.sampler.backend)},
    )
    log.info("report: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
