"""Retries after transient filesystem errors: the policy, and the shard readers reading
real tar / Parquet / Arrow shards through a filesystem that fails on a seeded schedule."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import time
import warnings

import faulty_fs
import pytest
from _sources_helpers import FORMATS, SIZES, all_idents, ident, make_shards, source
from faulty_fs import Faults, installed

from es_pipe import Retry
from es_pipe.errors import ConfigError, ManifestError, ShardError
from es_pipe.sources import WebDatasetSource

FAST = Retry(attempts=3, backoff=0.0005, seed=0)


# --------------------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("slow"), True),
        (OSError(errno.EIO, "io"), True),
        (OSError("no errno"), True),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
        (PermissionError(errno.EACCES, "no"), False),
        (IsADirectoryError(errno.EISDIR, "dir"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (OSError(errno.EROFS, "read-only"), False),
        (ValueError("bad data"), False),
        (ShardError("es_pipe's own"), False),
    ],
)
def test_what_is_transient(exc, transient):
    assert Retry().is_transient(exc) is transient


def test_backoff_grows_is_bounded_and_seeded():
    policy = Retry(attempts=8, backoff=0.1, max_delay=0.5, jitter=0.5, seed=3)
    delays = [policy.delay(k) for k in range(1, 8)]
    assert all(0.05 <= d <= 0.1 for d in delays[:1])
    assert all(d <= 0.5 for d in delays) and max(delays) > 0.25
    again = Retry(attempts=8, backoff=0.1, max_delay=0.5, jitter=0.5, seed=3)
    assert [again.delay(k) for k in range(1, 8)] == delays
    assert [Retry(backoff=1, jitter=0).delay(k) for k in (1, 2, 3)] == [1, 2, 4]


def test_call_retries_then_succeeds_or_gives_up():
    calls, retried = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert FAST.call(flaky, on_retry=lambda k, e: retried.append(k)) == "ok"
    assert retried == [1, 2]
    calls.clear()
    with pytest.raises(RuntimeError, match="gave up after 2"):
        Retry(2, backoff=0).call(
            flaky, exhausted=lambda e, n: RuntimeError(f"gave up after {n}: {e}")
        )
    assert len(calls) == 2
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        FAST.call(missing)
    assert len(calls) == 1  # never retried


def test_retry_option_is_checked():
    assert Retry.of(None).attempts == 3 and Retry.of(5).attempts == 5 and Retry.of(FAST) is FAST
    for bad in ("3", 2.5, True):
        with pytest.raises(ConfigError, match="retry="):
            Retry.of(bad)
    with pytest.raises(ConfigError, match="attempts=0"):
        Retry.of(0)
    with pytest.raises(ConfigError, match="backoff"):
        Retry(backoff=-1)


# --------------------------------------------------------------------------- sources


def _faulty_shards(tmp_path, fmt):
    return [faulty_fs.url(u) for u in make_shards(str(tmp_path), fmt)]


def _read_all(src):
    return [ident(s) for s in src]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_sources_read_through_transient_errors(tmp_path, fmt, shuffled):
    urls = _faulty_shards(tmp_path, fmt)
    extra = {"shuffle_buffer": 4} if fmt == "tar" else {"shuffle_rows": True}
    kw = {"shuffle": True, "seed": 1, **(extra if shuffled else {})}
    with installed(Faults()):
        expected = _read_all(source(fmt, urls, **kw))
    assert sorted(expected) == all_idents(urls)
    plan = Faults(seed=7, read_error_rate=0.3)
    with installed(plan):
        src = source(fmt, urls, retry=FAST, **kw)
        got = _read_all(src)
    assert got == expected  # same samples, same order: none lost, none twice
    assert plan.injected["read_transient"] > 0
    assert src.stats["retries"] == plan.injected["read_transient"]
    faulty_fs.report(
        f"source_transient_reads[{fmt},{'shuffled' if shuffled else 'in order'}]",
        {
            "samples": len(got),
            "faults_injected": dict(plan.injected),
            "retries_reported": src.stats["retries"],
            "samples_lost_or_duplicated": len(got) - len(set(got)) + len(expected) - len(got),
        },
    )


def test_compressed_tar_through_transient_errors(tmp_path):
    (plain,) = make_shards(str(tmp_path), "tar", sizes=[40])
    with open(plain, "rb") as f, gzip.open(plain + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    url = faulty_fs.url(plain + ".gz")
    plan = Faults(seed=2, read_error_rate=0.5)
    with installed(plan):
        src = WebDatasetSource(url, retry=FAST)
        keys = [s["__key__"] for s in src]
    assert keys == [f"s0_{j}" for j in range(40)]
    assert src.stats["retries"] == plan.injected["read_transient"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_that_keeps_failing_follows_on_error(tmp_path, fmt):
    urls = _faulty_shards(tmp_path, fmt)
    bad = urls[3]  # 12 samples
    # the tar reader reads a small shard in one call (after the open): fail it from there
    after = 1 if fmt == "tar" else 2
    plan = Faults(broken=(bad.removeprefix("faulty://"),), broken_after=after)
    with installed(plan), pytest.raises(ShardError) as info:
        _read_all(source(fmt, urls, retry=FAST))
    message = str(info.value)
    assert bad in message and "3 times" in message and "retry=" in message
    assert "on_error='skip'" in message
    with installed(Faults(broken=plan.broken, broken_after=after)):
        src = source(fmt, urls, retry=FAST, on_error="skip")
        with pytest.warns(UserWarning, match="skipping the rest of a shard"):
            got = _read_all(src)
    assert src.stats["skipped_shards"] == 1 and src.stats["retries"] >= 2
    good = [i for i in all_idents(urls) if i[0] != bad]
    assert sorted(i for i in got if i[0] != bad) == good  # every other sample, once
    assert len(got) == len(set(got)) and len(got) - len(good) < SIZES[3]


def test_no_retry_when_attempts_is_one(tmp_path):
    urls = _faulty_shards(tmp_path, "parquet")
    with (
        installed(Faults(seed=1, read_error_rate=1.0, max_consecutive=1)),
        pytest.raises(ShardError, match="1 times"),
    ):
        _read_all(source("parquet", urls, retry=1))


def test_missing_shard_is_not_retried(tmp_path):
    url = faulty_fs.url(tmp_path / "nope.tar")
    start = time.perf_counter()
    with installed(Faults()), pytest.raises(ShardError, match="does not exist"):
        _read_all(WebDatasetSource(url, retry=Retry(5, backoff=1.0)))
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- manifests


def test_manifest_reads_and_writes_through_transient_errors(tmp_path):
    import numpy as np

    from es_pipe.manifests import Manifests

    cols = {k: np.arange(5, dtype=np.float32) for k in ("score", "loss", "visits", "step")}
    root = faulty_fs.url(tmp_path / "m")
    plan = Faults(seed=4, read_error_rate=0.3)
    with installed(plan):
        m = Manifests(root, retry=FAST)
        m.write_shard(0, "a.tar", cols)
        m.finish(0)
        m.commit(0)
        fresh = Manifests(root, retry=FAST)
        for _ in range(5):
            fresh._markers.clear()
            assert fresh.read_epoch(0).num_rows == 5
    assert plan.injected["read_transient"] > 0
    assert m.retries + fresh.retries == plan.injected["read_transient"]
    failing = Faults(seed=0, read_error_rate=1.0, max_consecutive=10)
    with installed(failing), pytest.raises(ManifestError, match=r"failed 3 times.*Retry"):
        Manifests(root, retry=FAST).read_epoch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Manifests(root).committed() == [0]


# --------------------------------------------------------------------------- retry= everywhere


def _keeps_failing(times: int) -> Faults:
    """Every read of a path fails ``times`` times in a row, then succeeds."""
    return Faults(seed=0, read_error_rate=1.0, max_consecutive=times)


PATIENT = Retry(attempts=5, backoff=0.0005, seed=0)  # gets through 4 failures in a row


@pytest.mark.parametrize("look_up", ["from_index", "from_spec", "fingerprint", "manifests"])
def test_the_callers_retry_policy_is_the_one_used(tmp_path, look_up):
    """The look-ups that used a fixed ``Retry()`` (3 attempts) take the caller's
    ``retry=``: 4 failures in a row defeat the default and not ``Retry(attempts=5)``."""
    from es_pipe.manifests import Manifests
    from es_pipe.sources.shards import ShardList, fingerprint

    (tmp_path / "a[0].tar").write_bytes(b"x" * 7)  # glob characters: from_spec looks it up
    (tmp_path / "index.txt").write_text("a[0].tar 3\n")
    shard = f"{faulty_fs.url(tmp_path)}/a[0].tar"
    calls = {
        "from_index": lambda r: (
            ShardList.from_index(f"{faulty_fs.url(tmp_path)}/index.txt", retry=r).urls
        ),
        "from_spec": lambda r: ShardList.from_spec(shard, retry=r).urls,
        "fingerprint": lambda r: fingerprint(shard, retry=r)["size"],
        "manifests": lambda r: (
            Manifests(str(tmp_path / "m"), retry=r).fingerprint(shard) or {}
        ).get("size"),
    }
    expected = 7 if look_up in ("fingerprint", "manifests") else (shard,)
    with installed(_keeps_failing(4)) as plan:  # the default policy: 3 attempts
        try:
            got = calls[look_up](None)
        except (OSError, ConfigError):  # the read gave up; a lookup that gave up: no file
            got = "gave up"
    assert got != expected
    assert plan.injected["read_transient"] >= 3  # from_spec then tries a glob: 3 more
    with installed(_keeps_failing(4)) as plan:
        assert calls[look_up](PATIENT) == expected
    assert plan.injected["read_transient"] == 4


def test_index_shards_looks_its_shards_up_under_the_callers_retry(tmp_path):
    from es_pipe.indexing import index_shards
    from es_pipe.shard_writer import write_shards

    samples = [{"__key__": f"k{i}", "x": b"1"} for i in range(3)]
    (written,) = write_shards(samples, f"{tmp_path}/s-%d.tar", "tar", 3)
    os.replace(written, tmp_path / "s[0].tar")
    shard = f"{faulty_fs.url(tmp_path)}/s[0].tar"
    with installed(_keeps_failing(4)):
        listed = index_shards(shard, retry=PATIENT)
    assert listed.urls == (shard,) and listed.num_samples == (3,)
