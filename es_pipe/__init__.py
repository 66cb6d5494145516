"""es_pipe: Evolved Sampling (ES/ESWP) as a stage of streaming PyTorch data pipelines.

The library reports through the ``logging.getLogger("es_pipe")`` logger (epoch ends and
commits, resumes and restores at INFO, skipped shards and samples at INFO, per-shard
detail at DEBUG), besides its warnings. It adds no handler of its own.
"""

import logging

from es_pipe.batch import MetaBatch, SubBatch
from es_pipe.elastic import merge_checkpoints, merge_scores
from es_pipe.errors import (
    ConfigError,
    EsPipeError,
    FeedbackError,
    ManifestError,
    ManifestStorageError,
    ShardError,
    StorageError,
)
from es_pipe.eswp import ESWP, EpochCommit, InfoBatch, Pruning
from es_pipe.hf import from_hf
from es_pipe.manifests import Manifests, manifests_dataset
from es_pipe.retry import Retry
from es_pipe.sampler import EvolvedSampler, Sampler
from es_pipe.sampling import (
    Epochs,
    Evolved,
    LossProportional,
    RandomSubset,
    SelectiveBackprop,
    Steps,
    Uniform,
)
from es_pipe.scores import ScoreStore
from es_pipe.stage import EvolvedSampling, evolve

__version__ = "0.1.0"
logging.getLogger("es_pipe").addHandler(logging.NullHandler())

__all__ = [
    "ESWP",
    "ConfigError",
    "EpochCommit",
    "Epochs",
    "EsPipeError",
    "Evolved",
    "EvolvedSampler",
    "EvolvedSampling",
    "FeedbackError",
    "InfoBatch",
    "LossProportional",
    "ManifestError",
    "ManifestStorageError",
    "Manifests",
    "MetaBatch",
    "Pruning",
    "RandomSubset",
    "Retry",
    "Sampler",
    "ScoreStore",
    "SelectiveBackprop",
    "ShardError",
    "Steps",
    "StorageError",
    "SubBatch",
    "Uniform",
    "evolve",
    "from_hf",
    "manifests_dataset",
    "merge_checkpoints",
    "merge_scores",
]
