"""The recommended preset: what the long benchmark measured is what users get."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchdata.nodes as tn

import es_pipe
from es_pipe.demo import harness


def _train(sampler: es_pipe.Selector, epochs: int) -> list[list[tuple[str, bool]]]:
    """Per epoch, (key, weighted) of every trained sample, from a real model's losses."""
    torch.manual_seed(0)
    samples = [
        {"x": torch.randn(8), "y": i % 2, "__key__": f"s{i}", "__shard__": "toy", "__index__": i}
        for i in range(600)
    ]
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = tn.Loader(es_pipe.SelectStage(samples, sampler))
    trained = []
    for _ in range(epochs):
        seen = []
        for meta in loader:
            batch = meta.select()
            assert len(batch) == len(meta)  # full batches: every optimizer step kept
            losses = F.cross_entropy(model(batch.data["x"]), batch.data["y"], reduction="none")
            batch.report(losses)
            weighted = batch.weights is not None and bool((batch.weights != 1).any())
            seen += [(key, weighted) for key in batch.keys]
            loss = losses.mean() if batch.weights is None else (losses * batch.weights).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.append(seen)
    return trained


def test_preset_prunes_learned_samples_and_trains_all_in_the_anneal():
    epochs = 10
    trained = _train(es_pipe.Selector.recommended(64, total_epochs=epochs, seed=3), epochs)
    sizes = [len(epoch) for epoch in trained]
    assert sizes[0] == 600  # burn-in: no scores yet
    assert max(sizes[1:-1]) < 600 and min(sizes[1:-1]) < 0.8 * 600, sizes  # pruned epochs
    assert sizes[-1] == 600  # the final anneal trains on everything
    assert any(weighted for _, weighted in trained[1])  # kept low scorers are up-weighted
    # max_streak=3: no sample skips more than 3 epochs in a row
    for start in range(1, epochs - 3):
        window = set().union(*({k for k, _ in trained[e]} for e in range(start, start + 4)))
        assert len(window) == 600, start


def test_preset_is_the_benchmarks_recommended_method():
    cfg = harness.RunConfig(epochs=6, batch_size=64, seed=5)
    benchmarked = harness.method(harness.RECOMMENDED).build(cfg)
    preset = es_pipe.Selector.recommended(64, total_epochs=6, seed=5)
    assert _train(benchmarked, 6) == _train(preset, 6)
