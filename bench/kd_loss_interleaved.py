"""KD-loss time on CPU with the providers interleaved in ONE process (A B C D A B C D ...), so the load of
a shared machine hits every provider alike; ``bench/bench_kd_loss.py --run`` measures memory (a child per
provider) and its per-child times drift with the load. Rows: ``bench/results/kd_loss_interleaved.jsonl``.

    python -m bench.kd_loss_interleaved --shape n2048-h512-v32000 --reps 3
    python -m bench.kd_loss_interleaved --shape n2048-h512-v151936 --reps 2 --skip torch_linear_ce

Providers (fp32, forward + backward, frozen heads, hidden states requiring grad): ``chunked_torch`` (the
public ``fused_linear_kd_loss``, CE + forward KL), ``chunked_torch_ce_only`` (``kd_weight=0``),
``naive_compile`` (``torch.compile`` of the materialised loss; compiled during the warm-up round) and
``torch_linear_ce`` (``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, CE only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.harness import record
from ddk_fast import fused_linear_kd_loss
from ddk_fast.ops.naive import fused_linear_kd_loss_naive

SHAPES = {"n2048-h512-v32000": (2048, 512, 32000), "n2048-h512-v151936": (2048, 512, 151936)}


def providers(n: int, h: int, v: int) -> dict:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws, wt = torch.randn(v, h, generator=g) * 0.02, torch.randn(v, h, generator=g) * 0.02
    ht, lab = torch.randn(n, h, generator=g), torch.randint(0, v, (n,), generator=g)
    compiled = torch.compile(fused_linear_kd_loss_naive)

    def step(loss_fn):
        def run():
            loss_fn().backward()
            hs.grad = None

        return run

    return {
        "chunked_torch": step(lambda: fused_linear_kd_loss(hs, ws, ht, wt, lab, backend="torch").loss),
        "chunked_torch_ce_only": step(
            lambda: fused_linear_kd_loss(hs, ws, ht, wt, lab, backend="torch", kd_weight=0.0).loss
        ),
        "naive_compile": step(lambda: compiled(hs, ws, ht, wt, lab).loss),
        "torch_linear_ce": step(
            lambda: F.linear_cross_entropy(hs, ws, lab, options=torch.nn.LinearCrossEntropyOptions())
        ),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="n2048-h512-v32000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args(argv)
    n, h, v = SHAPES[args.shape]
    fns = {k: f for k, f in providers(n, h, v).items() if k not in args.skip}
    for f in fns.values():  # warm-up round (imports, allocator, compilation)
        f()
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        ms = 1000 * statistics.median(ts)
        record("kd_loss_interleaved", {"impl": k, "shape": args.shape, "N": n, "H": h, "V": v, "ms": ms,
                                       "times_ms": [round(1000 * t, 1) for t in ts]}, force=True)  # fmt: skip
        print(f"{k:24s} median {ms:9.0f} ms  {[round(1000 * t) for t in ts]}", flush=True)


if __name__ == "__main__":
    main()
