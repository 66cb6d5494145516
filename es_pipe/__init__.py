"""es_pipe: Evolved Sampling (ES/ESWP) as a stage of streaming PyTorch data pipelines.

The library reports through the ``logging.getLogger("es_pipe")`` logger (epoch ends and
commits, resumes and restores at INFO, skipped shards and samples at INFO, per-shard
detail at DEBUG), besides its warnings. It adds no handler of its own.

Names: the stage is :class:`SelectStage` (a torchdata node, over any iterable), the
selector it asks is :class:`Selector` (policy, schedule, scores, RNG), the policies are
:class:`Evolved` (ES), :class:`Uniform`, :class:`RandomSubset`, :class:`LossProportional`
and :class:`SelectiveBackprop`, and ESWP's pruning rule is :class:`Pruning`
(``Pruning.infobatch()`` for InfoBatch). The previous release's names are deprecated
aliases for one release, each use with a ``DeprecationWarning`` (:mod:`es_pipe.renamed`).
"""

import logging
from typing import Any

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
from es_pipe.eswp import ESWP, EpochCommit, Pruning
from es_pipe.hf import from_hf
from es_pipe.manifests import Manifests, manifests_dataset
from es_pipe.retry import Retry
from es_pipe.sampler import Selector
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
from es_pipe.stage import SelectStage

__version__ = "0.1.0"
logging.getLogger("es_pipe").addHandler(logging.NullHandler())

__all__ = [
    "ESWP",
    "ConfigError",
    "EpochCommit",
    "Epochs",
    "EsPipeError",
    "Evolved",
    "FeedbackError",
    "LossProportional",
    "ManifestError",
    "ManifestStorageError",
    "Manifests",
    "MetaBatch",
    "Pruning",
    "RandomSubset",
    "Retry",
    "ScoreStore",
    "SelectStage",
    "SelectiveBackprop",
    "Selector",
    "ShardError",
    "Steps",
    "StorageError",
    "SubBatch",
    "Uniform",
    "from_hf",
    "manifests_dataset",
    "merge_checkpoints",
    "merge_scores",
]

_DEPRECATED = ("Sampler", "EvolvedSampler", "EvolvedSampling", "evolve", "InfoBatch")


def __getattr__(name: str) -> Any:
    """The deprecated names of one release (:mod:`es_pipe.renamed`)."""
    if name not in _DEPRECATED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
