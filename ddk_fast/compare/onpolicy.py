"""The on-policy measure of a comparison's students, taken after training from each run's latest checkpoint.

The measure is the library's own (:func:`~ddk_fast.training.onpolicy.continuation_teacher_ce`): the student
continues the first ``prompt_tokens`` tokens of every **test** sequence with ``max_new_tokens`` tokens (the
``[compare.onpolicy]`` sampling; its noise is keyed by the prompt's tokens and ``seed``, so every student of a
comparison sees the same noise on the same prompt), the teacher scores prompt + continuation, and its
per-token CE on the generated tokens is averaged per domain. Lower = the student writes what the teacher
would. Every arm is measured the same way (off-policy ones too), so a pair compares like with like; the
value is cached in the run folder (``onpolicy_measure.json``, keyed by the measure's settings and the
checkpoint) so a rerun reuses it.

:func:`measure_untrained` gives the two reference points of a seed: the untrained student (the shared
initialisation) and the teacher continuing the prompts itself (its CE on its own samples: its entropy rate;
a student writing repetitive, likely text can score below it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import build_config
from ..training import checkpoint as ckpt
from ..training.trainer import Trainer
from .arms import merge_sections, short_hash

CACHE = "onpolicy_measure.json"
# prompts per generate call when measuring (``[ddk] eval_batch_size`` of the measure only: a demo domain's 48
# test prompts in one call; on a CPU, decoding a tiny model is per-call overhead, so this is ~5x faster than
# the default 8). Part of the cache key: a different batch can flip a near-tie token.
MEASURE_BATCH = 64


def measure_config(raw: dict, table: dict, scratch: Path) -> dict:
    """``raw`` set up for measuring: ``[onpolicy]`` = the ``[compare.onpolicy]`` keys with λ 0 (nothing is
    trained; the keys only define the prompts and the sampling), ``MEASURE_BATCH`` prompts per call, output
    to a scratch folder."""
    return merge_sections(
        raw,
        {
            "onpolicy": {**table, "fraction": 0.0},
            "ddk": {"eval_batch_size": MEASURE_BATCH},
            "output": {"dir": str(scratch), "progress": False},
        },
    )


def _settings(raw: dict, table: dict) -> dict:
    cfg = build_config(measure_config(raw, table, Path("unused")), check_paths=False)
    op = {k: v for k, v in cfg.to_dict()["onpolicy"].items() if k != "fraction"}
    return {"onpolicy": op, "batch": MEASURE_BATCH}


def _measure(raw: dict, table: dict, scratch: Path, checkpoint: Path | None, writers: tuple[str, ...]):
    trainer = Trainer(build_config(measure_config(raw, table, scratch)))
    trainer.setup()
    try:
        if checkpoint is not None:
            ckpt.load_checkpoint(checkpoint, trainer.models.student)
        return {w: trainer.continuation_teacher_ce("test", w) for w in writers}
    finally:
        trainer.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _cached(folder: Path, key: str) -> dict | None:
    path = folder / CACHE
    if path.exists():
        row = json.loads(path.read_text())
        if row.get("key") == key:
            return row
    return None


def _row(per_domain: list[float]) -> dict:
    # every domain has the same number of prompts and each continuation the same length: the plain mean
    # over domains is the token-weighted one
    return {"cont_ce": per_domain, "cont_ce_mean": sum(per_domain) / len(per_domain)}


def measure_run(raw: dict, run_dir: Path, table: dict) -> dict:
    """The on-policy measure of the finished run in ``run_dir`` (trained with the config ``raw``), from its
    latest checkpoint that verifies: ``{"cont_ce": [per domain], "cont_ce_mean", "key"}``. ``table``: the
    ``[compare.onpolicy]`` keys. Cached in ``run_dir/onpolicy_measure.json``."""
    run_dir = Path(run_dir)
    path, _ = ckpt.select_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise ValueError(f"{run_dir}: no checkpoint that verifies to measure")
    key = short_hash({**_settings(raw, table), "checkpoint": path.name})
    hit = _cached(run_dir, key)
    if hit is not None:
        return hit
    got = _measure(raw, table, run_dir / "onpolicy_measure_tmp", path, ("student",))
    row = {**_row(got["student"]), "key": key}
    (run_dir / CACHE).write_text(json.dumps(row) + "\n")
    return row


def measure_untrained(raw: dict, folder: Path, table: dict) -> dict:
    """The reference points of a seed (``raw``: its config with the shared init as the student):
    ``{"student": {"cont_ce", "cont_ce_mean"}, "teacher": {...}, "key"}``, cached in ``folder``."""
    folder = Path(folder)
    key = short_hash({**_settings(raw, table), "writers": ["student", "teacher"]})
    hit = _cached(folder, key)
    if hit is not None:
        return hit
    got = _measure(raw, table, folder / "onpolicy_measure_tmp", None, ("student", "teacher"))
    row = {"student": _row(got["student"]), "teacher": _row(got["teacher"]), "key": key}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE).write_text(json.dumps(row) + "\n")
    return row
