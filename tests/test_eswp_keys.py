"""The key book's epoch-end merge (what ESWP writes into every manifest's ``key`` column)
against a per-sample reference: this epoch's keys by ordinal, else the last known ones,
else null."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from es_pipe.eswp.keys import KeyBook
from es_pipe.scores import COLUMNS, ScoreStore, ShardCodes


def _store(sizes: dict[str, int]) -> ScoreStore:
    store = ScoreStore()
    for name, n in sizes.items():
        store.load_shard(name, {c: np.zeros(n, d) for c, d in COLUMNS.items()})
    return store


def test_merge_matches_a_per_sample_reference():
    gen = np.random.default_rng(3)
    sizes = {f"shard-{i:03d}": int(gen.integers(1, 300)) for i in range(40)}
    names = list(sizes)
    store = _store(sizes)
    book = KeyBook()
    known = {}  # keys restored from an earlier epoch for a few shards, some shorter
    for name in names[:10]:
        n = sizes[name] - int(gen.integers(0, 3))
        known[name] = [f"old-{name}-{j}" for j in range(n)]
        book.keys[name] = pa.array(known[name], pa.string())
    expected = {name: dict(enumerate(known.get(name, []))) for name in names}
    for _ in range(25):  # meta-batches, each from a few shards, ordinals in any order
        used = sorted(gen.choice(len(names), int(gen.integers(1, 6)), replace=False))
        m = int(gen.integers(1, 200))
        which = gen.choice(used, m)
        ordinals = np.array([gen.integers(0, sizes[names[w]]) for w in which], np.int64)
        keys = [f"k{gen.integers(10**9)}" for _ in range(m)]
        codes = np.searchsorted(used, which).astype(np.int64)
        book.record(ShardCodes([names[u] for u in used], codes), keys, ordinals)
        for w, o, k in zip(which, ordinals, keys, strict=True):
            expected[names[w]][int(o)] = k  # the later sighting wins
    merged = book.merge(store)
    for name in names:
        want = [expected[name].get(j) for j in range(sizes[name])]
        if name not in merged:  # never seen and never known: nothing to write
            assert all(k is None for k in want)
            continue
        assert merged[name].to_pylist() == want, name
