"""A data split held as uint8 tensors on the training device, and its batches (normalised,
shuffled and augmented with an explicit generator)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from freezecache import augment, distributed
from freezecache.config import Train

Batch = tuple[Tensor, Tensor]


@dataclass
class Images:
    """A split held as uint8 tensors on the training device, with its normalization."""

    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)
    mean: Tensor  # (C,) in [0, 1] units
    std: Tensor

    @classmethod
    def from_split(cls, split, meta: dict, device: torch.device) -> Images:
        return cls(
            torch.from_numpy(split.images).to(device),
            torch.from_numpy(split.labels).long().to(device),
            torch.tensor(meta["mean"], dtype=torch.float32, device=device),
            torch.tensor(meta["std"], dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return self.labels.numel()

    def batches(
        self,
        batch_size: int,
        *,
        g: torch.Generator | None = None,
        train_aug: Train | None = None,
        shard: tuple[int, int] = (0, 1),
        aug_g: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """Normalized batches; shuffled and augmented when a generator is given.

        ``shard=(rank, world)``: this rank's share of every global batch of ``batch_size``
        (the order comes from ``g``, the same on every rank; augmentation draws from ``aug_g``,
        this rank's own, or ``g`` when not given)."""
        n = len(self)
        order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
        order = order.to(self.images.device)
        aug_g = aug_g or g
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if shard[1] > 1:
                idx = idx[distributed.share(idx.numel(), *shard)]
            x = self.images[idx]
            if train_aug is not None:
                # Crop in pixel space, so the padding is the image background (0), not the
                # normalised mean.
                x = augment.augment_images(
                    x.float(), crop_pad=train_aug.crop_pad, hflip=train_aug.hflip, g=aug_g
                )
            yield augment.normalize(x, self.mean, self.std), self.labels[idx]

    def shard(self, rank: int, world: int) -> Images:
        """This rank's contiguous share of the split (views, no copy)."""
        if world == 1:
            return self
        part = distributed.share(len(self), rank, world)
        return Images(self.images[part], self.labels[part], self.mean, self.std)
