"""The ``[onpolicy]`` section (on-policy distillation; the runtime is ``ddk_fast/training/onpolicy.py``) and
its checks against the rest of the run, made before any model or data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .fields import _nonneg_int, _opt, _pos_int, _unit


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): a share of each step's sequences is written by the student itself."""

    fraction: float = _opt(
        0.0,
        "λ: the share of each optimizer step's sequences whose continuation the student generates (the "
        "teacher scores it; KD only on the generated tokens); 0 = off (TRL's lmbda, as a share of every "
        "batch instead of a per-batch coin)",
        *_unit,
    )
    prompt_tokens: int = _opt(
        32,
        "a generated sequence's prompt: the first prompt_tokens tokens of a training row (of the domain "
        "the sampler drew with the DDK weights)",
        *_pos_int,
    )
    max_new_tokens: int = _opt(
        32,
        "tokens the student generates after each prompt (always this many: the separator token does not "
        "stop it; prompt_tokens + max_new_tokens <= data.seq_len, the rest of the row is padding)",
        *_pos_int,
    )
    temperature: float = _opt(
        1.0,
        "sampling temperature of the student's generation (TRL's GKDConfig temperature; the loss's is "
        "[loss] temperature)",
        lambda v: v >= 1e-3,
        "a number >= 0.001",
    )
    top_p: float = _opt(
        1.0,
        "nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)",
        lambda v: 0 < v <= 1,
        "a number in (0, 1]",
    )
    seed: int = _opt(
        0,
        "seed of the sampling noise: a generated token is keyed by (seed, step, sequence, position), so a "
        "resumed run, and a run on another world size, generates the same tokens",
        *_nonneg_int,
    )
    generate_batch_size: int = _opt(
        0,
        "sequences per generate call (a rank's on-policy sequences of a whole optimizer step are generated "
        "together, in chunks of this size); 0 = all in one call",
        *_nonneg_int,
    )

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


def onpolicy_checks(cfg) -> None:
    """Checks across ``[onpolicy]`` and the rest of the run: ConfigError naming the key and value."""
    op = cfg.onpolicy
    if not op.enabled:
        return
    if cfg.model.teacher_cache:
        raise ConfigError(
            "onpolicy.fraction",
            op.fraction,
            "0 with [model] teacher_cache (a cache holds the teacher's signal of the sequences it cached "
            "only and cannot score the tokens the student generates: train with the online teacher)",
        )
    room = cfg.data.seq_len - op.prompt_tokens
    if room < 1:
        raise ConfigError(
            "onpolicy.prompt_tokens",
            op.prompt_tokens,
            f"less than data.seq_len ({cfg.data.seq_len}): the generated tokens go after the prompt",
        )
    if op.max_new_tokens > room:
        raise ConfigError(
            "onpolicy.max_new_tokens",
            op.max_new_tokens,
            f"at most data.seq_len - prompt_tokens = {room} (prompt and generation share a training row)",
        )
    if cfg.loss.kd_weight == 0:
        raise ConfigError(
            "loss.kd_weight",
            cfg.loss.kd_weight,
            "a number > 0 with [onpolicy] fraction > 0 (generated tokens are trained by the KD term only)",
        )
