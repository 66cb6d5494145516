"""A real (small) model trained end to end through the stage, ES against uniform."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchdata.nodes as tn
from sklearn.datasets import load_digits

import es_pipe

EPOCHS, B, b = 12, 64, 16


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order])
    train = [
        {"x": x[i], "y": y[i], "__key__": f"d{i}", "__shard__": "digits", "__index__": i}
        for i in range(1400)
    ]
    return train, x[1400:], y[1400:]


def fit(train, test_x, test_y, sampler, through):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    if through == "node":
        loader = tn.Loader(es_pipe.SelectStage(tn.IterableWrapper(train), sampler))
    else:
        loader = tn.Loader(es_pipe.SelectStage(train, sampler))
    forwarded = trained = 0
    for _ in range(EPOCHS):
        for meta in loader:
            losses = None
            if meta.needs_losses:
                with torch.no_grad():
                    losses = F.cross_entropy(
                        model(meta.data["x"]), meta.data["y"], reduction="none"
                    )
                forwarded += len(meta)
            sub = meta.select(losses)
            loss = F.cross_entropy(model(sub.data["x"]), sub.data["y"], reduction="none")
            if sub.weights is not None:
                loss = loss * sub.weights
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            trained += len(sub)
    accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return accuracy, forwarded, trained


@pytest.mark.parametrize("through", ["node", "iterable"])
def test_es_trains_on_b_over_B_and_reaches_accuracy(digits, through):
    train, test_x, test_y = digits
    es = es_pipe.Selector(
        es_pipe.Evolved(beta1=0.2, beta2=0.8), B, b, burn_in=es_pipe.Epochs(1), seed=0
    )
    es_acc, forwarded, trained = fit(train, test_x, test_y, es, through)
    full_batches, rest = divmod(len(train), B)  # the short final meta-batch trains pro rata
    per_epoch = full_batches * b + round(b * rest / B)
    assert trained == EPOCHS * per_epoch
    assert trained / forwarded == pytest.approx(b / B, rel=0.01)
    assert es_acc >= 0.92

    uniform = es_pipe.Selector(es_pipe.Uniform(), meta_batch_size=b, batch_size=b, seed=0)
    uni_acc, _, uni_trained = fit(train, test_x, test_y, uniform, through)
    assert uni_trained == EPOCHS * len(train)
    assert trained < 0.3 * uni_trained
    assert uni_acc >= 0.92
