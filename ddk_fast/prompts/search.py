"""The teacher prompt search: PromptAid's explore / perturb / test / iterate loop, per domain.

* **Explore**: the ``[teacher_prompt] templates``, ``{domain}`` replaced by the domain name.
* **Perturb** the current best candidate:
  - *keyword swaps*: each keyword token of its template (a token with >= 2 letters) replaced by its nearest
    and by its farthest token in the teacher's input-embedding space (cosine over the embedding matrix,
    special tokens and the token itself excluded); positions in a seeded order;
  - *few-shot*: ``k = 1..max_fewshot`` training documents before the template, the documents most similar to
    the dev slice by the cosine of the teacher's mean final hidden state (over each document's tokens vs
    over the whole dev slice). Candidates come from the domain's train split minus the dev slice (a seeded
    pool of at most ``POOL_DOCS`` documents, each cut to ``max_prefix_tokens`` tokens). A prefix longer than
    ``max_prefix_tokens`` keeps its last tokens (the template stays next to the text).
  No paraphrasing model is used: every variant comes from the teacher's own embeddings and the data.
* **Test**: the teacher's mean next-token CE on the domain's dev slice with the candidate prefixed, through
  the same prefixed forward training uses (:func:`~ddk_fast.prompts.prefix.prefixed_hidden`).
* **Iterate**: after the templates, the best candidate not yet perturbed is perturbed; as soon as a
  perturbation beats the best, the new best is perturbed next (first-improvement hill climbing). The loop
  stops after ``budget`` candidate evaluations (the no-prefix baseline is measured first and not counted),
  or when nothing new is left to try.

"No prefix" is always a candidate: the winner is the lowest dev CE, ties going to the earlier candidate, so
a prefix is used only when it strictly lowers the dev CE. Everything is deterministic given ``seed``.

The **dev slice** is the *last* documents of the domain's train split (the split is already a seeded
permutation of the documents), enough for ``dev_sequences`` sequences of ``seq_len`` tokens, packed like the
validation set (a separator after each document). Not the val split: DDK steers on the teacher's val CE, and
selecting the prefix on val would bias that reference low. Not the test split: it must stay unseen. The
student does train on these documents; the prefix is chosen for the teacher only, which never trains.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.evaluation import head_ce_sum
from ..models.loading import final_hidden, head_spec
from .prefix import prefix_kv, prefixed_hidden

POOL_DOCS = 64  # few-shot candidate documents scored per domain


@dataclass(frozen=True)
class Candidate:
    kind: str  # none | explore | swap_near | swap_far | fewshot
    template: tuple[int, ...] = ()
    shots: tuple[int, ...] = ()  # train-split document indices, most similar first
    ids: tuple[int, ...] = ()  # the prefix token ids (shots + template, cut to max_prefix_tokens)


@dataclass
class SearchResult:
    best: Candidate
    best_ce: float
    no_prefix_ce: float
    history: list[dict] = field(default_factory=list)  # {"candidate": Candidate, "ce": float}
    evaluations: int = 0


# ------------------------------------------------------------------------------------------- perturbations
def nearest_farthest(emb: torch.Tensor, token: int, allowed: torch.Tensor) -> tuple[int, int]:
    """The allowed tokens with the highest and the lowest cosine similarity to ``token`` (not itself)."""
    e = F.normalize(emb.detach().double(), dim=1)
    sims = e @ e[token]
    ok = allowed.clone()
    ok[token] = False
    near = int(sims.masked_fill(~ok, float("-inf")).argmax())
    far = int(sims.masked_fill(~ok, float("inf")).argmin())
    return near, far


def rank_by_similarity(doc_means: torch.Tensor, target: torch.Tensor) -> list[int]:
    """Row indices of ``doc_means`` [n, H] by decreasing cosine similarity to ``target`` [H] (stable)."""
    sims = F.cosine_similarity(doc_means.double(), target.double().unsqueeze(0), dim=1)
    return [int(i) for i in torch.argsort(-sims, stable=True)]


def keyword_positions(tokenizer, ids: Sequence[int]) -> list[int]:
    """Positions of keyword tokens: tokens whose text has at least two letters."""
    return [i for i, t in enumerate(ids) if sum(c.isalpha() for c in tokenizer.decode([t])) >= 2]


class Perturber:
    """Makes the perturbations of a candidate (keyword swaps, few-shot prefixes) for one domain."""

    def __init__(self, tokenizer, emb, allowed, ranked_docs, doc_tokens, sep, max_fewshot, max_tokens, seed):
        self.tokenizer, self.emb, self.allowed = tokenizer, emb, allowed
        self.ranked_docs = list(ranked_docs)  # train doc indices, most similar first
        self.doc_tokens = doc_tokens  # train doc index -> token ids (cut)
        self.sep, self.max_fewshot, self.max_tokens = sep, max_fewshot, max_tokens
        self.rng = random.Random(seed)
        self._swaps: dict[int, tuple[int, int]] = {}

    def make(self, kind: str, template: Sequence[int], shots: Sequence[int] = ()) -> Candidate:
        ids: list[int] = []
        for d in shots:
            ids += list(self.doc_tokens[d]) + [self.sep]
        ids += list(template)
        return Candidate(kind, tuple(template), tuple(shots), tuple(ids[-self.max_tokens :]))

    def swap(self, token: int) -> tuple[int, int]:
        if token not in self._swaps:
            self._swaps[token] = nearest_farthest(self.emb, token, self.allowed)
        return self._swaps[token]

    def __call__(self, c: Candidate) -> list[Candidate]:
        fewshot = []
        if not c.shots:
            k_max = min(self.max_fewshot, len(self.ranked_docs))
            fewshot = [self.make("fewshot", c.template, self.ranked_docs[:k]) for k in range(1, k_max + 1)]
        positions = keyword_positions(self.tokenizer, c.template)
        self.rng.shuffle(positions)
        swaps = []
        for pos in positions:
            for kind, new in zip(("swap_near", "swap_far"), self.swap(c.template[pos])):
                t = list(c.template)
                t[pos] = new
                swaps.append(self.make(kind, t, c.shots))
        out = []  # interleaved: few-shot k, then a swap pair, ...
        for i in range(max(len(fewshot), -(-len(swaps) // 2))):
            out += fewshot[i : i + 1] + swaps[2 * i : 2 * i + 2]
        return out


# ----------------------------------------------------------------------------------------------- the loop
def search(
    evaluate: Callable[[tuple[int, ...]], float],
    explore: Sequence[Candidate],
    perturb: Callable[[Candidate], list[Candidate]],
    budget: int,
    on_eval: Callable[[], None] | None = None,
) -> SearchResult:
    """Explore, then iterate on the best (module docstring). ``evaluate(ids)``: dev CE with prefix ``ids``."""
    none = Candidate("none")
    base = evaluate(())
    history = [{"candidate": none, "ce": base}]
    seen = {()}
    best, best_ce = none, base
    expanded: set[tuple[int, ...]] = set()
    queue = list(explore)
    exploring, used = True, 0
    while used < budget:
        if not queue:
            exploring = False
            for h in sorted(history, key=lambda h: h["ce"]):  # the best not yet perturbed (stable sort)
                if h["candidate"].ids not in expanded:
                    expanded.add(h["candidate"].ids)
                    queue = [c for c in perturb(h["candidate"]) if c.ids not in seen]
                    if queue:
                        break
            if not queue:
                break
        c = queue.pop(0)
        if c.ids in seen:
            continue
        seen.add(c.ids)
        ce = evaluate(c.ids)
        used += 1
        history.append({"candidate": c, "ce": ce})
        if on_eval is not None:
            on_eval()
        if ce < best_ce:
            best, best_ce = c, ce
            if not exploring:  # iterate on the new best at once
                queue = []
    return SearchResult(best, best_ce, base, history, used)


# ----------------------------------------------------------------------------------------------- the domain
def dev_slice(train, seq_len: int, n_seq: int, sep: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The dev slice of a train shard: ``input_ids``, ``labels`` ``[n_seq, seq_len]`` and the document
    indices it uses (the last ones; at least one document is left for few-shot when there are two)."""
    need = n_seq * seq_len + 1
    docs, have = [], 0
    for i in range(train.num_docs - 1, -1, -1):
        if have >= need or (docs and i == 0):
            break
        docs.append(i)
        have += len(train.doc(i)) + 1
    docs.reverse()
    stream = np.concatenate([np.append(np.asarray(train.doc(i), dtype=np.int64), sep) for i in docs])
    stream = np.resize(stream, need)  # wraps around when the train split is short
    seqs = np.stack([stream[k * seq_len : k * seq_len + seq_len + 1] for k in range(n_seq)])
    return np.ascontiguousarray(seqs[:, :-1]), np.ascontiguousarray(seqs[:, 1:]), docs


