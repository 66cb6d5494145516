"""ESWP, an optional part of a sampler: set-level pruning across epochs and the per-epoch
score manifests.

* :mod:`~es_pipe.eswp.rule`: the pruning rule (``Pruning``, ``InfoBatch``), pure numpy;
* :mod:`~es_pipe.eswp.book`: this epoch's decisions, shards read and key book
  (:mod:`~es_pipe.eswp.keys`);
* :mod:`~es_pipe.eswp.restore`: the restore from manifests and the start of a run;
* :mod:`~es_pipe.eswp.commit`: the epoch commit (``EpochCommit``);
* :mod:`~es_pipe.eswp.state`: ESWP's entries of the sampler's score table;
* :mod:`~es_pipe.eswp.plugin`: ``ESWP``, the object a sampler is given.
"""

from es_pipe.eswp.commit import EpochCommit, shard_owner
from es_pipe.eswp.plugin import ESWP
from es_pipe.eswp.rule import InfoBatch, Pruning

__all__ = ["ESWP", "EpochCommit", "InfoBatch", "Pruning", "shard_owner"]
