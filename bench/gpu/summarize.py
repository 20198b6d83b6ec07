"""Markdown table of a ``gpu_kd_loss.jsonl`` (bench/gpu/kd_loss_matrix.py): the README's performance table is
regenerated from it.

    python -m bench.gpu.summarize bench/results/gpu_kd_loss.jsonl
"""

from __future__ import annotations

import json
import sys

PEERS = ("torch_eager", "torch_compile", "liger")


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = rows[0] if rows else {}
    out = [
        f"{head.get('device', '?')}, torch {head.get('torch')}, triton {head.get('triton')}, "
        f"{head.get('date')}, git {head.get('git_sha')}; bf16 inputs, frozen student head, fwd+bwd, "
        f"median of `reps` CUDA-event timings; floor = 2 N V (2 H_s + H_t) FLOP at the measured dense bf16 "
        f"matmul rate ({_fmt(head.get('matmul_tflops'), '.0f')} TFLOP/s); x vs P = P's ms / this row's ms "
        f"(> 1: faster than P)",
        "",
        "| shape | div | impl | ms | TFLOP/s | % of floor speed | extra GB | max rel grad err | "
        "x vs eager | x vs compile | x vs liger |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ms") is None:
            why = r.get("skipped") or (r.get("error") or "")[:80]
            out.append(f"| {r['shape']} | {r['divergence']} | {r['impl']} | - | | | | | | | {why} |")
            continue
        frac = r.get("fraction_of_floor_speed")
        cells = [
            r["shape"],
            r["divergence"],
            r["impl"],
            f"{r['ms']:.2f}",
            _fmt(r.get("tflops"), ".0f"),
            _fmt(None if frac is None else 100 * frac, ".0f"),
            _fmt(r.get("peak_extra_gb"), ".2f"),
            _fmt(r.get("max_rel_grad_err"), ".1e"),
            *[_fmt(r.get(f"ratio_vs_{p}"), ".2f") for p in PEERS],
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.gpu.summarize PATH/gpu_kd_loss.jsonl", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
