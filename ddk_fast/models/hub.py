"""Where a model comes from: a local folder or a Hugging Face Hub id, and what can be read of it before any
weight loads.

A ``[model]`` value that names an existing folder is that folder. Any other value of the form ``name`` or
``org/name`` is a Hub id: :func:`resolve_source` finds its snapshot in the Hugging Face cache
(``$HF_HOME/hub/models--org--name/snapshots/<commit>/``, ``refs/<revision>`` naming the commit; the layout the
Hub client writes). Online it first downloads the small files (config, tokenizer, generation config) so
everything the pre-flight reads is local; the weights come later, through ``from_pretrained`` and the same
cache. With ``HF_HUB_OFFLINE=1`` only the cache is used, and a model missing from it is a ConfigError naming
the id. Loading goes through ``from_pretrained(<id>, revision=..., local_files_only=<offline>)``, so the
library's own cache logic decides, and the loaded model's ``name_or_path`` is the Hub id.

Remote code: every ``from_pretrained`` here passes ``trust_remote_code`` from ``[model] trust_remote_code``
(default false). A config whose model type transformers does not know but whose ``auto_map`` names code in
the repository is refused before anything loads unless it is set.

Pre-flight reads (:func:`read_config`, :func:`max_positions`, :func:`check_tokenizer`) use the config and
tokenizer files only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import looks_like_hub_id
from ..errors import ConfigError

log = logging.getLogger("ddk_fast")

# the files a pre-flight reads; downloaded first (online) so a bad config or tokenizer fails before weights
LIGHT_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt"]
# any one of these makes a tokenizer (tokenizer_config.json alone does not: transformers then builds an
# empty tokenizer of one token)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken",
)  # fmt: skip


def offline_unless_hub(model_cfg) -> None:
    """HF_HUB_OFFLINE=1 unless it is set already or a ``[model]`` value is a Hub id (which may need the
    Hub): a run of local folders never waits on a hub lookup. Call it before the Hugging Face client is
    imported (it reads the variable once)."""
    m = model_cfg
    if not any(looks_like_hub_id(v) for v in (m.teacher, m.student, m.tokenizer) if v):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the Hugging Face client reads it (only the cache is used)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``folder`` is local (the snapshot of a Hub id) and holds at least its config and
    tokenizer files; the weights too for a folder, or for a Hub id offline."""

    spec: str  # the config value
    key: str  # the config key, for errors
    folder: Path  # absolute
    hub_id: str | None = None
    revision: str | None = None
    offline: bool = True

    @property
    def is_hub(self) -> bool:
        return self.hub_id is not None

    @property
    def load_path(self) -> str:
        """What ``from_pretrained`` is given: the Hub id (through the cache) or the folder."""
        return self.hub_id or str(self.folder)

    @property
    def record(self) -> str:
        """What a portable output records as this model: its Hub id, or its absolute folder path."""
        return self.hub_id or str(self.folder)

    @property
    def weights_local(self) -> bool:
        """The weight files are in ``folder`` already (a folder, or a Hub id in the offline cache)."""
        return not self.is_hub or self.offline

    def kwargs(self, trust_remote_code: bool = False) -> dict:
        """``from_pretrained`` keyword arguments (revision, cache-only, remote code)."""
        kw: dict = {"trust_remote_code": bool(trust_remote_code)}
        if self.is_hub:
            kw["local_files_only"] = self.offline
            if self.revision:
                kw["revision"] = self.revision
        else:
            kw["local_files_only"] = True
        return kw

    def describe(self) -> str:
        if not self.is_hub:
            return str(self.folder)
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.hub_id}{rev} (Hub cache: {self.folder})"


