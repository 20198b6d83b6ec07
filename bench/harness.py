"""The one shared benchmark harness of ddk_fast (every ``bench/bench_*.py`` uses it).

What it gives a benchmark file (stable API)::

    from bench.harness import env_info, time_fn, peak_memory, peak_memory_subprocess, matmul_tflops, record

    def test_my_op(benchmark, device):                         # pytest-benchmark's `benchmark` fixture
        fn = make_fn(...)                                      # a closure doing one full step (e.g. fwd+bwd)
        t = time_fn(benchmark, fn, device=device, rounds=10)   # median/IQR via pytest-benchmark's stats
        mem = peak_memory(fn, device)                          # CUDA: in-process max_memory_allocated
        # CPU: mem = peak_memory_subprocess("bench.bench_my_op:make_fn", {"n": 2048, ...})
        record("my_op", {"provider": "naive", "n": 2048, **t, "peak_mem_mb": mem / 2**20})

* ``time_fn(benchmark, fn, device=..., rounds=..., warmup=1)`` runs ``fn`` through ``benchmark.pedantic`` (so
  ``--benchmark-json`` / ``--benchmark-compare`` work), synchronising CUDA after each call, and returns
  ``{"median_ms", "iqr_ms", "stddev_ms", "min_ms", "rounds"}``. Under ``--benchmark-disable`` (CI smoke run)
  ``fn`` runs once and the timing fields are ``None``.
* ``event_times_ms(fn, device, reps)``: per-call milliseconds from CUDA events (perf_counter on CPU), for
  runs outside pytest-benchmark (the GPU matrix, bench/gpu/kd_loss_matrix.py).
* ``peak_memory(fn, device)``: bytes allocated by ``fn`` above what was allocated before it. CUDA: exact,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the subprocess method.
* ``peak_memory_subprocess("module:factory", kwargs)``: the honest CPU measurement. A fresh Python process
  (cwd = repo root) calls ``factory(**kwargs)`` (it builds its inputs and returns a zero-argument callable),
  calls it once to warm up, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records
  the current RSS, calls it again and reads ``VmHWM``: peak extra = VmHWM - RSS before. glibc is told to
  ``mmap`` every allocation >= 64 KiB and return it on free (``MALLOC_MMAP_THRESHOLD_``), so RSS follows the
  live tensors instead of the allocator's cache. Costs one ``import torch`` (~2 s) per measurement.
* ``child_env()``: that child's environment; ``status_kib("VmRSS")``: a ``/proc/self/status`` field, KiB.
* ``matmul_tflops(device, dtype)``: the dense matmul rate measured now, on this device (the roofline that
  ``achieved TFLOP/s`` rows are compared against). Cached per process.
* ``record(name, row)``: stamps ``env_info()`` (device, torch/triton/transformers versions, git SHA + dirty,
  UTC date, host, threads) onto the row and appends it to ``bench/results/<name>.jsonl``; ``<name>.csv`` is
  rewritten from the JSONL (union of columns). Rows are written only when timing ran (``median_ms`` not None)
  unless ``force=True``: the smoke run leaves the results alone. ``DDK_BENCH_RESULTS`` overrides the folder.

Nothing here imports triton or touches CUDA at import time.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("DDK_BENCH_RESULTS", REPO / "bench" / "results"))


# ------------------------------------------------------------------------------------------------ environment


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except Exception:
        return ""


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} x{os.cpu_count()}"


def env_info(device: torch.device | str = "cpu") -> dict:
    """Device, library versions, git SHA (``-dirty``: tracked files outside bench/results/ changed), UTC date,
    host."""
    sha = _git("rev-parse", "--short=12", "HEAD")
    # results files a run appends to do not make its own later rows "dirty"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton") if torch.device(device).type == "cuda" or _triton_loaded() else None,
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "git_sha": sha + ("-dirty" if dirty else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _triton_loaded() -> bool:
    if "triton" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    except Exception:
        return False


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ timing


def time_fn(benchmark, fn: Callable[[], object], *, device="cpu", rounds: int = 5, warmup: int = 1) -> dict:
    """Time ``fn`` with pytest-benchmark (``pedantic``; CUDA synchronised). Returns milliseconds."""

    def step():
        fn()
        sync(device)

    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None) if stats is not None else None
    if inner is None or getattr(benchmark, "disabled", False):
        return {"median_ms": None, "iqr_ms": None, "stddev_ms": None, "min_ms": None, "rounds": 1}
    return {
        "median_ms": inner.median * 1e3,
        "iqr_ms": inner.iqr * 1e3,
        "stddev_ms": inner.stddev * 1e3,
        "min_ms": inner.min * 1e3,
        "rounds": inner.rounds,
    }


# ------------------------------------------------------------------------------------------------ memory


def event_times_ms(fn: Callable[[], object], device="cpu", reps: int = 20) -> list[float]:
    """Per-call times (ms) of ``reps`` back-to-back calls of ``fn`` (warm it up first). CUDA: a pair of CUDA
    events around each call, one synchronisation at the end (no host gap is counted); CPU: perf_counter."""
    import time

    device = torch.device(device)
    if device.type == "cuda":
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        torch.cuda.synchronize(device)
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in pairs]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory(fn: Callable[[], object], device="cpu", factory: str | None = None, kwargs=None) -> int:
    """Peak bytes allocated by one call of ``fn`` above the memory in use before it.

    CUDA: in process. CPU: needs ``factory``/``kwargs`` (see :func:`peak_memory_subprocess`)."""
    device = torch.device(device)
    if device.type == "cuda":
        fn()  # warm-up: lazy init, autotuning, compile
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if factory is None:
        raise ValueError(
            "peak_memory on CPU: pass factory='module:function' and kwargs (runs in a subprocess)"
        )
    return peak_memory_subprocess(factory, kwargs or {})


_CHILD = "from bench.harness import _child_main; _child_main()"


def child_env(return_freed: bool = True) -> dict:
    """The environment of a memory-measuring child: this one, the repo on ``PYTHONPATH``, and
    (``return_freed``) glibc told to ``mmap`` every block >= 64 KiB and give it back on free, so RSS
    follows the live tensors; without it, glibc's defaults (freed blocks may stay in the heap: the RSS a
    user's process shows)."""
    env = dict(os.environ)
    if return_freed:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
        env["MALLOC_TRIM_THRESHOLD_"] = str(64 * 1024)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def peak_memory_subprocess(factory: str, kwargs: dict, timeout: float = 600.0) -> int:
    """Peak extra RSS (bytes) of one call of ``factory(**kwargs)()`` in a fresh process (module docstring)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, factory, json.dumps(kwargs)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child for {factory} failed:\n{proc.stderr[-4000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process: VmHWM := VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_main() -> None:
    mod_name, func_name = sys.argv[1].split(":")
    kwargs = json.loads(sys.argv[2])
    fn = getattr(importlib.import_module(mod_name), func_name)(**kwargs)
    fn()  # warm-up (lazy init, torch.compile)
    reset_peak_rss()
    base = status_kib("VmRSS")
    fn()
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_extra_bytes": max(0, peak - base) * 1024, "base_rss_bytes": base * 1024}))


# ------------------------------------------------------------------------------------------------ roofline


@functools.cache
def matmul_tflops(device="cpu", dtype: torch.dtype = torch.bfloat16, size: int | None = None) -> float:
    """Dense ``size^3`` matmul rate (TFLOP/s, median of 10) measured now on ``device``."""
    import time

    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU path computes in fp32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return 2 * size**3 / times[len(times) // 2] / 1e12


def tflops(flop: float, median_ms: float | None) -> float | None:
    return None if not median_ms else flop / (median_ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------ results


def result_path(name: str, ext: str = "jsonl") -> Path:
    return RESULTS / f"{name}.{ext}"


def record(name: str, row: dict, device="cpu", force: bool = False) -> dict:
    """Stamp ``env_info(device)`` on ``row``; append to ``<name>.jsonl`` and rewrite ``<name>.csv``."""
    full = {**row, **env_info(device)}
    if row.get("median_ms") is None and not force:
        return full
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name)
    with path.open("a") as f:
        f.write(json.dumps(full, default=str) + "\n")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with result_path(name, "csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return full
