"""Train a Lightning ``LightningModule`` with the Evolved Sampling stage, checkpointing and
resuming through Lightning's own checkpoint.

Three things make the stage a Lightning citizen:

* **The loader.** ``train_dataloader()`` returns the stage wrapped in :class:`EpochLoader`
  (one ``iter()`` per epoch).
* **The checkpoint.** A ``Callback``'s ``state_dict``/``load_state_dict``
  (:class:`StageCheckpoint`) carries the sampler's score table and the stage's position
  (source cursors, sampler step, RNG, epoch), saved together, in Lightning's own
  checkpoint; ``Trainer.fit(ckpt_path=...)`` restores them before the first batch. Not
  Lightning's stateful-loader path: it restores a loader only for a checkpoint taken
  inside an epoch, while the score table must come back for every checkpoint.
* **The feedback channel.** Lightning fetches one batch ahead of ``training_step`` (to know
  which batch is the last); the stage refuses to emit a meta-batch before the one before it
  is answered, since its selection must see the current scores. So ``training_step`` takes
  Lightning's ``dataloader_iter`` and asks for the meta-batch itself: no look-ahead.
  ``meta.to(self.device)`` moves it (``MetaBatch``/``SubBatch`` have ``.to``, so
  Lightning's ``move_data_to_device`` and ``strategy.batch_to_device`` move them too).

Run:  python examples/lightning_es.py [--samples 512 --epochs 3 --every 5]
It trains with a ``ModelCheckpoint`` every few steps, then resumes from each checkpoint
in a fresh ``Trainer`` and checks that the resumed run trains on exactly the samples, and
ends with exactly the weights, of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import es_pipe


def make_samples(n: int, dim: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """A 4-class toy problem; the identity fields stand in for a shard reader's."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, dim, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n, dim, generator=g)
    return [
        {"x": x[i], "y": int(y[i]), "__key__": f"{i:06d}", "__shard__": "toy", "__index__": i}
        for i in range(n)
    ]


class EpochLoader:
    """The stage as the iterable Lightning expects: one ``iter()`` per epoch, and no
    look-ahead. Its state travels in Lightning's checkpoint through :class:`StageCheckpoint`
    (the callback restores it before Lightning builds its loaders), not as a stateful
    loader: Lightning restores a loader's state only for a checkpoint taken inside an epoch.

    Two details keep Lightning's epochs the stage's epochs:

    * Lightning calls ``iter()`` twice before training (once to check the loader): an
      ``iter()`` before anything was handed out since the last one is the same iteration.
    * A checkpoint taken after an epoch's last step, before Lightning asked for the batch
      that ends it, restores a stage with nothing left in that epoch; the stage then goes on
      into the next one. Lightning resumes that epoch, so its iterator ends at once, and the
      next epoch's first meta-batch, met on the way, opens Lightning's next epoch."""

    def __init__(self, stage: es_pipe.SelectStage) -> None:
        self.stage = stage
        self._pending: dict[str, Any] | None = None  # a stage state to resume from
        self._early: Any = None  # the next epoch's first meta-batch, met while resuming
        self._first: Any = None  # this epoch's first meta-batch, met while resuming
        self._ended = False  # this iteration has nothing left
        self._fresh = False  # started, and nothing handed out since

    def __iter__(self) -> EpochLoader:
        if self._fresh:
            return self
        self._fresh, self._first, self._ended = True, None, False
        if self._early is not None:  # the stage is in this epoch already
            self._first, self._early = self._early, None
            return self
        state, self._pending = self._pending, None
        self.stage.reset(state)
        if state is not None and not state["done"]:  # resumed inside an epoch (Lightning's)
            was = state["sampler"]["epoch"]
            try:
                first = next(self.stage)
            except StopIteration:
                self._ended = True
                return self
            if self.stage.sampler.epoch != was:  # nothing was left of the restored epoch
                self._early, self._ended = first, True
            else:
                self._first = first
        return self

    def __next__(self) -> Any:
        self._fresh = False
        if self._ended:
            raise StopIteration
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self.stage)

    def save(self) -> dict[str, Any]:
        """The stage's state: the source's position, the sampler's step, RNG and epoch."""
        return self.stage.state_dict()

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from ``save()``'s state at the next ``iter()``."""
        self._pending, self._early, self._fresh = state, None, False


class StageCheckpoint(L.Callback):
    """Carries the stage in Lightning's checkpoint: the sampler's score table and the
    stage's position (source cursors, sampler step, RNG, epoch), saved together and
    restored together, at any step or epoch end."""

    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.loader.stage.sampler.state_dict(), "stage": self.loader.save()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loader.stage.sampler.load_state_dict(state_dict["scores"])
        self.loader.restore(state_dict["stage"])


class ESModule(L.LightningModule):
    """A classifier trained on the sub-batches the stage selects (history scoring: the
    training losses are the feedback, no extra forward pass)."""

    def __init__(self, samples: list[dict[str, Any]], sampler: es_pipe.Selector) -> None:
        super().__init__()
        dim = samples[0]["x"].numel()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 4))
        self.loader = EpochLoader(es_pipe.SelectStage(samples, sampler))
        self.trained: list[tuple[int, int, list[str]]] = []  # (epoch, step, keys) per step

    def train_dataloader(self) -> EpochLoader:
        return self.loader

    def training_step(self, dataloader_iter: Iterator[Any]) -> torch.Tensor:
        meta, _, _ = next(dataloader_iter)  # StopIteration ends Lightning's epoch
        batch = meta.to(self.device).select()
        losses = F.cross_entropy(self.net(batch.data["x"]), batch.data["y"], reduction="none")
        batch.report(losses.detach())  # the feedback channel
        self.trained.append((self.current_epoch, batch.step, batch.keys))
        if batch.weights is not None:  # ESWP's 1/keep weights of kept low-score samples
            return (losses * batch.weights).mean()
        return losses.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.05)


def fit(
    samples: list[dict[str, Any]],
    *,
    epochs: int,
    root: Path,
    every: int = 0,
    every_epoch: bool = False,
    ckpt_path: str | None = None,
) -> tuple[ESModule, L.Trainer]:
    """One ``Trainer.fit`` on fresh objects (as a new process builds them), saving a
    Lightning checkpoint every ``every`` steps (0: none) or at every epoch's end."""
    L.seed_everything(0, verbose=False)
    sampler = es_pipe.Selector.recommended(32, total_epochs=epochs, seed=0)
    module = ESModule(samples, sampler)
    callbacks: list[L.Callback] = [StageCheckpoint(module.loader)]
    if every or every_epoch:
        when = {"every_n_epochs": 1} if every_epoch else {"every_n_train_steps": every}
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=root, filename="{step}", save_top_k=-1, **when
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=bool(every or every_epoch),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    args = parser.parse_args()
    samples = make_samples(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        whole, trainer = fit(samples, epochs=args.epochs, root=root, every=args.every)
        steps = trainer.global_step
        print(f"trained {steps} steps over {args.epochs} epochs, a checkpoint every {args.every}")
        for ckpt in sorted(root.glob("step=*.ckpt"), key=lambda p: int(p.stem[5:])):
            at = int(ckpt.stem[5:])
            rest, trainer = fit(
                samples, epochs=args.epochs, root=root / "resumed", ckpt_path=str(ckpt)
            )
            same = rest.trained == whole.trained[at:] and all(
                torch.equal(a, b)
                for a, b in zip(whole.state_dict().values(), rest.state_dict().values())
            )
            print(f"resumed from {ckpt.name}: {trainer.global_step} steps; identical run: {same}")
            if not same:
                raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
