"""The data layer: token shards, corpus preparation, validation packing and the domain sampler.

Nothing here imports the optional C++ extension at import time (the sampler loads it lazily).
"""

from .corpus import PreparedDomain, prepare_config_domains, prepare_domains, validation_batches
from .sampler import DomainSampler
from .shards import ShardError, ShardWriter, TokenShard

__all__ = [
    "DomainSampler",
    "PreparedDomain",
    "ShardError",
    "ShardWriter",
    "TokenShard",
    "prepare_config_domains",
    "prepare_domains",
    "validation_batches",
]
