"""Other engines (DuckDB, pyarrow.dataset, pandas) over a manifests root read committed
rows only, through the README's one-liner ``es_pipe.manifests_dataset(root)`` (issue 15,
"Manifests for other engines"), also where an abandoned run left an ``epoch=N/`` folder:

- a re-run that went back to an earlier checkpoint: its first commit removes the later,
  now uncommitted ``epoch=M/`` folders' es_pipe files (a user's file there stays);
- a publication that failed before its marker (files published to ``epoch=2/``, no
  marker): the folder is there and a plain ``**/*.parquet`` glob reads it, the one-liner
  does not.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import duckdb
import faulty_fs
import numpy as np
import pyarrow.dataset as ds
import pytest
from faulty_fs import Faults, installed

import es_pipe
from es_pipe.errors import ManifestError
from es_pipe.manifests import Manifests

SHARDS = ["s3://bucket/train-000.tar", "s3://bucket/train-001.tar", "/data/train-002.tar"]
ROWS = 10


def _columns(epoch: int, run: int) -> dict[str, np.ndarray]:
    """Scores that say which run wrote the row: ``100 * run + epoch``."""
    return {
        "score": np.full(ROWS, 100 * run + epoch, np.float32),
        "loss": np.ones(ROWS, np.float32),
        "visits": np.full(ROWS, epoch + 1, np.uint32),
        "step": np.full(ROWS, 10 * epoch, np.int32),
        "state": (np.arange(ROWS) < epoch).astype(np.uint8),
    }


def _write(m: Manifests, epoch: int, run: int) -> None:
    for shard in SHARDS:
        m.write_shard(epoch, shard, _columns(epoch, run))
    m.finish(epoch)
    m.commit(epoch)


README = Path(__file__).resolve().parents[1] / "README.md"


def _one_liner(root: str) -> list[tuple]:
    """The README's own snippet (the block that calls ``manifests_dataset``), run on
    ``root``: ``(epoch, avg(pruned))`` per epoch, sorted."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "es_pipe.manifests_dataset(" in b]
    namespace: dict = {"es_pipe": es_pipe}
    exec(block.replace('"runs/17/manifests"', repr(root)), namespace)
    return sorted(namespace["per_epoch"])


def _rows(root: str) -> list[tuple]:
    """Per epoch: rows, min and max score (which run wrote them), pruned count."""
    manifests = es_pipe.manifests_dataset(root)  # noqa: F841 - DuckDB finds it by name
    return duckdb.sql(
        "select epoch, count(*), min(score), max(score), sum(pruned::int) "
        "from manifests group by 1 order by 1"
    ).fetchall()


def _glob(root: Path) -> list[tuple]:
    """What a plain glob over the root reads (the README's line before this fix)."""
    return duckdb.sql(
        f"select epoch, count(*) from read_parquet('{root}/**/*.parquet', hive_partitioning=1) "
        "group by 1 order by 1"
    ).fetchall()


def test_rerun_that_went_back_leaves_no_abandoned_epoch_visible(tmp_path):
    root = tmp_path / "manifests"
    first = Manifests(str(root), attempt="launch-1")
    for epoch in range(3):
        _write(first, epoch, run=1)
    (root / "epoch=2" / "notes.txt").write_text("a user's file")  # not es_pipe's
    # a new launch resumes from the checkpoint taken after epoch 0 and commits epoch 1
    again = Manifests(str(root), attempt="launch-2")
    with pytest.warns(UserWarning) as caught:
        _write(again, 1, run=2)
    messages = " ".join(str(w.message) for w in caught)
    assert "removing the commit of epoch 2" in messages and "notes.txt" in messages
    assert again.committed() == [0, 1]
    # the abandoned epoch=2/ lost es_pipe's files; the user's file is still there
    assert sorted(p.name for p in (root / "epoch=2").iterdir()) == ["notes.txt"]
    n = ROWS * len(SHARDS)
    assert _one_liner(str(root)) == [(0, 0.0), (1, 1 / ROWS)]
    assert _rows(str(root)) == [(0, n, 100.0, 100.0, 0), (1, n, 201.0, 201.0, n // ROWS)]
    assert _glob(root) == [(0, n), (1, n)]  # plain readers see no abandoned rows either


def _marker_write(tmp_path: Path) -> int:
    """Index (from the first write of epoch 2) of the marker's write, on a healthy store."""
    root = faulty_fs.url(tmp_path / "healthy")
    with installed(Faults()) as plan:
        m = Manifests(root, attempt="a")
        for epoch in range(2):
            _write(m, epoch, run=1)
        start = plan.writes
        _write(m, 2, run=1)
    writes = [path for _, path, _ in plan.written[start:]]
    return next(i for i, path in enumerate(writes) if "_commits/epoch=00000002" in path)


def test_failed_publication_is_never_read_by_the_one_liner(tmp_path):
    local = tmp_path / "manifests"
    root = faulty_fs.url(local)
    marker_at = _marker_write(tmp_path)
    with installed(Faults()):
        m = Manifests(root, attempt="launch-1", retry=1)
        for epoch in range(2):
            _write(m, epoch, run=1)
    plan = Faults(write_error_at=marker_at, write_error_persistent=True)
    with installed(plan):
        plan.writes = 0
        crashed = Manifests(root, attempt="launch-2", retry=1)
        with pytest.raises(ManifestError, match="failed 1 times"):
            _write(crashed, 2, run=2)
    assert plan.injected["write_error"] >= 1
    # epoch=2/ holds the published files of an epoch that never got its marker
    assert Manifests(str(local)).committed() == [0, 1]
    assert len(list((local / "epoch=2").glob("*.parquet"))) == len(SHARDS)
    n = ROWS * len(SHARDS)
    assert _glob(local) == [(0, n), (1, n), (2, n)]  # a plain glob reads them as data
    assert _one_liner(str(local)) == [(0, 0.0), (1, 1 / ROWS)]
    assert _rows(str(local)) == [(0, n, 100.0, 100.0, 0), (1, n, 101.0, 101.0, n // ROWS)]
    # pyarrow.dataset and pandas through the same dataset: committed rows only
    dataset = es_pipe.manifests_dataset(str(local))
    assert dataset.to_table(filter=ds.field("epoch") == 2).num_rows == 0
    frame = dataset.to_table().to_pandas()
    assert frame.groupby("epoch").size().to_dict() == {0: n, 1: n}
    assert set(frame["shard"].astype(str)) == set(SHARDS)
    polars = pytest.importorskip("polars")  # and Polars, lazily, through the same dataset
    counts = polars.scan_pyarrow_dataset(dataset).group_by("epoch").len().collect()
    assert dict(counts.sort("epoch").iter_rows()) == {0: n, 1: n}
    # the next commit of epoch 2 (the restarted launch) replaces the abandoned files
    with installed(Faults()):
        _write(Manifests(root, attempt="launch-3"), 2, run=3)
    assert _one_liner(str(local))[2] == (2, 2 / ROWS)
    assert _rows(str(local))[2] == (2, n, 302.0, 302.0, 2 * n // ROWS)
    assert _glob(local) == [(0, n), (1, n), (2, n)]


def test_dataset_of_some_epochs_and_errors(tmp_path):
    root = str(tmp_path / "m")
    with pytest.raises(ManifestError, match="no committed epoch"):
        es_pipe.manifests_dataset(root)
    m = Manifests(root, attempt="a")
    for epoch in range(3):
        _write(m, epoch, run=1)
    table = es_pipe.manifests_dataset(root, epochs=[2, 0]).to_table()
    assert sorted(set(table.column("epoch").to_pylist())) == [0, 2]
    assert table.schema.field("epoch").type == "int32"
    with pytest.raises(ManifestError, match=r"epoch 7 .* is not committed"):
        es_pipe.manifests_dataset(root, epochs=[7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading warns about nothing
        assert Manifests(root).dataset().count_rows() == 3 * ROWS * len(SHARDS)
