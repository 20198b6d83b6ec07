"""``prompts.json``: the result of the prompt search, and the checks that it fits a run.

Schema (``format = "ddk_fast.prompts/1"``)::

    {
      "format": "ddk_fast.prompts/1",
      "teacher": {"path": "/abs/teacher" | "", "config_sha256": "...", "init_seed": 0 (inline only),
                  "shapes_sha256": "...", "embedding_probe": [mean, std]},
      "tokenizer": {"vocab_size": 320, "vocab_sha256": "..."},
      "settings": {"budget": ..., "dev_sequences": ..., "max_fewshot": ..., "max_prefix_tokens": ...,
                   "seed": ..., "seq_len": ..., "templates": [...]},
      "domains": {
        "<name>": {"prefix": "text", "prefix_ids": [ids], "kind": "none|explore|swap_near|swap_far|fewshot",
                   "dev_ce": float, "no_prefix_ce": float, "evaluations": int,
                   "dev_slice": {"split": "train", "doc_indices": [...], "sequences": n, "tokens": n},
                   "fewshot_pool": [train doc indices, most similar first],
                   "history": [{"kind": ..., "prefix": ..., "n_tokens": ..., "ce": ...}, ...]}
      }
    }

The token ids are what training uses (the text is for people). Identity: the teacher by a hash of its
normalised transformers config (and, for an inline config, the init seed; checked before any weight is read)
plus a hash of its parameter names and shapes and the mean/std of its input embeddings (checked once it is
loaded, before training); the tokenizer by its size and a hash of its vocabulary. A prompts.json of another
teacher or tokenizer is a ConfigError naming ``[teacher_prompt] use``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

FORMAT = "ddk_fast.prompts/1"
KEY = "teacher_prompt.use"
_VOLATILE = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
    "name_or_path",
    "attn_implementation",
}
_PROBE_RTOL = 1e-2  # bfloat16 vs float32 copies of the same weights agree far better than this


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    return {"vocab_size": int(len(tokenizer)), "vocab_sha256": _sha(vocab)}


def teacher_config_identity(model_cfg, seed: int) -> dict:
    """The teacher's identity from its config only (no weights read): path, normalised config hash."""
    from transformers import AutoConfig

    if model_cfg.teacher:
        conf = AutoConfig.from_pretrained(model_cfg.teacher, local_files_only=True).to_dict()
    else:
        d = dict(model_cfg.teacher_config)
        conf = AutoConfig.for_model(d.pop("model_type"), **d).to_dict()
    conf = {k: v for k, v in conf.items() if not k.startswith("_") and k not in _VOLATILE}
    out = {
        "path": str(Path(model_cfg.teacher).resolve()) if model_cfg.teacher else "",
        "config_sha256": _sha(conf),
    }
    if not model_cfg.teacher:  # random init: the weights depend on the seed
        out["init_seed"] = int(seed)
    return out


def teacher_weights_identity(teacher: nn.Module) -> dict:
    shapes = [[n, list(p.shape)] for n, p in teacher.named_parameters()]
    emb = teacher.get_input_embeddings().weight.detach().double()
    return {"shapes_sha256": _sha(shapes), "embedding_probe": [float(emb.mean()), float(emb.std())]}


def check_prompts_file(path: str, domain_names: list[str]) -> dict:
    """Read and check a prompts.json against the run's domains (before any model loads)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(KEY, path, "an existing prompts.json file", f"resolved to {p.resolve()}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(KEY, path, "a prompts.json (valid JSON)", str(exc)[:200]) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(KEY, path, f'a prompts.json with format "{FORMAT}"', f"format is {got!r}")
    domains = data.get("domains")
    if not isinstance(domains, dict):
        raise ConfigError(KEY, path, "a prompts.json with a `domains` table")
    for name, entry in domains.items():
        if name not in domain_names:
            raise ConfigError(
                KEY,
                path,
                f"prompts for this run's domains ({', '.join(domain_names)})",
                f"unknown domain {name!r}",
            )
        ids = entry.get("prefix_ids") if isinstance(entry, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ConfigError(
                KEY, path, "a list of token ids in domains.<name>.prefix_ids", f"domain {name!r}"
            )
    return data


def check_prompts_identity(data: dict, path: str, tokenizer, model_cfg, seed: int) -> None:
    """The prompts.json was written for this tokenizer and this teacher's config (before weights load)."""
    want = tokenizer_identity(tokenizer)
    got = data.get("tokenizer", {})
    if got != want:
        raise ConfigError(
            KEY,
            path,
            "a prompts.json written for this run's tokenizer",
            f"it was written for a tokenizer of {got.get('vocab_size')} tokens (hash "
            f"{str(got.get('vocab_sha256'))[:12]}), this one has {want['vocab_size']} "
            f"(hash {want['vocab_sha256'][:12]})",
        )
    mine = teacher_config_identity(model_cfg, seed)
    theirs = data.get("teacher", {})
    for k in ("config_sha256", "init_seed"):
        if theirs.get(k) != mine.get(k):
            raise ConfigError(
                KEY,
                path,
                "a prompts.json written for this run's teacher",
                f"teacher {k} differs: {theirs.get(k)!r} in the file, {mine.get(k)!r} here "
                f"(file written for {theirs.get('path') or 'an inline teacher'})",
            )
    n = want["vocab_size"]
    for name, entry in data["domains"].items():
        if any(i >= n for i in entry["prefix_ids"]):
            raise ConfigError(KEY, path, f"prefix token ids < {n}", f"domain {name!r}")


def check_loaded_teacher(data: dict, path: str, teacher: nn.Module) -> None:
    """After the teacher loads (before training): its parameter shapes and embedding statistics match."""
    mine = teacher_weights_identity(teacher)
    theirs = data.get("teacher", {})
    if theirs.get("shapes_sha256") != mine["shapes_sha256"]:
        raise ConfigError(
            KEY, path, "a prompts.json written for this run's teacher", "parameter shapes differ"
        )
    probe = theirs.get("embedding_probe")
    if probe is None or not torch.allclose(
        torch.tensor(probe, dtype=torch.float64),
        torch.tensor(mine["embedding_probe"], dtype=torch.float64),
        rtol=_PROBE_RTOL,
        atol=1e-6,
    ):
        raise ConfigError(
            KEY,
            path,
            "a prompts.json written for this run's teacher",
            f"input-embedding mean/std {probe} in the file, {mine['embedding_probe']} here (other weights)",
        )


def run_prefixes(data: dict, domain_names: list[str]) -> dict[int, list[int]]:
    """Domain index -> prefix token ids (only domains with a non-empty prefix)."""
    out = {}
    for i, name in enumerate(domain_names):
        entry = data["domains"].get(name)
        if entry and entry["prefix_ids"]:
            out[i] = list(entry["prefix_ids"])
    return out
