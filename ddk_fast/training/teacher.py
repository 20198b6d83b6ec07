"""The teacher: the one place that knows where the teacher signal comes from.

The trainer, the DDK schedule (the teacher's val / test CE), the objective (through :class:`TeacherSignal`),
the curriculum (its ranking reads the schedule's teacher CE) and the comparison harness all talk to a
:class:`Teacher`; none of them branches on its source. Sources:

==========================  ===============================================================================
:class:`OnlineTeacher`      the Hugging Face model, run every step under ``no_grad`` (a replica per rank, or
                            FSDP2-sharded with ``[model] shard_teacher``; with ``[teacher_prompt] use``
                            each row after its domain's prefix, and its val/test CE measured with it)
:class:`TopkCacheTeacher`   a ``topk`` teacher cache: the sampler attaches the cached rows of each batch's
                            sequences; the sparse-teacher loss; val/test CE from the cache's manifest
:class:`HiddenCacheTeacher` a ``hidden`` teacher cache: cached final hidden states + the cached ``lm_head``,
                            the dense loss exactly as online; val/test CE from the manifest
==========================  ===============================================================================

Life cycle, in the trainer's set-up (:func:`open_teacher` reads files only, so every check of a cache or a
prompts file fails before any model weight is read):

1. :func:`open_teacher` -- the source chosen by the config; caches verified, prompts.json checked.
2. :meth:`Teacher.attach` -- once the data is prepared: a cache checks it was written for this data and
   covers the run (``ddk_fast/teacher_cache/coverage.py``) and hooks the sampler.
3. :meth:`Teacher.load` -- weights (the model; a hidden cache's head). :meth:`Teacher.student_source` gives
   the model a student is cut from (a cache loads the teacher only when that init must be built).
4. :meth:`Teacher.check_vocab` against the student, then :meth:`Teacher.finalize` (prompt keys/values, then
   FSDP sharding).

Then per micro-batch :meth:`Teacher.signal` and per evaluation :meth:`Teacher.domain_losses`. A new source
(scoring tokens the student generated for on-policy distillation: :meth:`Teacher.score`; a teacher served
elsewhere) is one more subclass here; the loop does not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..data.corpus import tokenizer_fingerprint
from ..distributed import ParallelContext, shard_teacher
from ..errors import ConfigError
from ..models.evaluation import ScoreFn, domain_score_fn, model_score_fn
from ..models.hidden import capture_layers
from ..models.loading import check_vocab, final_hidden, load_teacher
from ..models.objective import TeacherHead, TeacherSignal
from ..ops.topk_reference import TOPK_DIVERGENCES
from ..prompts import TeacherPrompts, build_prompts, open_prompts, row_domains
from ..teacher_cache.coverage import check_coverage
from ..teacher_cache.rows import CacheRows
from ..teacher_cache.store import HEAD_FILE, CacheStore, TeacherCacheError, as_tensor, open_cache

log = logging.getLogger("ddk_fast")

# measure(score) -> per-domain mean CE over the split's sets (the schedule's one, sharded measurement path)
Measure = Callable[[ScoreFn], list[float]]


class Teacher:
    """The interface every teacher source implements (module doc)."""

    kind = "teacher"
    #: the Hugging Face model when it is in memory (online): ``[hidden]`` captures its layers
    model: nn.Module | None = None
    #: the checked prompts.json of ``[teacher_prompt] use`` (the report's table), None without prompts
    prompts_data: dict | None = None
    #: whether :meth:`score` can score token sequences that were not prepared in advance (on-policy)
    can_score_new_tokens = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.vocab_size = 0  # the student's vocabulary: the columns the teacher's CE is taken over
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def describe(self) -> str:
        return self.kind

    def attach(self, schedule) -> None:
        """Called once the data is prepared (a :class:`~ddk_fast.training.schedule.DomainSchedule`)."""

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def student_source(self) -> Callable[[], nn.Module]:
        """Returns the teacher model a student is cut from (``student_from_teacher_layers``); called only
        when that student initialisation must be built."""
        m, seed = self.cfg.model, self.cfg.train.seed

        def load_once() -> nn.Module:
            log.info("teacher loaded once to take the student's layers from it (not run)")
            return load_teacher(m, self.device, self.dtype, seed)

        return load_once

    def check_vocab(self, student: nn.Module, tokenizer) -> int:
        """Check the student against this teacher's vocabulary; returns (and keeps) the student's size."""
        raise NotImplementedError

    def finalize(self, ctx: ParallelContext) -> None:
        """Last set-up once the student and the objective are built."""

    def signal(self, input_ids: torch.Tensor, batch: dict, layers: list[int] | None = None) -> TeacherSignal:
        """The teacher's signal for one micro-batch of the sampler (``batch``: its host arrays)."""
        return self.score(input_ids, batch.get("domain_ids"), layers)

    def score(
        self, input_ids: torch.Tensor, domain_ids=None, layers: list[int] | None = None
    ) -> TeacherSignal:
        """The teacher's signal for any token ids ``[B, L]`` (e.g. sequences the student generated)."""
        raise TeacherCacheError(
            f"a teacher cache ({self.describe()}) holds the teacher's signal of the sequences it cached "
            "only; it cannot score new tokens (on-policy distillation): train with the online teacher"
        )

    def domain_losses(self, split: str, measure: Measure) -> list[float]:
        """The teacher's mean CE per domain on ``split`` (``val`` or ``test``); ``measure`` runs a score
        function over the split's sets (shared over the ranks)."""
        raise NotImplementedError

    def state_key(self) -> str | None:
        """What a checkpoint must record about the teacher (its losses were measured with it)."""
        return None


