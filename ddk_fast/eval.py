"""``python -m ddk_fast.eval --config run.toml --model ID_OR_DIR [--adapter runs/x/final] [--split test|val]
[--out FILE] [--no-teacher]``: score any model on a run's held-out split.

Per domain of the run's config: the mean next-token cross-entropy (nats per counted token; chat and
prompt/completion domains count the assistant / completion tokens, as training does), the perplexity, and the
gap to the run's teacher on the same tokens; printed as a table, written as JSON with ``--out``. The scorer
is the trainer's (:mod:`ddk_fast.training.scoring`): a run's ``final/`` scored here gives the test CE of its
``report.md``.

``--model``: a folder or a Hub id (through the Hugging Face cache; HF_HUB_OFFLINE=1: the cache only).
``--adapter``: a peft folder (a run's ``final/``); a QLoRA run's base is loaded in NF4 as it was trained.
Exit 2 with one line on stderr for a bad config, model or adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m ddk_fast.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run.toml whose domains and split are scored")
    parser.add_argument("--model", help="folder or Hub id (default: the base model of --adapter)")
    parser.add_argument("--revision", default="", help="Hub revision of --model")
    parser.add_argument("--adapter", help="peft adapter folder, e.g. runs/x/final")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--out", help="write the scores as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-teacher", action="store_true", help="do not score the teacher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from .config import load_config
    from .errors import ConfigError, RunError
    from .models.hub import offline_unless_hub
    from .models.loading import final_info
    from .teacher_cache import TeacherCacheError
    from .training.scoring import evaluate_model

    try:
        cfg = load_config(args.config, args.set)
        if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
            raise ConfigError("--adapter", args.adapter, "a peft adapter folder (with adapter_config.json)")
        model, revision = args.model, args.revision
        if model is None:
            info = final_info(args.adapter) if args.adapter else {}
            if not info.get("base_model"):
                raise ConfigError(
                    "--model", None, "a folder or Hub id (or an --adapter folder naming its base)"
                )
            model, revision = info["base_model"], revision or info.get("revision") or ""
        offline_unless_hub(cfg.model)
        scores = evaluate_model(cfg, model, adapter=args.adapter, split=args.split, revision=revision,
                                with_teacher=not args.no_teacher)  # fmt: skip
    except (ConfigError, RunError, TeacherCacheError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = model + (f" + {args.adapter}" if args.adapter else "")
    print(f"{args.split} split of {args.config}: {what}\n\n{scores.table()}")
    if args.out:
        Path(args.out).write_text(json.dumps(scores.to_json(), indent=1) + "\n")
        print(f"\nscores: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
