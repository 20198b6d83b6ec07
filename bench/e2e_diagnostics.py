"""Where the ddk_fast e2e step's loss time goes on CPU (the profile of ``bench/bench_e2e.py``): two probes
at its shape (N 2048 tokens, student / teacher hidden 128 / 256, V 151936, fp32).

    python -m bench.e2e_diagnostics gemm [threads]               # teacher-head GEMM rate, whole / in chunks
    python -m bench.e2e_diagnostics chunks [threads] [chunk ...] # the fused loss fwd+bwd by chunk size

    python -m bench.e2e_diagnostics ops [threads] [chunk]        # torch.profiler op table of one call

``chunks`` / ``ops``: ``fused_linear_kd_loss`` (torch backend); chunk 0 = the default (``auto_chunk_size``).

Each prints two rounds (the first warms up); nothing is recorded.
"""

from __future__ import annotations

import sys
import time

import torch

N, H_S, H_T, V = 2048, 128, 256, 151936


def gemm(rows_list=(2048, 512, 128, 27)) -> None:
    x, w = torch.randn(N, H_T), torch.randn(V, H_T)
    for rnd in range(2):
        for rows in rows_list:
            t0 = time.perf_counter()
            for i in range(0, N, rows):
                x[i : i + rows] @ w.t()
            dt = time.perf_counter() - t0
            print(
                f"round {rnd} rows {rows}: {dt:.2f} s, {2 * N * H_T * V / dt / 1e9:.1f} GFLOP/s", flush=True
            )


def _inputs():
    g = torch.Generator().manual_seed(0)
    h_s = (torch.randn(N, H_S, generator=g) / H_S**0.25).requires_grad_()
    w_s = torch.randn(V, H_S, generator=g) * 0.02
    h_t = torch.randn(N, H_T, generator=g) / H_T**0.25
    w_t = torch.randn(V, H_T, generator=g) * 0.02
    return h_s, w_s, h_t, w_t, torch.randint(0, V, (N,), generator=g)


def ops(chunk: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from ddk_fast import fused_linear_kd_loss

    h_s, w_s, h_t, w_t, labels = _inputs()
    kw = dict(
        kd_weight=1.0, ce_weight=1.0, divergence="forward_kl", backend="torch", chunk_size=chunk or None
    )
    fused_linear_kd_loss(h_s[:64], w_s, h_t[:64], w_t, labels[:64], **kw).loss.backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels, **kw).loss.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def chunks(sizes) -> None:
    from ddk_fast import fused_linear_kd_loss
    from ddk_fast.ops.reference import auto_chunk_size

    h_s, w_s, h_t, w_t, labels = _inputs()
    for rnd in range(2):
        for chunk in sizes:
            t0 = time.perf_counter()
            out = fused_linear_kd_loss(
                h_s,
                w_s,
                h_t,
                w_t,
                labels,
                kd_weight=1.0,
                ce_weight=1.0,
                divergence="forward_kl",
                backend="torch",
                chunk_size=chunk or None,
            )
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            h_s.grad = None
            rows = chunk or auto_chunk_size(N, V)
            print(
                f"round {rnd} chunk {rows} rows: fwd {t1 - t0:.2f} s, bwd {t2 - t1:.2f} s, "
                f"loss {out.loss.item():.6f}",
                flush=True,
            )


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads())
    if sys.argv[1] == "gemm":
        gemm()
    elif sys.argv[1] == "ops":
        ops(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    else:
        chunks([int(c) for c in sys.argv[3:]] or [0, 128, 512])
