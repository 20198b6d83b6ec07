"""The GPU benchmark matrix of the fused KD loss: every provider side by side at the Llama / Qwen head shapes,
fwd+bwd, bf16 inputs, frozen student head (dH only: the FLOP floor's case), one JSON object per line.

    python -m bench.gpu.kd_loss_matrix --out DIR                  # GPU: DIR/gpu_kd_loss.jsonl (+ profile)
    python -m bench.gpu.kd_loss_matrix --out DIR --dry-run        # CPU: the same code at tiny shapes

Row schema (one per provider x shape x divergence; extra keys welcome): ``impl`` (torch_eager,
torch_compile, liger, ddk_fast_<variant>), ``divergence``, ``N``, ``H_s``, ``H_t``, ``V_s``, ``V_t``,
``dtype``, ``ms`` (median of ``reps`` >= 20 CUDA-event timings after warm-up; fewer only when one call is
slower than ``PER_CONFIG_S / REPS``, and ``reps`` says so), ``ms_p10`` / ``ms_p90``, ``peak_extra_gb``
(max_memory_allocated above the memory in use before the step), ``max_rel_grad_err`` (max |dH - dH64| /
max |dH64| over the first ``GRAD_CHECK_ROWS`` rows, dH64 from the float64 formula of ddk_fast/ops/naive.py
on those rows; ``rms_rel_grad_err`` the same with 2-norms; ``bf16_rounding_*`` what rounding dH64 to bf16
alone gives: a bf16 gradient cannot beat it), ``flop_floor``, ``tflops`` (floor / ms),
``fraction_of_floor_speed`` (floor time at the measured dense bf16 matmul rate / ms), ``ratio_vs_<impl>``
(that impl's ms / ours), ``device``, ``torch``, ``triton``, ``date``, ``git_sha``; ``skipped`` /
``error`` instead of ``ms`` when a provider could not run.

Budget (the whole GPU script must finish in 8 minutes on an H200): the plan runs in priority order (the
issue's headline shape first) and starts no new shape after ``--budget-s`` (run.sh gives it what the tests
leave, ~240 s). Estimate, from the issue's H100 numbers (eager ~213 ms, Liger ~61 ms at 1B <- 8B N 8192):
per shape 8 providers x (3 warm-up + 20 timed + 2 checked calls): eager ~5 s, compile ~4 s, Liger ~1.5 s,
our chunked providers ~1 s each, vsplit / rowblock unknown (capped near ``PER_CONFIG_S`` = 8 s), + ~2 s of
float64 reference: 15-40 s a shape; first-use compiles ~60 s (torch.compile, once: dynamic shapes) + ~40 s
(Triton kernels); N 16384 costs about twice an N 8192 shape. 8 shapes ~ 220-420 s: the budget cuts the tail
(4096/4096 and N 16384 last), never the headline rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.bench_kd_loss import (
    DDK_PROVIDERS,
    GPU_SHAPES,
    LIGER_BETA,
    eager_fits,
    flop_floor,
    loss_fn,
    make_inputs,
    provider_env,
)
from bench.harness import env_info, event_times_ms, matmul_tflops
from ddk_fast.ops.naive import fused_linear_kd_loss_naive

PROVIDERS = ("torch_eager", "torch_compile", "liger", *DDK_PROVIDERS)
PLAN = (  # (shape, divergence) in priority order
    ("llama3.2-1b<-3.1-8b-n8192", "jsd"),
    ("llama3.2-1b<-3.1-8b-n8192", "forward_kl"),
    ("llama3.2-1b<-3.1-8b-n8192", "reverse_kl"),
    ("llama3.2-1b<-3.1-8b-n1024", "jsd"),
    ("llama3.2-1b<-3.1-8b-n4096", "jsd"),
    ("qwen2.5-0.5b<-7b-n8192", "jsd"),
    ("h4096-v128256-n8192", "jsd"),
    ("llama3.2-1b<-3.1-8b-n16384", "jsd"),
)
DRY_RUN_SHAPE = (48, 32, 48, 1271, 1280)  # CPU dry run: every plan entry at this shape (interpreter)
TEMPERATURE = 2.0
BETA = 0.5
REPS = 20
MIN_REPS = 5
WARMUP = 2
PER_CONFIG_S = 8.0  # timed calls of one provider at one shape stay under this (reps drop towards MIN_REPS)
GRAD_CHECK_ROWS = 32
BUDGET_S = 240.0
RESULTS_FILE = "gpu_kd_loss.jsonl"
LOG_KEYS = ("impl", "shape", "divergence", "ms", "peak_extra_gb", "max_rel_grad_err", "error", "wall_s")
PROFILE_FILE = "gpu_profile.txt"
PROFILED = ("ddk_fast_chunked", "ddk_fast_chunked_gif", "ddk_fast_vsplit", "liger")


def liger_available() -> str | None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # ImportError, or a liger that does not import with this triton
        return f"liger_kernel not importable ({exc.__class__.__name__}: {exc})"
    return None


def reference_grad(tensors, divergence: str, rows: int, liger: bool):
    """float64 dH of the first ``rows`` rows, scaled by their counted tokens (a row's gradient is its own,
    divided by the batch's count), from the naive formula; ``liger``: Liger's loss (no CE, no T^2)."""
    h_s, w_s, h_t, w_t, labels = tensors
    h = h_s[:rows].detach().double().requires_grad_()
    kw = dict(divergence=divergence, beta=BETA, temperature=TEMPERATURE)
    if liger:
        kw.update(ce_weight=0.0, scale_by_t2=False)
    w_s64, h_t64, w_t64 = w_s.detach().double(), h_t[:rows].double(), w_t.double()
    out = fused_linear_kd_loss_naive(h, w_s64, h_t64, w_t64, labels[:rows], compute_dtype=torch.float64, **kw)
    (g,) = torch.autograd.grad(out.loss, h)
    return g * (labels[:rows] != -100).sum().clamp(min=1).double()


def rel_errs(grad, ref, labels, rows) -> tuple[float, float]:
    """(max |g - g64| / max |g64|, ||g - g64|| / ||g64||) of ``grad`` of the whole batch (its rows divided by
    the batch's count, from ``labels`` [N]) against ``reference_grad``'s rows."""
    got = grad[:rows].double() * (labels != -100).sum().clamp(min=1).double()
    diff = got - ref
    return (
        (diff.abs().max() / ref.abs().max().clamp(min=1e-30)).item(),
        (diff.norm() / ref.norm().clamp(min=1e-30)).item(),
    )


def bf16_floor(ref) -> tuple[float, float]:
    """The two errors of the float64 gradient merely rounded to bf16: what a bf16 gradient cannot beat."""
    diff = ref.bfloat16().double() - ref
    return (diff.abs().max() / ref.abs().max()).item(), (diff.norm() / ref.norm()).item()


def run_provider(provider, tensors, divergence, device, refs, max_reps):
    h_s, w_s, h_t, w_t, labels = tensors
    vs = w_s.shape[0]
    beta = BETA if divergence == "jsd" else LIGER_BETA.get(divergence, BETA)
    fn = loss_fn(provider, vs, divergence, device, beta=beta, temperature=TEMPERATURE)

    def step():
        h_s.grad = None
        with provider_env(provider):
            fn(h_s, w_s, h_t, w_t, labels).backward()

    warm = WARMUP + (1 if provider == "torch_compile" else 0)
    for _ in range(warm):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        one = time.perf_counter() - t0
    reps = max(MIN_REPS, min(max_reps, int(PER_CONFIG_S / max(one, 1e-6))))
    times = sorted(event_times_ms(step, device, reps))
    peak = None
    if device.type == "cuda":
        h_s.grad = None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    else:
        step()
    ref = refs["liger" if provider == "liger" else "ours"]
    err, rms_err = rel_errs(h_s.grad, ref, labels, GRAD_CHECK_ROWS)
    floor_max, floor_rms = bf16_floor(ref)
    return {
        "ms": statistics.median(times),
        "ms_p10": times[len(times) // 10],
        "ms_p90": times[min(len(times) - 1, (9 * len(times)) // 10)],
        "reps": reps,
        "peak_extra_gb": peak,
        "max_rel_grad_err": err,
        "rms_rel_grad_err": rms_err,
        "bf16_rounding_max_rel_err": floor_max,
        "bf16_rounding_rms_rel_err": floor_rms,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for gpu_kd_loss.jsonl and gpu_profile.txt")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no new shape after this")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU + Triton interpreter)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--plan", type=int, default=len(PLAN), help="run only the first K plan entries")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: pass --dry-run for the CPU rehearsal at tiny shapes", file=sys.stderr)
        return 2
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / RESULTS_FILE
    providers = [p for p in args.providers.split(",") if p]
    t0 = time.monotonic()
    env = env_info(device)
    peak_tflops = matmul_tflops(str(device), torch.bfloat16)
    liger_missing = liger_available()
    print(f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, bf16 matmul "
          f"{peak_tflops:.0f} TFLOP/s, liger: {liger_missing or 'available'}", flush=True)  # fmt: skip
    n_rows = 0
    for shape_name, divergence in PLAN[: args.plan]:
        shape = DRY_RUN_SHAPE if args.dry_run else GPU_SHAPES[shape_name]
        n, hs, ht, vs, vt = shape
        base = {"shape": shape_name + ("-dry-run" if args.dry_run else ""), "divergence": divergence,
                "N": n, "H_s": hs, "H_t": ht, "V_s": vs, "V_t": vt, "dtype": "bfloat16", "beta": BETA,
                "temperature": TEMPERATURE, "trainable_head": False}  # fmt: skip
        rows = []
        if time.monotonic() - t0 > args.budget_s:
            rows = [{"impl": p, **base, "skipped": "GPU time budget spent"} for p in providers]
        else:
            tensors = make_inputs(n, hs, ht, vs, vt, "bfloat16", device, trainable_head=False)
            refs = {"ours": reference_grad(tensors, divergence, GRAD_CHECK_ROWS, liger=False)}
            if "liger" in providers and divergence in LIGER_BETA:
                refs["liger"] = reference_grad(tensors, divergence, GRAD_CHECK_ROWS, liger=True)
        for provider in providers if not rows else ():
            row = {"impl": provider, **base}
            skip = None
            if provider == "liger":
                skip = liger_missing or (None if device.type == "cuda" else "liger needs CUDA")
                if skip is None and divergence not in LIGER_BETA:
                    skip = f"LigerFusedLinearJSD has no {divergence}"
            if provider == "torch_eager" and not eager_fits(n, vs, device):
                skip = "fp32 logits of all N tokens do not fit in GPU memory"
            if skip:
                rows.append({**row, "skipped": skip})
                continue
            started = time.monotonic()
            try:
                row.update(run_provider(provider, tensors, divergence, device, refs, args.reps))
            except Exception as exc:  # record and go on: one failing provider must not lose the run
                row["error"] = f"{exc.__class__.__name__}: {exc}"[:2000]
                traceback.print_exc()
            row["wall_s"] = round(time.monotonic() - started, 2)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: row.get(k) for k in LOG_KEYS}), flush=True)
        tensors = refs = None  # free the heads before the next shape
        floor = flop_floor(n, hs, ht, vs)
        timed = {r["impl"]: r["ms"] for r in rows if r.get("ms")}
        with out_path.open("a") as f:
            for r in rows:
                if r.get("ms"):
                    r["flop_floor"] = floor
                    r["tflops"] = floor / (r["ms"] * 1e-3) / 1e12
                    r["matmul_tflops"] = peak_tflops
                    r["fraction_of_floor_speed"] = (floor / (peak_tflops * 1e12) * 1e3) / r["ms"]
                    for peer, ms in timed.items():
                        if peer != r["impl"]:
                            r[f"ratio_vs_{peer}"] = ms / r["ms"]
                f.write(json.dumps({**r, **env}, default=str) + "\n")
                n_rows += 1
    if device.type == "cuda" and not args.no_profile and time.monotonic() - t0 < args.budget_s + 60:
        profile(out_dir / PROFILE_FILE, device, providers)
    print(f"{n_rows} rows -> {out_path} in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def profile(path: Path, device, providers) -> None:
    """Kernel time table of 3 fwd+bwd steps per ddk_fast variant at the headline shape (where time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    shape = GPU_SHAPES[PLAN[0][0]]
    n, hs, ht, vs, vt = shape
    tensors = make_inputs(n, hs, ht, vs, vt, "bfloat16", device, trainable_head=False)
    h_s, w_s, h_t, w_t, labels = tensors
    with path.open("w") as f:
        for provider in [p for p in providers if p in PROFILED]:
            try:
                fn = loss_fn(provider, vs, "jsd", device, beta=BETA, temperature=TEMPERATURE)
                with provider_env(provider):
                    fn(h_s, w_s, h_t, w_t, labels).backward()  # warm
                    torch.cuda.synchronize(device)
                    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                        for _ in range(3):
                            h_s.grad = None
                            fn(h_s, w_s, h_t, w_t, labels).backward()
                        torch.cuda.synchronize(device)
                f.write(f"== {provider} {PLAN[0][0]} jsd bf16, 3 fwd+bwd steps\n")
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15) + "\n\n")
            except Exception as exc:
                f.write(f"== {provider}: profile failed: {exc.__class__.__name__}: {exc}\n\n")


if __name__ == "__main__":
    sys.exit(main())
