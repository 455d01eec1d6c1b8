"""Real ResNet-20 features for the coding benchmark: a short Fashion-MNIST training, then the
block outputs at the freeze points of the default profile (blocks 3 and 6).

The features are kept in ``data/bench_coding/`` (git-ignored) keyed by the settings, so a second
run of the benchmark does not train again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from freezecache import data
from freezecache.models import create_model, split
from freezecache.training import augment

log = logging.getLogger("bench_coding")


def _train(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """ResNet-20 trained ``epochs`` epochs with the default profile's SGD settings."""
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        total = 0.0
        for lo in range(0, len(order), 64):
            idx = order[lo : lo + 64]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        log.info("epoch %d: train loss %.3f", epoch + 1, total / len(order))
    return model.eval()


@torch.no_grad()
def _block_outputs(model: nn.Module, x: torch.Tensor, blocks: tuple[int, ...]) -> list[np.ndarray]:
    """Outputs of the prefixes ending at ``blocks`` for inputs ``x`` (eval mode)."""
    out = []
    for b in blocks:
        prefix, _ = split(model, b)
        out.append(torch.cat([prefix(x[lo : lo + 500]) for lo in range(0, len(x), 500)]).numpy())
    return out


def real_features(
    *,
    train_size: int = 12000,
    samples: int = 4096,
    epochs: int = 2,
    seed: int = 0,
    blocks: tuple[int, ...] = (3, 6),
    folder: Path = Path("data/bench_coding"),
) -> dict[int, np.ndarray]:
    """Block -> float32 features (samples, C, H, W) of the first ``samples`` training images."""
    name = f"resnet20_fmnist_n{train_size}_e{epochs}_s{seed}_{samples}.npz"
    path = folder / name
    if path.is_file():
        with np.load(path) as npz:
            return {b: npz[f"block{b}"] for b in blocks}
    train, _, _ = data.load_source("fashion_mnist", None)
    train = data.stratified_subset(train, train_size, seed)
    mean, std = data._channel_stats(train.images)  # the prepare step's normalisation
    x = augment.normalize(torch.from_numpy(train.images), torch.tensor(mean), torch.tensor(std))
    model = _train(x, torch.from_numpy(train.labels).long(), epochs, seed)
    feats = _block_outputs(model, x[:samples], blocks)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"block{b}": f for b, f in zip(blocks, feats, strict=True)})
    return dict(zip(blocks, feats, strict=True))
