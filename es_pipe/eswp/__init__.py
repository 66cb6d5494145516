"""ESWP, an optional part of a sampler: set-level pruning across epochs and the per-epoch
score manifests.

* :mod:`~es_pipe.eswp.rule`: the pruning rule (``Pruning``, ``Pruning.infobatch``), pure
  numpy;
* :mod:`~es_pipe.eswp.book`: this epoch's decisions, shards read and key book
  (:mod:`~es_pipe.eswp.keys`);
* :mod:`~es_pipe.eswp.restore`: the restore from manifests and the start of a run;
* :mod:`~es_pipe.eswp.commit`: the epoch commit (``EpochCommit``);
* :mod:`~es_pipe.eswp.state`: ESWP's entries of the sampler's score table;
* :mod:`~es_pipe.eswp.plugin`: ``ESWP``, the object a sampler is given.
"""

from typing import Any

from es_pipe.eswp.commit import EpochCommit, shard_owner
from es_pipe.eswp.plugin import ESWP
from es_pipe.eswp.rule import Pruning

__all__ = ["ESWP", "EpochCommit", "Pruning", "shard_owner"]


def __getattr__(name: str) -> Any:
    """The deprecated name of one release, ``InfoBatch`` (:mod:`es_pipe.renamed`)."""
    if name != "InfoBatch":  # the deprecated names
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from es_pipe.renamed import old_name

    return old_name(__name__, name)
