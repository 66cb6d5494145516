"""Safe defaults: no code-executing decoding of sample data or manifests, and nothing
written outside the manifest root, whatever the shard names, sample keys or (tampered)
done-files and markers say."""

from __future__ import annotations

import builtins
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchdata.nodes as tn

import es_pipe
from es_pipe.errors import ConfigError, ManifestError
from es_pipe.manifests import COMMITS, STAGING, Manifests, safe_name
from es_pipe.shard_writer import write_shards
from es_pipe.sources import ParquetSource, WebDatasetSource

HOSTILE = [
    "../../etc/x",
    "/etc/passwd",
    "s3://bucket/../../x",
    "file:///etc/passwd",
    "..",
    ".",
    "a/..",
    "..\\..\\windows\\x",
    "%2e%2e/%2e%2e/x",
    ".hidden",
    "-rf",
    "ü/é \n\x00 shard",
    "x" * 500,
]


class _Payload:
    """Unpickling it creates the file ``path``: code execution, observable."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _cols(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {k: np.full(n, value, np.float32) for k in ("score", "loss", "visits", "step")}


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- decoding


def test_pickled_members_are_delivered_as_bytes_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(sentinel))
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tf:
        for ext in ("pyd", "pickle", "pth", "npy"):
            info = tarfile.TarInfo(f"k0.{ext}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (sample,) = list(WebDatasetSource(str(shard)))
    assert {sample[e] for e in ("pyd", "pickle", "pth", "npy")} == {payload}
    assert not sentinel.exists()
    # through the stage too: the bytes are only ever moved around
    sampler = es_pipe.Selector(es_pipe.Evolved(), 1, 1, seed=0)
    for meta in tn.Loader(es_pipe.SelectStage(WebDatasetSource(str(shard)), sampler)):
        assert meta.select(torch.ones(1)).data["pyd"] == [payload]
    assert not sentinel.exists()
    # what the threat is: webdataset's default decoders would have run it
    from webdataset.autodecode import basichandlers

    basichandlers("pyd", payload)
    assert sentinel.exists()


def test_pickles_in_parquet_stay_bytes(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(sentinel))
    path = tmp_path / "evil.parquet"
    pq.write_table(pa.table({"blob": [payload], "obj": pa.array([payload], pa.binary())}), path)
    (row,) = list(ParquetSource(str(path)))
    assert row["blob"] == payload and row["obj"] == payload and not sentinel.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    sampler = es_pipe.Selector(es_pipe.Evolved(), 4, 2, seed=0)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    sampler.load_state_dict(torch.load(buffer, weights_only=True))
    library = Path(es_pipe.__file__).parent
    for source in library.rglob("*.py"):  # any torch.load in the library is weights_only
        for call in re.findall(r"torch\.load\([^)]*\)", source.read_text()):
            assert "weights_only=True" in call, (source, call)
        assert "pickle.load" not in source.read_text(), source


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("shard", HOSTILE)
def test_safe_name_cannot_leave_its_folder(shard):
    name = safe_name(shard)
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}-[0-9a-f]{12}", name), name


def test_hostile_shard_names_and_keys_stay_inside_the_root(tmp_path):
    root = tmp_path / "run" / "manifests"
    m = Manifests(str(root))
    keys = pa.array(["../../escape", "/etc/passwd", "a/../../b"] * 2)
    for shard in HOSTILE:
        m.write_shard(0, shard, _cols(6), keys=keys)
    m.finish(0)
    m.commit(0)
    assert _files(tmp_path) <= _files(root) and _files(root)
    assert len(list((root / "epoch=0").iterdir())) == len(HOSTILE)  # no two share a name
    back = Manifests(str(root))
    for shard in HOSTILE:
        got = back.read_shard(shard)
        assert got.keys.to_pylist() == keys.to_pylist()  # keys are data, never paths


def _staged_epoch(root: Path) -> tuple[Manifests, Path, dict]:
    m = Manifests(str(root))
    m.write_shard(0, "a.tar", _cols(4))
    m.write_shard(0, "b.tar", _cols(4))
    done = Path(m.finish(0))
    return m, done, json.loads(done.read_text())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("path", "../../outside.parquet"),
        ("path", "/tmp/outside.parquet"),
        ("path", "s3://bucket/x.parquet"),
        ("path", "epoch=0/../../outside.parquet"),
        ("path", f"{COMMITS}/epoch=00000007.json"),
        ("path", "epoch=1/a.parquet"),
        ("path", "epoch=0/sub/a.parquet"),
        ("staged", "../victim.txt"),
        ("staged", "epoch=0/a.parquet"),
        ("staged", f"{STAGING}/epoch=0/../../../victim.txt"),
    ],
)
def test_tampered_done_file_is_refused_before_any_file_moves(tmp_path, field, value):
    root = tmp_path / "m"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    m, done, content = _staged_epoch(root)
    content["files"][0][field] = value
    done.write_text(json.dumps(content))
    before = _files(tmp_path)
    with pytest.raises(ManifestError, match="not written by es_pipe or was edited"):
        m.commit(0)
    assert _files(tmp_path) == before and victim.read_text() == "keep me"
    assert Manifests(str(root)).committed() == []


@pytest.mark.parametrize("value", ["../outside.parquet", "epoch=1/x.parquet", 7])
def test_tampered_marker_is_refused(tmp_path, value):
    root = tmp_path / "m"
    m, _, _ = _staged_epoch(root)
    m.commit(0)
    marker = root / COMMITS / "epoch=00000000.json"
    content = json.loads(marker.read_text())
    content["files"][0]["path"] = value
    marker.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match=r"not written by es_pipe or was edited|is damaged"):
        Manifests(str(root)).read_epoch(0)


def test_shard_writer_keys_and_fields_never_become_paths(tmp_path):
    for bad in ("../x", "/abs/x", "a/../../x"):
        with pytest.raises(ConfigError, match=r"not a relative name|contains a dot"):
            write_shards([{"__key__": bad, "txt": "x"}], str(tmp_path / "k-%03d.tar"), "tar", 10)
    with pytest.raises(ConfigError, match="without slashes"):
        write_shards([{"__key__": "k", "a/../../x": "x"}], str(tmp_path / "f-%03d.tar"), "tar", 10)
    assert not any(p.name == "x" for p in tmp_path.parent.rglob("x"))


def test_sampler_with_hostile_keys_writes_only_its_configured_folders(tmp_path):
    data, root = tmp_path / "data", tmp_path / "manifests"
    data.mkdir()
    keys = [f"../../../k{i}" if i % 2 else f"/abs/k{i}" for i in range(24)]
    table = pa.table({"key": keys, "x": np.arange(24, dtype=np.float32)})
    pq.write_table(table, data / "train-0.parquet", row_group_size=8)
    sampler = es_pipe.Selector(
        es_pipe.Evolved(),
        8,
        4,
        seed=0,
        total_epochs=3,
        eswp=es_pipe.ESWP(prune=es_pipe.Pruning(ratio=0.5), manifests=str(root)),
    )
    source = ParquetSource(str(data / "train-0.parquet"), key_column="key", pruned=sampler.pruned)
    loader = tn.Loader(es_pipe.SelectStage(source, sampler))
    for _ in range(3):
        for meta in loader:
            meta.select(meta.data["x"].float() + 1.0)
    assert Manifests(str(root)).committed()
    outside = _files(tmp_path) - _files(root) - _files(data)
    assert not outside, outside
    stored = Manifests(str(root)).read_epoch().column("key").to_pylist()
    assert sorted(stored) == sorted(keys)
