"""The teacher with a per-domain prefix: prefix keys/values computed once, reused every step.

Each domain's prefix is run through the teacher once (:func:`prefix_kv`); its per-layer keys and values
(``[1, kv_heads, P, head_dim]``, RoPE already applied at positions ``0..P-1``) are stored as plain tensors.
A forward (:meth:`TeacherPrompts.hidden`) builds a *fresh* ``DynamicCache`` from them: a cache object is
mutated by the forward it is passed to (the new keys are appended), so reusing one would corrupt the next
step; the stored tensors themselves are never written to (the cache concatenates into new tensors).

A batch's rows may belong to different domains with different prefix lengths (a packed row is one domain:
the sampler fills each row from one domain's stream; the row's domain is ``domain_ids[r, 0]``). The rows are
not split into per-domain forwards (on a GPU several small forwards cost more than one, and with
``shard_teacher`` every forward is a collective that all ranks must run alike); instead the prefixes are
right-aligned into ``P_max`` cache slots, the unused slots masked out in the 2D attention mask, and the plain
tokens of row ``r`` get position ids ``P_r .. P_r + L - 1``. Masked keys contribute exactly zero attention,
so every row equals the teacher run on its own ``prefix + text`` (to float rounding; tested <= 1e-5). When
every row has the same prefix length no mask is passed; when no row has a prefix it is the plain forward,
unchanged.

The returned hidden states (and the layers ``[hidden]`` captures with hooks during this forward) are those of
the plain positions only, so the KD loss sees exactly one teacher row per student row.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..models.loading import final_hidden

KV = list[tuple[torch.Tensor, torch.Tensor]]


def _cache_kw(decoder: nn.Module) -> str:
    """The decoder's cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def prefix_kv(teacher: nn.Module, ids: list[int]) -> KV:
    """Per-layer (keys, values) ``[1, kv_heads, P, head_dim]`` of the teacher run on ``ids`` alone."""
    dec = teacher.get_decoder()
    dev = teacher.get_input_embeddings().weight.device
    x = torch.as_tensor([ids], dtype=torch.long, device=dev)
    out = dec(input_ids=x, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    if hasattr(cache, "layers"):
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    return [(k.clone(), v.clone()) for k, v in cache.to_legacy_cache()]  # pragma: no cover (older)


@torch.no_grad()
def prefixed_hidden(
    teacher: nn.Module, input_ids: torch.Tensor, kvs: list[KV | None], lengths: list[int]
) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of the plain positions with row ``r`` preceded by the prefix whose
    keys/values are ``kvs[r]`` (None / length 0: no prefix). See the module docstring."""
    from transformers import DynamicCache

    B, L = input_ids.shape
    p_max = max(lengths)
    if p_max == 0:
        return final_hidden(teacher, input_ids)
    dev = input_ids.device
    ref = next(kv for kv in kvs if kv is not None)
    n_layers = len(ref)
    same = all(n == p_max for n in lengths)
    layers = []
    for li in range(n_layers):
        k0, v0 = ref[li]
        if same and all(kv is ref for kv in kvs):  # one prefix for the whole batch
            layers.append((k0.expand(B, -1, -1, -1), v0.expand(B, -1, -1, -1)))
            continue
        k = k0.new_zeros(B, k0.shape[1], p_max, k0.shape[3])
        v = v0.new_zeros(B, v0.shape[1], p_max, v0.shape[3])
        for r, kv in enumerate(kvs):
            if kv is not None and lengths[r]:
                k[r, :, p_max - lengths[r] :] = kv[li][0][0]
                v[r, :, p_max - lengths[r] :] = kv[li][1][0]
        layers.append((k, v))
    cache = DynamicCache(ddp_cache_data=layers, config=teacher.config)
    starts = torch.as_tensor(lengths, device=dev).unsqueeze(1)
    position_ids = starts + torch.arange(L, device=dev).unsqueeze(0)
    kw = {}
    if not same:
        slot = torch.arange(p_max + L, device=dev).unsqueeze(0)
        kw["attention_mask"] = (slot >= p_max - starts).long()
    dec = teacher.get_decoder()
    out = dec(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{_cache_kw(dec): cache}, **kw)
    return out.last_hidden_state


class TeacherPrompts:
    """The per-domain prefixes of a run: token ids, and their keys/values computed once on the teacher."""

    def __init__(self, teacher: nn.Module, prefixes: dict[int, list[int]]):
        self.teacher = teacher
        self.prefixes = {d: list(ids) for d, ids in prefixes.items() if ids}
        self.kv: dict[int, KV] = {d: prefix_kv(teacher, ids) for d, ids in self.prefixes.items()}

    def length(self, domain: int) -> int:
        return len(self.prefixes.get(domain, ()))

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, row_domains) -> torch.Tensor:
        """The teacher's final hidden states of ``input_ids`` ``[B, L]``, row ``r`` preceded by the prefix of
        domain ``row_domains[r]``."""
        doms = [int(d) for d in torch.as_tensor(row_domains).reshape(-1).tolist()]
        return prefixed_hidden(
            self.teacher, input_ids, [self.kv.get(d) for d in doms], [self.length(d) for d in doms]
        )

    def recomputed_hidden(self, input_ids: torch.Tensor, row_domains) -> torch.Tensor:
        """The reference: each row run as ``prefix + text`` from scratch (no cache); tests and benches."""
        doms = [int(d) for d in torch.as_tensor(row_domains).reshape(-1).tolist()]
        rows = []
        for r, d in enumerate(doms):
            pre = torch.as_tensor(self.prefixes.get(d, []), dtype=torch.long, device=input_ids.device)
            full = torch.cat([pre, input_ids[r]]).unsqueeze(0)
            with torch.no_grad():
                rows.append(final_hidden(self.teacher, full)[:, len(pre) :])
        return torch.cat(rows)


def row_domains(domain_ids) -> torch.Tensor:
    """The domain of each row of a batch (``domain_ids`` ``[B, L]``: a packed row is one domain)."""
    d = torch.as_tensor(domain_ids)
    return d.reshape(d.shape[0], -1)[:, 0] if d.dim() > 1 else d
