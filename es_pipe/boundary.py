"""Deprecated: the epoch boundary is the ESWP part now, :mod:`es_pipe.eswp`.

Kept for one release so that old imports go on working: ``EpochBoundary`` is
:class:`es_pipe.eswp.ESWP`, ``key_text`` and ``shard_owner`` moved to
:mod:`es_pipe.eswp.keys` and :mod:`es_pipe.eswp.commit`.
"""

from es_pipe.eswp.commit import shard_owner
from es_pipe.eswp.keys import key_text
from es_pipe.eswp.plugin import ESWP as EpochBoundary

__all__ = ["EpochBoundary", "key_text", "shard_owner"]
