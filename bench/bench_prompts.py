"""Teacher prompts (``[teacher_prompt]``): the teacher's cost per training step with cached prefixes.

Per micro-batch of ``B`` rows x ``L`` tokens, rows drawn from several domains, each domain with its own
prefix length (``--prefix-lens``; 0 = no prefix), the teacher's final hidden states are computed as:

* ``plain``: no prefix (the baseline: training without ``[teacher_prompt]``);
* ``cached``: :meth:`~ddk_fast.prompts.TeacherPrompts.hidden`, the training path: prefix keys/values
  computed once, right-aligned into a fresh cache per step, one masked forward for all rows;
* ``cached_one_domain``: the same with every row of one domain (no mask: the expanded cache);
* ``recompute``: the prefix recomputed every step: one forward of ``prefix + text`` per domain group
  (what a run without the cache would do).

The providers run interleaved (round r: plain, cached, cached_one_domain, recompute) after a warm-up, so
drift on a shared machine hits them alike; medians and IQRs, and ratios to ``plain``, are printed and
appended to ``bench/results/prompts.jsonl`` (``DDK_BENCH_RESULTS`` overrides the folder).

    OMP_NUM_THREADS=1 python bench/bench_prompts.py                 # demo-teacher shape, seq_len 128, B 8
    OMP_NUM_THREADS=1 python bench/bench_prompts.py --hidden 512 --layers 8 --seq-len 256

The teacher is a random Llama of the given shape (timing does not depend on the weights); ``--teacher DIR``
loads a real one instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddk_fast.models.loading import final_hidden  # noqa: E402
from ddk_fast.prompts import TeacherPrompts  # noqa: E402


def make_teacher(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.teacher:
        m = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 32),
            num_key_value_heads=max(1, args.hidden // 32),
            max_position_embeddings=args.seq_len + max(args.prefix_lens) + 8,
            tie_word_embeddings=False,
        )
        m = AutoModelForCausalLM.from_config(cfg)
    return m.eval().requires_grad_(False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[9, 12, 7, 24, 0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    teacher = make_teacher(args)
    V = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefixes = {
        d: torch.randint(3, V, (n,), generator=g).tolist() for d, n in enumerate(args.prefix_lens) if n
    }
    prompts = TeacherPrompts(teacher, prefixes)
    n_dom = len(args.prefix_lens)
    rows = [r % n_dom for r in range(args.batch)]  # every domain in the batch: the masked path
    one = [max(prefixes, key=lambda d: len(prefixes[d]))] * args.batch  # the longest prefix, no mask
    ids = torch.randint(3, V, (args.batch, args.seq_len), generator=g)

    def recompute(row_domains):
        out = torch.empty(args.batch, args.seq_len, teacher.config.hidden_size)
        for d in sorted(set(row_domains)):
            idx = [r for r, x in enumerate(row_domains) if x == d]
            pre = torch.as_tensor(prefixes.get(d, []), dtype=torch.long).expand(len(idx), -1)
            with torch.no_grad():
                out[idx] = final_hidden(teacher, torch.cat([pre, ids[idx]], 1))[:, pre.shape[1] :]
        return out

    providers = {
        "plain": lambda: torch.no_grad()(final_hidden)(teacher, ids),
        "cached": lambda: prompts.hidden(ids, rows),
        "cached_one_domain": lambda: prompts.hidden(ids, one),
        "recompute": lambda: recompute(rows),
    }
    times: dict[str, list[float]] = {k: [] for k in providers}
    for _ in range(3):  # warm-up
        for fn in providers.values():
            fn()
    for _ in range(args.rounds):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["plain"])
    print(
        f"teacher hidden {teacher.config.hidden_size} x {teacher.config.num_hidden_layers} layers; batch "
        f"{args.batch} x {args.seq_len}; prefix lengths per domain {args.prefix_lens}; {args.rounds} rounds, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'provider':<20}{'median ms':>11}{'IQR ms':>9}{'ratio':>8}")
    rows_out = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"{name:<20}{med:>11.2f}{q[2] - q[0]:>9.2f}{med / base:>8.3f}")
        rows_out.append(
            {"provider": name, "median_ms": med, "iqr_ms": q[2] - q[0], "ratio_to_plain": med / base}
        )
    if not args.no_record:
        from bench.harness import record

        for r in rows_out:
            record(
                "prompts",
                {
                    **r,
                    "hidden": teacher.config.hidden_size,
                    "layers": teacher.config.num_hidden_layers,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "prefix_lens": args.prefix_lens,
                    "rounds": args.rounds,
                },
            )
    return 0


def test_bench_prompts_smoke():
    """The benchmark smoke run (``pytest bench --benchmark-disable``): tiny shapes, nothing recorded."""
    assert (
        main(
            [
                "--hidden",
                "32",
                "--layers",
                "2",
                "--seq-len",
                "16",
                "--batch",
                "5",
                "--rounds",
                "2",
                "--no-record",
            ]
        )
        == 0
    )


if __name__ == "__main__":
    sys.exit(main())
