"""A full distillation train step, three ways, side by side in one run: ddk_fast's own step, a hand-written
Hugging Face ``Trainer`` KD loop and TRL's ``GKDTrainer`` (issue 22, item 4).

Set-up (``SHAPES["real"]``): a random Llama-style teacher (4 layers x hidden 256) and student (2 x 128) at
Qwen's vocabulary V = 151936, built here from configs and saved in a temporary folder (offline); the student
is QLoRA (bitsandbytes NF4 base with double quantisation, fp32 compute, peft LoRA r 16 / alpha 32 / dropout
0 on q/k/v/o/gate/up/down, the CPU repack bug worked around with
``ddk_fast.models.loading.disable_bnb_cpu_repack`` in every arm); 4 x 512 = 2048 loss tokens per step, fp32,
CPU; AdamW (lr 1e-4, betas 0.9/0.999, weight decay 0, constant schedule, gradient clipping at 1.0) and the
loss CE + forward KL (T 1, kd weight 1, mean over tokens) in every arm, on the same batches.

Arms (each in its own process, loaded one after the other; the steps then run interleaved A B C A B C ...,
only one process computing at a time):

- ``ddk_fast``: :class:`ddk_fast.training.trainer.Trainer` (what ``python -m ddk_fast.train`` builds) runs
  ``fit()``: its own loop, sampler (prefetch thread), step (:meth:`Trainer.train_step`: teacher forward,
  student forward + fused chunked KD loss, backward, clip, finite-flag host read, AdamW), metrics row per
  step. The batches are its sampler's: drawn once after ``setup()`` (then the sampler is rewound with
  ``load_state_dict``) and written to ``batches.npz`` for the other arms; every batch the loop consumes is
  checked equal to the saved one.
- ``hf_trainer``: a ``transformers.Trainer`` subclass whose ``compute_loss`` runs both models, materialises
  both ``[2048, V]`` logits and calls ``ddk_fast.ops.naive.kd_loss_naive`` (the repo's naive provider: CE +
  forward KL written over all logits, autograd). Same batches (sequential sampler, one batch per item).
- ``trl_gkd``: TRL's ``GKDTrainer`` with ``lmbda = 0`` (no generation), ``beta = 0`` (forward KL),
  ``seq_kd = False``; ``bf16`` and ``gradient_checkpointing`` set to False (TRL's SFT defaults turn both
  on). GKD shifts the labels itself, so it gets the 513-token rows the batch was cut from (the first label
  masked): the same 2048 loss tokens, 0.2 % more forward positions. Its loss has **no CE term**
  (``generalized_jsd_loss`` only): it is compared with the KL part (``kd_step1``) of the other arms.

Timing: the time of one whole loop iteration (from the release of the step to the loop's next step start:
the step, logging, the next batch), median of ``timed`` steps after ``warmup`` steps. Memory: each process
reads VmRSS when loaded (its models, optimizer not yet built), resets the peak (``5 > /proc/self/clear_refs``)
and reads VmHWM after warm-up and after the last step: ``peak_mb`` = the higher peak minus the loaded RSS.
glibc is told to ``mmap`` allocations >= 64 KiB (as ``bench.harness.peak_memory_subprocess``), in every arm.
Then ``profile`` more steps of each arm run with timers around its parts (``e2e_profile`` rows): ddk_fast's
teacher forward, student forward, fused loss forward, the loss's and the student's backward (split by a hook
on the student's final hidden states), clipping, the finite-flag host read, the optimizer, the metrics row,
the sampler; the Hugging Face arms' forwards (with logits), loss, backward and optimizer. The arms' process
side (their loops, the models, the step-by-step protocol) is ``bench/e2e_arms.py``.

    pytest bench/bench_e2e.py --benchmark-disable -q     # smoke (CI): V 512, 8 x 2 tokens, 1 step per arm
    pytest bench/bench_e2e.py --benchmark-only -q -s     # the real run: writes bench/results/e2e.{jsonl,csv}
    python -m bench.bench_e2e [real|smoke]               # the same, outside pytest

``DDK_BENCH_THREADS`` (default: all cores) sets each arm's torch threads; ``DDK_BENCH_E2E_TIMED`` the timed
steps (default 5). An arm whose package (bitsandbytes / peft / trl) is missing is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.e2e_arms import PROTO, SHAPES, build_assets

REPO = Path(__file__).resolve().parents[1]
ARMS = ("ddk_fast", "hf_trainer", "trl_gkd")
NEEDS = {
    "ddk_fast": ("bitsandbytes", "peft"),
    "hf_trainer": ("bitsandbytes", "peft"),
    "trl_gkd": ("bitsandbytes", "peft", "trl"),
}


def missing(arm: str) -> list[str]:
    return [m for m in NEEDS[arm] if importlib.util.find_spec(m) is None]


# ------------------------------------------------------------------------------------------------ coordinator


class Child:
    """One arm's process: started, loaded, then driven step by step over its stdin / stdout."""

    def __init__(self, arm: str, root: Path, mode: str, n_batches: int, threads: int):
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
            "MALLOC_TRIM_THRESHOLD_": str(64 * 1024),
            "OMP_NUM_THREADS": str(threads),
            "DDK_BENCH_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
        }
        self.arm = arm
        self.log_path = root / f"{arm}.log"
        self.log = self.log_path.open("w")
        call = f"child_main({arm!r}, {str(root)!r}, {mode!r}, {n_batches})"
        code = f"from bench.e2e_arms import child_main; {call}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.base_kb = self.read()["rss_kb"]
        self.load_s = time.perf_counter() - t0

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.log.flush()
                tail = self.log_path.read_text()[-4000:]
                raise RuntimeError(f"arm {self.arm} exited ({self.proc.returncode}):\n{tail}")
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO) :])

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> dict:
        msg = self.command("stop")
        self.proc.wait(timeout=120)
        self.log.close()
        return msg


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_e2e(mode: str = "real", arms=ARMS) -> dict:
    """Build the models, start the arms, run the interleaved steps; returns ``{"rows": [...], "profile":
    [...], "skipped": {arm: why}}`` (nothing is written)."""
    from bench.harness import device_name, env_info

    shape = SHAPES[mode]
    threads = int(os.environ.get("DDK_BENCH_THREADS", "0")) or os.cpu_count() or 1
    rounds = shape["warmup"] + shape["timed"]
    n_batches = rounds + shape["profile"] + 1
    skipped = {a: f"needs {', '.join(missing(a))}" for a in arms if missing(a)}
    arms = [a for a in arms if a not in skipped]
    if "ddk_fast" not in arms:  # it draws the batches of the others
        return {
            "rows": [],
            "profile": [],
            "skipped": {**skipped, **{a: "needs the ddk_fast arm" for a in arms}},
        }
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        root = Path(tmp)
        build_assets(root, shape)
        children = {}
        try:
            for arm in arms:  # one after the other: ddk_fast first (it writes batches.npz)
                children[arm] = Child(arm, root, mode, n_batches, threads)
            steps = {a: [] for a in arms}
            marks = {}
            for r in range(rounds):
                for arm in arms:
                    steps[arm].append(children[arm].command("step"))
                took = ", ".join(f"{a} {steps[a][-1]['seconds']:.2f} s" for a in arms)
                print(f"bench_e2e round {r + 1}/{rounds}: {took}", file=sys.stderr, flush=True)
                if r == shape["warmup"] - 1 or shape["warmup"] == 0 and r == 0:
                    marks = {a: children[a].command("mark") for a in arms} if shape["warmup"] else {}
            profile = {a: [children[a].command("profile") for _ in range(shape["profile"])] for a in arms}
            ends = {a: children[a].stop() for a in arms}
        finally:
            for c in children.values():
                if c.proc.poll() is None:
                    c.proc.kill()
    load_after = _loadavg()
    env = env_info("cpu")
    tokens = shape["batch"] * shape["seq"]
    rows = []
    for arm in arms:
        timed = [s["seconds"] for s in steps[arm][shape["warmup"] :]]
        hwm = max(ends[arm]["hwm_kb"], marks.get(arm, {}).get("hwm_kb", 0))
        first = steps[arm][0]
        rows.append(
            {
                "arm": arm,
                "V": shape["vocab"],
                "tokens": tokens,
                "mode": mode,
                "s_per_step": statistics.median(timed),
                "s_min": min(timed),
                "s_max": max(timed),
                "s_steps": [round(s, 4) for s in timed],
                "warmup": shape["warmup"],
                "threads": threads,
                "peak_mb": (hwm - children[arm].base_kb) / 1024,
                "loaded_rss_mb": children[arm].base_kb / 1024,
                "load_s": children[arm].load_s,
                "loss_step1": first["loss"],
                "ce_step1": first.get("ce"),
                "kd_step1": first.get("kd"),
                "loss_steps": [s["loss"] for s in steps[arm]],
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "machine": device_name("cpu"),
                "commit": env["git_sha"],
                "shape": {
                    k: shape[k] for k in ("t_layers", "t_hidden", "s_layers", "s_hidden", "batch", "seq")
                },
            }
        )
    _compare(rows)
    prof_rows = [_profile_row(arm, profile[arm], shape, env) for arm in arms]
    return {"rows": rows, "profile": prof_rows, "skipped": skipped}