# ---------------------------------------------------------------------------------------------- online
class OnlineTeacher(Teacher):
    kind = "online"
    can_score_new_tokens = True

    def __init__(self, cfg, prompts_data: dict | None = None):
        super().__init__(cfg)
        self.prompts_data = prompts_data
        self.prompts: TeacherPrompts | None = None
        self.head: TeacherHead | None = None

    def describe(self) -> str:
        src = self.cfg.model.teacher or "inline teacher_config"
        extra = ", sharded" if self.cfg.model.shard_teacher else ""
        extra += ", prompts" if self.prompts_data else ""
        return f"online ({src}{extra})"

    def load(self, device, dtype) -> None:
        super().load(device, dtype)
        self.model = load_teacher(self.cfg.model, device, dtype, self.cfg.train.seed)

    def student_source(self):
        return lambda: self.model

    def check_vocab(self, student, tokenizer) -> int:
        self.vocab_size = check_vocab(self.model.get_output_embeddings().weight.shape[0], student, tokenizer)
        return self.vocab_size

    def finalize(self, ctx) -> None:
        # [teacher_prompt]: the prefix keys/values are computed before a sharded teacher's FSDP wrapping
        if self.prompts_data is not None:
            self.prompts = build_prompts(self.cfg, self.prompts_data, self.model)
        if self.cfg.model.shard_teacher:
            self.model = shard_teacher(self.model, ctx)
        self.head = TeacherHead.of(self.model)  # the head stays replicated under shard_teacher

    def _final_hidden(self, input_ids, row_doms) -> torch.Tensor:
        if self.prompts is not None:
            return self.prompts.hidden(input_ids, row_doms)
        return final_hidden(self.model, input_ids)

    @torch.no_grad()
    def score(self, input_ids, domain_ids=None, layers=None) -> TeacherSignal:
        """The final hidden states (each row after its domain's prefix when prompts are used: the plain
        positions only, one teacher row per student row) and, for ``[hidden]``, the mapped layers."""
        doms = row_domains(domain_ids) if self.prompts is not None else None
        if not layers:
            return TeacherSignal(hidden=self._final_hidden(input_ids, doms), head=self.head)
        with capture_layers(self.model, layers) as caught:
            hidden = self._final_hidden(input_ids, doms)
        return TeacherSignal(hidden=hidden, head=self.head, layers=[caught[t] for t in layers])

    def domain_losses(self, split, measure) -> list[float]:
        if self.prompts is None:
            return measure(model_score_fn(self.model, self.vocab_size))
        # the teacher that makes the targets: with its prefix, on both splits
        prompts = self.prompts
        prefixed = lambda ids, d: prompts.hidden(ids, [d] * ids.shape[0])
        return measure(domain_score_fn(prefixed, self.head, self.vocab_size))

    def state_key(self) -> str | None:
        """A hash of the per-domain prefix ids, None without prompts: a checkpoint's teacher val CE was
        measured with them, so a resume must see the same ones."""
        if self.prompts is None or not self.prompts.prefixes:
            return None
        names = [d.name for d in self.cfg.data.domains]
        payload = json.dumps({names[d]: ids for d, ids in sorted(self.prompts.prefixes.items())})
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- caches
class _CacheTeacher(Teacher):
    """A teacher cache: the sampler attaches each batch's cached rows; the teacher is never run."""

    def __init__(self, cfg, store: CacheStore, tokenizer):
        super().__init__(cfg)
        self.store = store
        self.tokenizer = tokenizer
        self.names = [d.name for d in cfg.data.domains]

    def describe(self) -> str:
        return f"{self.kind} ({self.store.path})"

    def attach(self, schedule) -> None:
        """Refuse a cache of other data, or one the run could read past (every domain short is named,
        before the first step); then the sampler carries each batch's cached rows."""
        d = self.cfg.data
        self.store.check_run(
            {
                "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
                "seq_len": d.seq_len,
                "seed": self.cfg.train.seed,
                "sep_token_id": self.tokenizer.eos_token_id,
                "domains": {dom.name: dom.train.meta.get("cache_key", "") for dom in schedule.domains},
            }
        )
        stream_lens = {dom.name: dom.train.num_tokens + dom.train.num_docs for dom in schedule.domains}
        check_coverage(self.store, self.cfg, stream_lens)
        s = schedule.sampler
        s.batch_hook = CacheRows(self.store, schedule.names, s.world_size, s.rank)
        t = self.store.manifest["teacher"]
        log.info(
            "teacher cache %s: kind %s, teacher %s (weights sha256 %s...); the teacher is not run",
            self.store.path, self.store.kind, t["source"], t["weights_sha256"][:12],
        )  # fmt: skip

    def domain_losses(self, split, measure) -> list[float]:
        return self.store.teacher_ce(split, self.names)  # measured by the cache's writer

    def _no_layers(self, layers) -> None:
        if layers:
            raise ConfigError("hidden.weight", ">0", "0 with [model] teacher_cache (no layers cached)")


