"""The one scorer of a model on a run's held-out split: what the trainer's DDK measurements and test report,
the comparison harness (through the trainer) and ``python -m ddk_fast.eval`` all use.

* :func:`split_sets`: the fixed val / test sets of the prepared domains (packed as in training; chat and
  prompt/completion data count only the tokens the loss counts).
* :func:`score_sets`: per-domain (sum of token CE, token count) over those sets, shared over ranks
  (:func:`ddk_fast.models.evaluation.domain_ce_sums`).
* :func:`evaluate_model`: a config's split scored for any model (a folder or Hub id, optionally with the
  adapters of a ``final/``), with the teacher's CE from the run's :class:`~.teacher.Teacher` (online or a
  cache): per-domain CE, perplexity and gap to the teacher, as :class:`SplitScores`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..config import RunConfig
from ..data import prepare_config_domains, validation_batches
from ..distributed import ParallelContext, resolve_device
from ..models.evaluation import ScoreFn, domain_ce_sums, model_score_fn
from ..models.loading import load_model, load_tokenizer, resolve_dtype
from .teacher import open_teacher


def split_sets(domains: Sequence, data_cfg, sep: int, split: str) -> list[dict]:
    """The fixed ``split`` (``val`` or ``test``) set of every prepared domain."""
    if split not in ("val", "test"):
        raise ValueError(f"split: expected 'val' or 'test', got {split!r}")
    n = data_cfg.val_sequences if split == "val" else data_cfg.num_test_sequences
    return [
        validation_batches(getattr(dom, split), data_cfg.seq_len, n, sep, i) for i, dom in enumerate(domains)
    ]


def score_sets(
    score: ScoreFn,
    sets: Sequence[dict],
    device: torch.device,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    all_reduce=None,
    lockstep: bool = False,
) -> list[tuple[float, int]]:
    """Per domain (sum of token CE in nats, counted tokens): identical on every rank and world size."""
    return domain_ce_sums(score, sets, device, batch_size, rank, world_size, all_reduce, lockstep)


def mean_losses(sums: list[tuple[float, int]]) -> list[float]:
    return [ce / max(n, 1) for ce, n in sums]


@dataclass
class SplitScores:
    """A model's scores on a run's split; ``teacher_ce`` empty when the teacher was not scored."""

    split: str
    model: str
    adapter: str | None
    domains: list[str]
    tokens: list[int]
    ce: list[float]
    teacher_ce: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> list[float]:
        return [math.exp(min(c, 700.0)) for c in self.ce]

    @property
    def gap(self) -> list[float]:
        return [s - t for s, t in zip(self.ce, self.teacher_ce)]

    def mean(self, values: list[float]) -> float:
        """Token-weighted mean over the domains."""
        return sum(v * n for v, n in zip(values, self.tokens)) / max(sum(self.tokens), 1)

    def to_json(self) -> dict:
        out = asdict(self)
        out["perplexity"] = self.perplexity
        out["mean_ce"] = self.mean(self.ce)
        if self.teacher_ce:
            out["gap"] = self.gap
            out["mean_teacher_ce"] = self.mean(self.teacher_ce)
            out["mean_gap"] = self.mean(self.gap)
        return out

    def table(self) -> str:
        head = "| domain | tokens | CE | perplexity |"
        rule = "|---|---|---|---|"
        if self.teacher_ce:
            head += " teacher CE | gap |"
            rule += "---|---|"
        rows = [head, rule]
        teacher = self.teacher_ce or [None] * len(self.ce)
        for name, n, c, p, t in zip(self.domains, self.tokens, self.ce, self.perplexity, teacher):
            row = f"| {name} | {n:,} | {c:.4f} | {p:.2f} |"
            if t is not None:
                row += f" {t:.4f} | {c - t:+.4f} |"
            rows.append(row)
        mean = self.mean(self.ce)
        ppl = math.exp(min(mean, 700.0))
        row = f"| **all (token-weighted)** | {sum(self.tokens):,} | {mean:.4f} | {ppl:.2f} |"
        if self.teacher_ce:
            row += f" {self.mean(self.teacher_ce):.4f} | {self.mean(self.gap):+.4f} |"
        rows.append(row)
        return "\n".join(rows)


def evaluate_model(
    cfg: RunConfig,
    model: str,
    *,
    adapter: str | None = None,
    split: str = "test",
    revision: str = "",
    with_teacher: bool = True,
) -> SplitScores:
    """Score ``model`` (a folder or Hub id; ``adapter``: a peft folder such as a run's ``final/``) on the
    run's ``split`` of every domain, and the run's teacher on the same tokens (module doc)."""
    ctx = ParallelContext(device=resolve_device(cfg.train.device))  # one process
    device = ctx.device
    dtype = resolve_dtype(cfg.model, device)
    tokenizer = load_tokenizer(cfg.model)
    domains = prepare_config_domains(cfg.data, tokenizer)
    sets = split_sets(domains, cfg.data, tokenizer.eos_token_id, split)
    bs = cfg.ddk.eval_batch_size
    scored = load_model(model, "--model", dtype, device, revision=revision,
                        trust_remote_code=cfg.model.trust_remote_code, adapter=adapter)  # fmt: skip
    rows = scored.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"--model {model}: {rows} vocabulary rows < the run tokenizer's {len(tokenizer)} tokens"
        )
    sums = score_sets(model_score_fn(scored, rows), sets, device, bs)
    out = SplitScores(
        split, model, adapter, [d.name for d in domains], [n for _, n in sums], mean_losses(sums)
    )
    del scored
    if with_teacher:
        teacher = open_teacher(cfg, tokenizer)
        teacher.load(device, dtype)
        teacher.vocab_size = rows  # CE over the scored model's vocabulary columns, as the trainer's
        teacher.finalize(ctx)
        out.teacher_ce = teacher.domain_losses(split, lambda s: mean_losses(score_sets(s, sets, device, bs)))
    return out
