"""A data split held as uint8 tensors on the training device, and its batches (normalised,
shuffled and augmented with an explicit generator)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from freezecache.config import Train
from freezecache.core.timing import section
from freezecache.training import augment, distributed

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
            with section("read + unpack"):
                x = self.images[idx]
            if train_aug is not None:
                # Crop in pixel space, so the padding is the image background (0), not the
                # normalised mean.
                with section("augment"):
                    x = augment.augment_images(
                        x.float(), crop_pad=train_aug.crop_pad, flip_p=train_aug.flip_p, g=aug_g
                    )
            with section("decode"):  # uint8 pixels to normalised floats
                x = augment.normalize(x, self.mean, self.std)
            yield x, self.labels[idx]

    def shard(self, rank: int, world: int) -> Images:
        """This rank's contiguous share of the split (views, no copy)."""
        if world == 1:
            return self
        part = distributed.share(len(self), rank, world)
        return Images(self.images[part], self.labels[part], self.mean, self.std)


@dataclass
class Features:
    """A split's features after a frozen prefix, computed once and held on the device in the
    batches :meth:`Images.batches` gives (so a model's suffix sees exactly what it would see
    after the prefix): per-epoch validation then runs only what trains."""

    parts: list[Batch]  # (features, labels) per batch, this rank's share
    total: int  # samples over every rank (what accuracy divides by)

    @classmethod
    def of(cls, images: Images, prefix, batch_size: int, shard: tuple[int, int], run) -> Features:
        """``run(prefix, x)``: the prefix's output for a batch (the caller's autocast, no grad)."""
        part = images.shard(*shard)
        return cls([(run(prefix, x), y) for x, y in part.batches(batch_size)], len(images))

    @staticmethod
    def nbytes(images: Images, shape: tuple[int, ...], element: int = 4) -> int:
        """What the features of ``images`` take, for a sample ``shape``."""
        n = 1
        for d in shape:
            n *= d
        return len(images) * n * element

    def __len__(self) -> int:
        return self.total

    def shard(self, rank: int, world: int) -> Features:
        return self  # already this rank's share

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return iter(self.parts)
