"""The fast selection path pinned to a straightforward reference of the same semantics.

The reference (:class:`Reference`) is ES written the plain way: a dict from
``(shard, ordinal)`` to ``[score, loss, visits, step]``, one Python step per sample, and
the draw as it was first written (float64 weights scaled to a maximum of 1 plus the
floor, Efraimidis-Spirakis keys, ``topk`` then ``sort``). ``Selector.select`` must make
the same selections, from the same RNG stream, and leave the same scores, over epochs
with their compactions, duplicates inside a meta-batch, unseen samples and short
meta-batches.
"""

import numpy as np
import pytest
import torch

import es_pipe
from es_pipe import sampling
from es_pipe.errors import FeedbackError
from es_pipe.sampler import Identity, check_losses
from es_pipe.scores import BYTES_PER_SAMPLE, ScoreStore, ShardCodes


class Reference:
    """ES (``Evolved(beta1, beta2)``, forward scoring, ``init="loss"``) on a dict."""

    def __init__(self, B: int, b: int, beta1: float = 0.2, beta2: float = 0.8, seed: int = 0):
        self.B, self.b, self.beta1, self.beta2, self.seed = B, b, beta1, beta2, seed
        self.state: dict[tuple[str, int], list] = {}
        self.step = 0

    def select(self, shards: list[str], ordinals: list[int], losses: torch.Tensor) -> list[int]:
        n = len(shards)
        k = self.b if n >= self.B else max(1, min(n, round(self.b * n / self.B)))
        prior = losses.clone()
        for i, key in enumerate(zip(shards, ordinals)):
            if key in self.state and self.state[key][2] > 0:
                prior[i] = self.state[key][0]
        weights = self.beta1 * prior + (1.0 - self.beta1) * losses
        w = weights.to(torch.float64)
        w = w / w.max() + 1e-12
        seed = sampling.step_seed(self.seed, self.step)
        u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        keys = u.clamp_min(1e-300).log() / w
        picked = keys.topk(k, sorted=False).indices.sort().values.tolist()
        score = self.beta2 * prior + (1.0 - self.beta2) * losses
        for i, key in enumerate(zip(shards, ordinals)):
            row = self.state.setdefault(key, [0.0, 0.0, 0, 0])
            row[0], row[1], row[2], row[3] = (
                float(score[i]),
                float(losses[i]),
                row[2] + 1,
                self.step,
            )
        self.step += 1
        return picked


def check_store(store: ScoreStore, reference: Reference) -> None:
    held = {}
    for name in store.shards:
        view = store.shard(name)
        for ordinal in range(len(view["score"])):
            if view["visits"][ordinal]:
                held[(name, ordinal)] = [
                    float(view[c][ordinal]) for c in ("score", "loss", "visits", "step")
                ]
    assert held == reference.state


def batches(rng: np.random.Generator, shards: int, per: int, B: int, count: int):
    """Meta-batches drawn from ``shards`` shards (some samples twice in one batch)."""
    for _ in range(count):
        shard = rng.integers(0, shards, B)
        ordinal = rng.integers(0, per, B)
        names = [f"s3://bucket/shard-{s:03d}.tar" for s in shard.tolist()]
        yield names, ordinal.tolist()


@pytest.mark.parametrize("B,b,shards,per", [(256, 128, 7, 60), (512, 100, 40, 500), (64, 64, 3, 9)])
def test_select_matches_the_reference_over_epochs_with_compaction(B, b, shards, per):
    rng = np.random.default_rng(B + shards)
    sampler = es_pipe.Selector(es_pipe.Evolved(), B, b, seed=3)
    reference = Reference(B, b, seed=3)
    duplicates = 0
    for epoch in range(3):
        for names, ordinals in batches(rng, shards, per, B, 6):
            if epoch == 2:  # a short final meta-batch
                names, ordinals = names[: B // 3], ordinals[: B // 3]
            duplicates += len(ordinals) - len(set(zip(names, ordinals)))
            losses = torch.rand(len(names), generator=torch.Generator().manual_seed(len(names)))
            losses = losses * 3 + torch.arange(len(names)) % 5
            got = sampler.select(Identity.of(names, [], ordinals), losses, len(names))
            assert got.indices.tolist() == reference.select(names, ordinals, losses)
        before = sampler.store.state_dict()
        sampler.end_epoch()
        after = sampler.store.state_dict()
        assert before.keys() == after.keys()
        for key, value in before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after[key]), key
            else:
                assert value == after[key], key
        assert sampler.store.nbytes == BYTES_PER_SAMPLE * sampler.store.held
        check_store(sampler.store, reference)
    assert duplicates > 0  # the batches did exercise repeated samples