@torch.no_grad()
def dev_ce(teacher: nn.Module, ids: np.ndarray, labels: np.ndarray, prefix, vocab: int, batch: int) -> float:
    """The teacher's mean CE on the dev slice with ``prefix`` (token ids) before every sequence."""
    dev = teacher.get_input_embeddings().weight.device
    kv = prefix_kv(teacher, list(prefix)) if prefix else None
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = torch.as_tensor(ids[i : i + batch], device=dev)
        y = torch.as_tensor(labels[i : i + batch], device=dev)
        h = prefixed_hidden(teacher, x, [kv] * len(x), [len(prefix)] * len(x))
        s, n = head_ce_sum(h, head_spec(teacher), y, vocab)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


@torch.no_grad()
def mean_hidden(teacher: nn.Module, ids) -> torch.Tensor:
    dev = teacher.get_input_embeddings().weight.device
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=dev)
    return final_hidden(teacher, x.reshape(-1, x.shape[-1])).double().mean(dim=(0, 1))


def search_domain(
    teacher, tokenizer, name: str, index: int, train, cfg, seq_len: int, batch: int, on_eval=None
):
    """Run the search for one domain (``cfg``: a TeacherPromptConfig). Returns (SearchResult, info dict)."""
    sep = tokenizer.eos_token_id
    ids, labels, dev_docs = dev_slice(train, seq_len, cfg.dev_sequences, sep)
    rng = np.random.default_rng([cfg.seed, index])
    n_pool = max(0, min(dev_docs)) if dev_docs else 0
    pool = sorted(rng.choice(n_pool, size=min(POOL_DOCS, n_pool), replace=False).tolist()) if n_pool else []
    doc_tokens = {d: np.asarray(train.doc(d), dtype=np.int64)[: cfg.max_prefix_tokens].tolist() for d in pool}
    ranked: list[int] = []
    if pool and cfg.max_fewshot:
        target = mean_hidden(teacher, ids)
        means = torch.stack([mean_hidden(teacher, [doc_tokens[d]]) for d in pool])
        ranked = [pool[i] for i in rank_by_similarity(means, target)]
    emb = teacher.get_input_embeddings().weight
    n_tok = min(len(tokenizer), emb.shape[0])
    allowed = torch.zeros(emb.shape[0], dtype=torch.bool)
    allowed[:n_tok] = True
    allowed[[i for i in tokenizer.all_special_ids if i < emb.shape[0]]] = False
    perturb = Perturber(
        tokenizer,
        emb,
        allowed,
        ranked,
        doc_tokens,
        sep,
        cfg.max_fewshot,
        cfg.max_prefix_tokens,
        cfg.seed * 1000003 + index,
    )
    explore = [
        perturb.make("explore", tokenizer.encode(t.replace("{domain}", name), add_special_tokens=False))
        for t in cfg.templates
    ]
    # the teacher's full softmax (as training scores it when V_s = V_t)
    vocab = head_spec(teacher)["weight"].shape[0]
    result = search(
        lambda p: dev_ce(teacher, ids, labels, p, vocab, batch), explore, perturb, cfg.budget, on_eval
    )
    info = {
        "dev_slice": {
            "split": "train",
            "doc_indices": dev_docs,
            "sequences": len(ids),
            "tokens": int(ids.size),
        },
        "fewshot_pool": ranked,
    }
    return result, info


def domain_entry(tokenizer, result: SearchResult, info: dict) -> dict:
    """The prompts.json entry of one domain."""

    def text(c: Candidate) -> str:
        return tokenizer.decode(list(c.ids)) if c.ids else ""

    return {
        "prefix": text(result.best),
        "prefix_ids": list(result.best.ids),
        "kind": result.best.kind,
        "fewshot_docs": list(result.best.shots),
        "dev_ce": result.best_ce,
        "no_prefix_ce": result.no_prefix_ce,
        "evaluations": result.evaluations,
        **info,
        "history": [
            {
                "kind": h["candidate"].kind,
                "prefix": text(h["candidate"]),
                "n_tokens": len(h["candidate"].ids),
                "fewshot_docs": list(h["candidate"].shots),
                "ce": h["ce"],
            }
            for h in result.history
        ],
    }
