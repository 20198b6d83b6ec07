"""``python -m ddk_fast.train --config run.toml [--set section.key=value ...] [--resume | --overwrite]``.

Under ``torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint host:port] -m
ddk_fast.train --config run.toml`` every rank runs the same command (see :mod:`ddk_fast.distributed`).

Exit codes (one line on stderr, no traceback, for 2 and 3):
  0  done.
  2  something to fix before running again: the configuration or an input (the message names the key, the
     value and what was expected), or the run folder (in use by another run, not writable, holds checkpoints
     of an earlier run, no valid checkpoint to resume, a checkpoint written for another student), or the
     disk (full while writing a checkpoint: the previous checkpoint is kept).
  3  training stopped on non-finite numbers: too many consecutive non-finite steps, weights that are not
     finite, or a teacher whose outputs are not finite (the last good checkpoint is kept).
  130 / 143  SIGINT (Ctrl-C) / SIGTERM: the current step was finished and checkpointed; the line on stderr
     says how to resume. A second signal stops at once (no checkpoint).

Models given as Hub ids are loaded through the Hugging Face cache (downloaded into it on first use;
HF_HUB_OFFLINE=1: the cache only). A config of local folders only runs with HF_HUB_OFFLINE=1 unless the
environment says otherwise (no hub lookups).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only
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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a run folder that holds checkpoints (deletes the earlier run's files first)",
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank 0 logs progress, the others warnings only
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
        datefmt="%H:%M:%S",
    )

    from .config import load_config
    from .errors import BackendUnavailableError, ConfigError, Interrupted, NonFiniteError, RunError
    from .models.hub import offline_unless_hub
    from .teacher_cache import TeacherCacheError
    from .training.signals import StopSignals

    tag = f"[rank {rank}] " if rank else ""  # under torchrun each rank prints its own one line
    try:
        with StopSignals() as stop:
            cfg = load_config(args.config, args.set)
            offline_unless_hub(cfg.model)
            return run(cfg, resume=args.resume, overwrite=args.overwrite, stop=stop)
    except Interrupted as exc:
        given = argv if argv is not None else sys.argv[1:]
        again = " ".join(shlex.quote(a) for a in given if a not in ("--resume", "--overwrite"))
        command = f"python -m ddk_fast.train {again}"
        if exc.checkpoint is not None or exc.step > 0 or args.resume:
            command += " --resume"
        print(f"{tag}{exc}; continue with: {command}", file=sys.stderr)
        return exc.exit_code
    except (ConfigError, BackendUnavailableError, TeacherCacheError) as exc:
        print(f"{tag}config error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"{tag}error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:  # TrainingStopped included
        print(f"{tag}training stopped: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
        kept = "the last checkpoint is kept, run again with --resume"
        print(f"{tag}error: {what}: {exc}; {kept}", file=sys.stderr)
        return 2


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def run(cfg, resume: bool = False, overwrite: bool = False, stop=None) -> int:
    """Train ``cfg`` in its run folder (pre-flight, lock, resume) and write the report. Raises the errors
    ``main`` turns into exit codes.

    Under torchrun every rank runs this. Rank 0 alone runs the pre-flight and holds the run folder's lock
    (until the run ends, however it ends) and writes files; the checkpoint it chose to resume from is
    broadcast, so every rank loads the same one. A pre-flight error on rank 0 is raised on every rank.
    """
    from .distributed import init_parallel
    from .training.report import write_report
    from .training.runfolder import prepare_run_folder
    from .training.trainer import Trainer

    log = logging.getLogger("ddk_fast")
    # config checks of the parallel setting first (every rank, before any process group), then the group
    ctx = init_parallel(cfg.train.parallel, cfg.data.batch_size, cfg.train.device)
    folder = None

    def preflight():
        nonlocal folder
        folder = prepare_run_folder(cfg, resume=resume, overwrite=overwrite)
        return folder.resume_from

    try:
        resume_from = ctx.main_only(preflight)
        trainer = Trainer(cfg, stop=stop)
        trainer.setup(ctx)
        if resume_from is not None:
            trainer.resume(resume_from)
        result = trainer.fit()
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
                prompts=trainer.prompts,
            )
            log.info("report: %s", report)
        # on success, every rank waits for rank 0's report before any rank leaves the process group
        ctx.barrier()
        return 0
    finally:
        if folder is not None:
            folder.release()
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