def test_compaction_at_epoch_end_without_manifests_and_with_eswp_pruning():
    rule = es_pipe.Pruning(ratio=0.5, anneal=0)
    sampler = es_pipe.Selector(es_pipe.Evolved(), 128, 64, seed=1, eswp=es_pipe.ESWP(prune=rule))
    plain = es_pipe.Selector(es_pipe.Evolved(), 128, 64, seed=1)
    rng = np.random.default_rng(9)
    order = [f"shard-{i}" for i in range(5)]
    for _epoch in range(3):
        for start in range(0, 5 * 100, 128):  # shards read in parallel, in order
            index = np.arange(start, min(start + 128, 500))
            names = [order[i % 5] for i in index.tolist()]
            ordinals = (index // 5).tolist()
            losses = torch.from_numpy(rng.random(len(index)).astype(np.float32))
            who = Identity.of(names, [], ordinals)
            a = sampler.select(who, losses, len(index))
            b = plain.select(who, losses, len(index))
            assert torch.equal(a.indices, b.indices)
        for s in (sampler, plain):
            s.end_epoch()
            assert s.store.nbytes <= BYTES_PER_SAMPLE * s.store.held
        for name in order:
            for column, values in plain.store.shard(name).items():
                assert np.array_equal(sampler.store.shard(name)[column], values), column


def reference_drawn_weights(weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(torch.float64)
    w = torch.nan_to_num(w, nan=0.0, posinf=torch.finfo(torch.float64).max).clamp_min(0.0)
    top = w.max()
    w = torch.where(top > 0, w / top.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return w + sampling._FLOOR


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.rand(4096, generator=g),
        lambda g: torch.rand(300, generator=g, dtype=torch.float64) * 1e300,
        lambda g: torch.rand(100, generator=g).half(),
        lambda g: torch.zeros(50),
        lambda g: torch.tensor([0.0, 1e-310, 5e-320], dtype=torch.float64),  # subnormal max
        lambda g: torch.tensor([1.0, float("nan"), 2.0]),
        lambda g: torch.tensor([1.0, float("inf"), -3.0]),
        lambda g: torch.tensor([-1.0, -2.0]),
        lambda g: torch.tensor([-0.0, 3.0]),
    ],
)
def test_drawn_weights_are_bit_identical_to_the_reference(make):
    weights = make(torch.Generator().manual_seed(0))
    got = sampling._drawn_weights(weights)
    assert torch.equal(got, reference_drawn_weights(weights))
    assert got.data_ptr() != weights.data_ptr()  # never the caller's memory


def test_sorted_top_is_topk_sorted_also_on_ties():
    g = torch.Generator().manual_seed(0)
    for n, k in ((4096, 2048), (10, 1), (10, 10), (7, 3)):
        keys = torch.rand(n, generator=g, dtype=torch.float64)
        expected = keys.topk(k, sorted=False).indices.sort().values
        assert torch.equal(sampling.sorted_top(keys, k), expected)
    tied = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.5, 0.9], dtype=torch.float64)
    for k in range(1, 7):
        expected = tied.topk(k, sorted=False).indices.sort().values
        got = sampling.sorted_top(tied, k)
        assert torch.equal(got, expected), k
        assert len(set(got.tolist())) == k


