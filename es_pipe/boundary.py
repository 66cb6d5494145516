"""Deprecated: the epoch boundary is the ESWP part now, :mod:`es_pipe.eswp`.

Kept for one release so that old imports go on working (with a ``DeprecationWarning``):
``EpochBoundary`` is :class:`es_pipe.eswp.ESWP`, ``key_text`` and ``shard_owner`` moved to
:mod:`es_pipe.eswp.keys` and :mod:`es_pipe.eswp.commit`.
"""

import warnings

from es_pipe.eswp.commit import shard_owner
from es_pipe.eswp.keys import key_text
from es_pipe.eswp.plugin import ESWP as EpochBoundary

warnings.warn(
    "es_pipe.boundary is deprecated: import ESWP from es_pipe (or es_pipe.eswp), key_text "
    "from es_pipe.eswp.keys and shard_owner from es_pipe.eswp.commit",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["EpochBoundary", "key_text", "shard_owner"]