class TopkCacheTeacher(_CacheTeacher):
    kind = "topk cache"

    def __init__(self, cfg, store: CacheStore, tokenizer):
        super().__init__(cfg, store, tokenizer)
        if cfg.loss.divergence not in TOPK_DIVERGENCES:
            raise ConfigError(
                "loss.divergence",
                cfg.loss.divergence,
                f"{' or '.join(TOPK_DIVERGENCES)} with a top-k [model] teacher_cache (the sparse-teacher "
                "loss; a hidden-state cache, --kind hidden, supports every divergence)",
            )

    def check_vocab(self, student, tokenizer) -> int:
        v_s = student.get_output_embeddings().weight.shape[0]
        need = max(len(tokenizer), int(self.store.manifest["vocab_size"]))
        if v_s < need:
            raise ConfigError(
                "model.student", v_s, f"a student vocabulary of at least {need} rows (tokenizer/cache)"
            )
        self.vocab_size = v_s
        return v_s

    def signal(self, input_ids, batch, layers=None) -> TeacherSignal:
        self._no_layers(layers)
        dev = input_ids.device
        lps = as_tensor(batch["cache_logprobs"], self.store.manifest["logprob_dtype"])
        rows = (
            torch.as_tensor(batch["cache_ids"], device=dev),
            lps.to(dev),
            torch.as_tensor(batch["cache_tail"], device=dev),
        )
        return TeacherSignal(topk=rows)


class HiddenCacheTeacher(_CacheTeacher):
    kind = "hidden cache"

    def load(self, device, dtype) -> None:
        """The cached ``lm_head`` (weight, bias, logit transform) on the device, in the compute dtype."""
        from safetensors.torch import load_file

        super().load(device, dtype)
        spec = self.store.manifest["head"]
        tensors = load_file(str(self.store.path / HEAD_FILE))
        bias = tensors.get("bias")
        self.head = TeacherHead(
            tensors["weight"].to(device, dtype),
            None if bias is None else bias.to(device, dtype),
            float(spec["logit_scale"]),
            float(spec["softcap"]),
        )

    def check_vocab(self, student, tokenizer) -> int:
        self.vocab_size = check_vocab(int(self.head.weight.shape[0]), student, tokenizer)
        return self.vocab_size

    def signal(self, input_ids, batch, layers=None) -> TeacherSignal:
        self._no_layers(layers)
        rows = as_tensor(np.ascontiguousarray(batch["cache_hidden"]), self.store.manifest["hidden_dtype"])
        return TeacherSignal(hidden=rows.to(input_ids.device, self.dtype), head=self.head)


# ---------------------------------------------------------------------------------------------- factory
def open_teacher(cfg, tokenizer) -> Teacher:
    """The teacher source of ``cfg`` (module doc), opened without reading any model weight: a cache is
    verified (checksums), a prompts.json checked against the domains, tokenizer and teacher config."""
    path = cfg.model.teacher_cache
    if not path:
        return OnlineTeacher(cfg, open_prompts(cfg, tokenizer))
    store = open_cache(path, verify=True)
    return {"topk": TopkCacheTeacher, "hidden": HiddenCacheTeacher}[store.kind](cfg, store, tokenizer)