def test_draw_without_replacement_matches_the_first_formulation():
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(1, 5000, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        weights = torch.rand(n, generator=g) * (trial % 3)  # all zero every third trial
        w = reference_drawn_weights(weights)
        u = torch.rand(n, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        expected = (u.clamp_min(1e-300).log() / w).topk(k, sorted=False).indices.sort().values
        got = sampling.draw(weights, k, torch.Generator().manual_seed(trial))
        assert torch.equal(got, expected)


def test_scatter_counts_every_occurrence_and_keeps_the_last_write():
    store = ScoreStore()
    slots = store.locate(["a", "b", "a", "a", "c"], ordinals=[1, 0, 1, 2, 1])
    first = store.rows(slots)["visits"]
    store.scatter(slots, np.arange(5, dtype=np.float32), np.arange(5, dtype=np.float32), 4, first)
    assert store.shard("a")["visits"].tolist() == [0, 2, 1]
    assert store.shard("a")["score"].tolist() == [0.0, 2.0, 3.0]
    assert store.shard("b")["visits"].tolist() == [1]
    again = store.locate(["a", "c", "b"], ordinals=[1, 1, 0])  # no duplicates
    store.scatter(again, np.ones(3, np.float32), np.ones(3, np.float32), 5)
    assert store.gather(again)["visits"].tolist() == [3, 2, 2]
    assert store.gather(again)["step"].tolist() == [5, 5, 5]


def test_locate_of_many_held_shards_and_a_new_one():
    store = ScoreStore()
    names = [f"s{i}" for i in range(50)]
    first = store.locate(names, ordinals=np.zeros(50, np.int64))
    again = store.locate(ShardCodes([*names, "new"], np.arange(51)), ordinals=np.zeros(51))
    assert np.array_equal(again[:50], first)
    assert again[50] not in set(first.tolist())
    assert store.locate(["s7"], ordinals=[0]).tolist() == [first[7]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_one_pass_loss_check_still_names_every_problem(dtype):
    fine = torch.tensor([0.0, 1.0, 2.5], dtype=dtype)
    assert check_losses(fine, 3, True) is not None
    assert check_losses(-fine, 3, False) is not None
    with pytest.raises(FeedbackError, match="1 of 3 losses are NaN or infinite"):
        check_losses(torch.tensor([0.0, float("nan"), 1.0], dtype=dtype), 3, False)
    with pytest.raises(FeedbackError, match="1 of 3 losses are NaN or infinite"):
        check_losses(torch.tensor([0.0, float("-inf"), 1.0], dtype=dtype), 3, False)
    with pytest.raises(FeedbackError, match="2 of 3 losses are negative"):
        check_losses(torch.tensor([-1.0, 1.0, -0.5], dtype=dtype), 3, True)
    if dtype == torch.float64:
        with pytest.raises(FeedbackError, match="exceed float32's range"):
            check_losses(torch.tensor([1e39, 1.0, 0.0], dtype=dtype), 3, False)
    assert len(check_losses(torch.zeros(0, dtype=dtype), 0, True)) == 0


def reference_book(decisions, shards: list[str], ordinals: np.ndarray, rescale: bool = True):
    """keep mask and weights the plain way: one Decision at a time."""
    keep = np.ones(len(shards), bool)
    weights = np.ones(len(shards), np.float32)
    for i, (name, ordinal) in enumerate(zip(shards, ordinals.tolist())):
        decision = decisions.get(name)
        if decision is not None:
            keep[i] = not decision.is_pruned(np.array([ordinal]))[0]
            weights[i] = decision.weights(np.array([ordinal]))[0]
    present = [decisions[n] for n in set(shards) if n in decisions]
    if not rescale or not any(d.factor != 1.0 for d in present):
        return keep, None
    return keep, weights


def test_flat_decision_table_follows_every_change_of_the_decisions():
    from es_pipe.eswp.book import EpochBook
    from es_pipe.eswp.rule import decide, from_state, keep_all, shard_seed

    rng = np.random.default_rng(11)
    rule = es_pipe.Pruning(ratio=0.4, anneal=0, max_streak=2)
    names = [f"shard-{i}" for i in range(30)]

    def decision(name: str, epoch: int):
        rows = int(rng.integers(1, 80))
        if epoch % 4 == 3:
            return keep_all(rows)
        scores = rng.random(rows)
        visits = (rng.random(rows) < 0.8).astype(np.uint32)
        made = decide(rule, scores, visits, None, shard_seed(0, epoch, name))
        return made if epoch % 2 else from_state(made.state, made.factor)

    book = EpochBook()
    for epoch in range(12):
        if epoch % 3 == 0:  # a new epoch: all decisions at once
            book.turn(epoch, {n: decision(n, epoch) for n in names[: 10 + epoch]})
        for _ in range(5):  # single decisions come and go (restores, fresh starts)
            name = names[int(rng.integers(0, 30))]
            if rng.random() < 0.3:
                book.decisions.pop(name, None)
            else:
                book.decisions[name] = decision(name, epoch)
        shards = [names[i] for i in rng.integers(0, 30, 700).tolist()]
        ordinals = rng.integers(0, 100, 700)
        who = ShardCodes.encode(shards)
        keep, weights = reference_book(dict(book.decisions), shards, ordinals)
        assert np.array_equal(book.keep_mask(who, ordinals), keep)
        got = book.weights(rule, who, ordinals)
        if weights is None:
            assert got is None
        else:
            assert got is not None and got.dtype == np.float32
            assert np.array_equal(got, weights)
    assert book.decisions.table.dead * 2 <= book.decisions.table.end  # space reclaimed