def resolve_source(spec: str, key: str, revision: str = "") -> ModelSource:
    """The :class:`ModelSource` of a ``[model]`` value (module doc). ConfigError naming ``key`` when it is
    neither an existing folder nor a Hub id that the cache holds (offline) or the Hub serves (online)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return ModelSource(spec, key, p.resolve())
    if p.exists() or not looks_like_hub_id(spec):
        raise ConfigError(
            key, spec, "an existing folder or a Hub id (org/name)", f"resolved to {p.resolve()}"
        )
    from huggingface_hub import constants, snapshot_download

    offline = hub_offline()
    rev = revision or None
    try:
        folder = snapshot_download(
            spec, revision=rev, local_files_only=offline, allow_patterns=None if offline else LIGHT_PATTERNS
        )
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HTTP
        msg = " ".join(str(exc).split())[:200]
        where = f"{constants.HF_HUB_CACHE}/models--{spec.replace('/', '--')}"
        if offline:
            raise ConfigError(
                key,
                spec,
                f"a Hub id in the Hugging Face cache{' at revision ' + revision if revision else ''} "
                "(HF_HUB_OFFLINE=1: nothing is downloaded)",
                f"not found under {where}; download it once with `hf download {spec}` "
                "or run without HF_HUB_OFFLINE",
            ) from None
        raise ConfigError(
            key, spec, "a folder or a Hub id that can be downloaded", f"{type(exc).__name__}: {msg}"
        ) from None
    return ModelSource(spec, key, Path(folder).resolve(), spec, rev, offline)


def tokenizer_source(cfg) -> ModelSource | None:
    """The tokenizer's source: ``[model] tokenizer``, else the teacher's (with the teacher's revision)."""
    spec = cfg.tokenizer or cfg.teacher
    if not spec:
        return None
    same = not cfg.tokenizer or cfg.tokenizer == cfg.teacher
    return resolve_source(spec, "model.tokenizer" if cfg.tokenizer else "model.teacher",
                          cfg.teacher_revision if same else "")  # fmt: skip


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def _config_json(source: ModelSource) -> dict:
    try:
        data = json.loads((source.folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_remote_code(source: ModelSource, trust_remote_code: bool) -> None:
    """ConfigError when the model needs its repository's own code and ``trust_remote_code`` is off."""
    from transformers import CONFIG_MAPPING

    conf = _config_json(source)
    model_type = conf.get("model_type")
    if trust_remote_code or not conf.get("auto_map") or model_type in CONFIG_MAPPING:
        return
    raise ConfigError(
        "model.trust_remote_code",
        False,
        f"true to load {source.spec}",
        f"its config.json names code shipped with the model (auto_map) for the model type {model_type!r}, "
        "which transformers does not know; that code would run on this machine",
    )


def read_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's transformers config, from ``config.json`` only (no weights)."""
    from transformers import AutoConfig

    check_remote_code(source, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(
            str(source.folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise ConfigError(source.key, source.spec, "a model with a readable config.json", msg) from None


def inline_config(config_dict: dict, key: str):
    from transformers import AutoConfig

    d = dict(config_dict)
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{key}.model_type", model_type, f"a valid transformers config ({exc})") from None


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``; GPT-2's ``n_positions``
    maps to it), or None when the config has no such limit."""
    n = getattr(_text(config), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def vocab_rows(config) -> int | None:
    n = getattr(_text(config), "vocab_size", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_tokenizer(tokenizer, tok_key: str, tok_spec: str, model_rows: int | None, model_name: str) -> None:
    """The tokenizer covers the model's vocabulary: its ids fit the model's ``vocab_size`` rows and it
    holds more than half of them (a padded head, e.g. Qwen2.5's 151,936 rows for 151,665 tokens, is fine;
    a tokenizer of a few tokens is what transformers builds when the files are missing)."""
    n = len(tokenizer)
    if model_rows is None:
        return
    if n > model_rows:
        raise ConfigError(
            tok_key,
            tok_spec,
            f"a tokenizer whose ids fit {model_name}'s vocabulary of {model_rows} rows",
            f"it has {n} tokens: ids >= {model_rows} would index past the embedding",
        )
    if 2 * n <= model_rows:
        raise ConfigError(
            tok_key,
            tok_spec,
            f"a tokenizer covering {model_name}'s vocabulary of {model_rows} rows",
            f"it has only {n} tokens: another model's tokenizer, or tokenizer files missing",
        )