def _compare(rows: list[dict]) -> None:
    """Ratios against the HF loop, and the step-1 loss agreement: ddk_fast and hf_trainer compute the same
    loss (CE + KL); TRL's GKD loss is the KL term alone, compared with the others' ``kd_step1``."""
    by = {r["arm"]: r for r in rows}
    hf = by.get("hf_trainer")
    for r in rows:
        if hf is not None:
            r["speedup_vs_hf"] = hf["s_per_step"] / r["s_per_step"]
            r["mem_vs_hf"] = r["peak_mb"] / hf["peak_mb"] if hf["peak_mb"] > 0 else None
        if r["arm"] == "trl_gkd":
            ref = by.get("hf_trainer", by.get("ddk_fast"))
            r["loss_compared"] = "loss_step1 (KL only) vs kd_step1 of " + ref["arm"]
            r["loss_rel_diff"] = abs(r["loss_step1"] - ref["kd_step1"]) / abs(ref["kd_step1"])
        elif r["arm"] != "hf_trainer" and hf is not None:
            r["loss_compared"] = "loss_step1 and kd_step1 vs hf_trainer's"
            r["loss_rel_diff"] = max(abs(r[k] - hf[k]) / abs(hf[k]) for k in ("loss_step1", "kd_step1"))


def _profile_row(arm: str, steps: list[dict], shape: dict, env: dict) -> dict:
    """Median seconds per part over the profile steps, and each part's share of the step (``other``: the rest
    of the loop iteration)."""
    total = statistics.median(s["seconds"] for s in steps)
    names = sorted({k for s in steps for k in (s.get("parts") or {})})
    parts = {k: statistics.median((s.get("parts") or {}).get(k, 0.0) for s in steps) for k in names}
    parts["other (loop, Python, not timed apart)"] = max(0.0, total - sum(parts.values()))
    return {
        "arm": arm,
        "V": shape["vocab"],
        "tokens": shape["batch"] * shape["seq"],
        "steps": len(steps),
        "s_per_step": total,
        "parts_s": parts,
        "shares": {k: v / total for k, v in parts.items()},
        "date": env["date"],
        "torch": env["torch"],
        "machine": env["device"],
        "commit": env["git_sha"],
    }


