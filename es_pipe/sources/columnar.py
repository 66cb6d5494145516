"""The ``columnar=`` option that shard readers share: sample dicts or column chunks.

A reader that can deliver :class:`~es_pipe.columns.ColumnChunk` blocks (Parquet, Arrow,
WebDataset tar) takes ``columnar=None|True|False``. ``True``: its chunks' items are
column chunks, each handed out whole (:meth:`ShardedSource.take_block
<es_pipe.sources.base.ShardedSource.take_block>`) and counted as its rows, so states,
resume and ``equalize`` stay those of the dict path. ``False``: one dict per sample.
``None`` (the default): dicts until a ``SelectStage`` with its default collate reads the
source directly or through a ``tn.Prefetcher`` and calls :meth:`prefer_columnar`
(:func:`es_pipe.stage.auto_columnar`): there the switch cannot change what the stage emits.
"""

from __future__ import annotations

from typing import Any

from es_pipe.errors import ConfigError
from es_pipe.sources.base import ShardedSource

__all__ = ["ColumnarOption"]


class ColumnarOption(ShardedSource):
    """A :class:`ShardedSource` whose reader yields column chunks under ``columnar``."""

    columnar_option: bool | None = None
    columnar: bool = False

    def _set_columnar(self, columnar: bool | None) -> None:
        """Check and keep the ``columnar=`` argument."""
        if columnar is not None and not isinstance(columnar, bool):
            raise ConfigError(f"columnar={columnar!r} must be True, False or None (automatic)")
        self.columnar_option = columnar
        self.columnar = bool(columnar)  # None: the dict path until a stage prefers columns

    def prefer_columnar(self) -> None:
        """Called by the ``SelectStage`` stage that reads this source directly with its
        default collate: under ``columnar=None`` (automatic) the source yields column
        chunks from its next ``reset()`` on; the stage's meta-batches are the dict
        path's, identity fields included (``tests/test_columnar.py``,
        ``tests/test_columnar_tar.py``)."""
        if self.columnar_option is None:
            self.columnar = True

    def _from_chunk(self) -> Any:
        """Under ``columnar=True``: the whole next chunk, counted by its rows (cut where
        ``equalize`` ends the stream), so the cursors and counts of the state stay those
        of the dict path."""
        if not self.columnar:
            return ShardedSource._from_chunk(self)
        return self.take_block()
