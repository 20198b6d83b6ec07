"""Typed, validated run configuration: ``run.toml`` is a thin format over the dataclasses of ``run.py`` and
``akd.py``; ``parse.py`` builds and checks them (every error names the key, the value and what was expected).
"""

from .akd import HiddenConfig, TeacherPromptConfig
from .curriculum import CurriculumConfig, StageConfig
from .onpolicy import OnPolicyConfig
from .parse import (
    apply_overrides,
    build_config,
    dump_toml,
    load_config,
    parse_override,
    reference_markdown,
    tomllib,
)
from .run import (
    RESUMABLE_KEYS,
    CheckpointConfig,
    DataConfig,
    DDKConfig,
    DomainConfig,
    LossConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainConfig,
    expand_data_files,
    looks_like_hub_id,
)

__all__ = [
    "CheckpointConfig", "CurriculumConfig", "DataConfig", "DDKConfig", "DomainConfig", "HiddenConfig",
    "LossConfig", "ModelConfig", "OnPolicyConfig", "OutputConfig", "RunConfig", "StageConfig",
    "TeacherPromptConfig", "TrainConfig", "apply_overrides", "build_config", "dump_toml", "load_config",
    "parse_override", "reference_markdown", "tomllib", "RESUMABLE_KEYS", "expand_data_files",
    "looks_like_hub_id",
]  # fmt: skip