def record_results(res: dict) -> None:
    from bench.harness import record

    for row in res["rows"]:
        record("e2e", {**row, "median_ms": row["s_per_step"] * 1e3}, force=True)
    for row in res["profile"]:
        record("e2e_profile", {**row, "median_ms": row["s_per_step"] * 1e3}, force=True)


def summary(res: dict) -> str:
    lines = [
        "| arm | s / step (median) | peak MB over loaded | loss step 1 | KL step 1 | x HF speed | mem / HF |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        kd = "" if r.get("kd_step1") is None else f"{r['kd_step1']:.7f}"
        lines.append(
            f"| {r['arm']} | {r['s_per_step']:.2f} ({r['s_min']:.2f}-{r['s_max']:.2f}) | "
            f"{r['peak_mb']:.0f} | {r['loss_step1']:.7f} | {kd} | {r.get('speedup_vs_hf', 0):.2f} | "
            f"{r.get('mem_vs_hf') or 0:.3f} |"
        )
    for p in res["profile"]:
        lines.append(f"\nprofile {p['arm']} ({p['s_per_step']:.2f} s/step, {p['steps']} steps):")
        for k, v in sorted(p["parts_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<40} {v:7.3f} s  {100 * p['shares'][k]:5.1f} %")
    lines += [f"skipped {a}: {why}" for a, why in res["skipped"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pytest


def test_e2e_step(benchmark):
    smoke = benchmark.disabled
    res = run_e2e("smoke" if smoke else "real")
    if not res["rows"]:
        pytest.skip(f"no arm could run: {res['skipped']}")
    print("\n" + summary(res))
    for r in res["rows"]:  # the arms computed the same loss on the same batch (TRL's: the KL term)
        if "loss_rel_diff" in r:
            assert r["loss_rel_diff"] <= 1e-5, r
        assert r["s_per_step"] > 0 and r["peak_mb"] > 0, r
    if not smoke:
        record_results(res)


if __name__ == "__main__":
    result = run_e2e(sys.argv[1] if len(sys.argv) > 1 else "real")
    print(summary(result))
    if result["rows"] and result["rows"][0]["mode"] == "real":
        record_results(result)
