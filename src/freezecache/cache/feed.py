"""Training batches from a cache: read, decode and augment, each epoch in its seeded order.

The loader gives batches whose codes are still packed; the feed decodes and augments them on
the training device. Where that device is the CPU and numba is there, one fused pass
(:mod:`freezecache.cache.fused`) does both for NCHW maps; elsewhere (a GPU, NHWC maps, tokens,
blur) the codes travel to the device and torch decodes and augments there. Both compute the
same values from the same draws, bit for bit (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from freezecache.cache import fused
from freezecache.cache.format import CacheInfo
from freezecache.cache.loader import empty_tail, set_epoch
from freezecache.cache.packed import steps
from freezecache.cache.reader import CacheDataset, decode_packed, finish_batch
from freezecache.core.timing import section
from freezecache.training.augment import FeatureAug, NoiseBank, augment_features

STD_SAMPLES = 512  # cached samples whose spread sets the noise scale


def feature_std(path, info: CacheInfo, samples: int = STD_SAMPLES) -> float:
    """The standard deviation of the first ``samples`` cached features (float64), what
    ``augment.noise_std`` is relative to: measured once, so every batch gets the same noise."""
    data = CacheDataset(path, info)
    chunks = math.ceil(min(samples, info.num_samples) / info.chunk_size)
    x = torch.cat([data.build(*r)["x"] for r in data.read(list(range(chunks)))])
    return float(x.double().std())


class Feed:
    """Per-epoch (features, labels) batches from a cache ``loader`` (:func:`make_loader`),
    augmented by ``aug`` with noise from ``bank`` on ``device``. Without a loader it only
    decodes and augments the batches it is given (:meth:`augmented`; ``packed``: their codes
    are still packed, as a ``device_decode`` loader gives them; ``fuse`` False: never the
    fused CPU pass, whose threads must not run in a process forked from one that ran them)."""

    def __init__(
        self,
        loader,
        info: CacheInfo,
        aug: FeatureAug,
        bank: NoiseBank | None,
        device,
        packed: bool | None = None,
        fuse: bool = True,
    ):
        self.loader = loader
        self.info = info
        self.aug = aug
        self.bank = bank
        self.device = torch.device(device)
        self.numel = math.prod(info.sample_shape)
        self._where = None
        if info.extra_index:
            self._where = torch.tensor(info.extra_index, dtype=torch.long, device=self.device)
        codec = info.codec()
        self._fused = (
            fuse
            and self.device.type == "cpu"
            and aug.layout == "nchw"
            and aug.mode != "none"
            and aug.blur_p == 0
            and (loader.dataset.device_decode if packed is None else packed)
            and fused.available()
        )
        if self._fused:
            self._step = steps(codec, info.sample_shape)
            channels = list(info.extra_index) or None
            self._extra_step = (
                steps(codec, info.extra_shape, channels) if info.extra_shape else None
            )
            self._bank_np = None if bank is None else bank.values.numpy()
            self._channels = np.asarray(info.extra_index or [], np.int64)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def fused(self) -> bool:
        """Whether batches are decoded and augmented in one pass on the CPU."""
        return self._fused

    def epoch(self, epoch: int, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch``, augmented with draws from ``g``."""
        set_epoch(self.loader, epoch)
        x = y = None
        batches = iter(self.loader)
        while True:
            with section("read + unpack"):
                batch = next(batches, None)
            if batch is None:
                break
            x, y = self.augmented(batch, g), batch["y"].to(self.device, non_blocking=True)
            yield x, y
        if empty_tail(self.loader) and x is not None:
            yield x[:0], y[:0]  # this rank's share of the last global batch is empty: step anyway

    def augmented(self, batch: dict, g: torch.Generator | None) -> Tensor:
        """One batch's features, decoded and augmented (``g`` None: torch's global generator)."""
        b = len(batch["y"])
        if self.aug.mode == "none":
            with section("decode"):
                return self._decoded(batch)
        draws = self.aug.draw(b, g, self.bank, self.numel)
        if self._fused:
            with section("decode + augment (fused)"):
                return self._fused_pass(batch, draws)
        with section("decode"):
            done = finish_batch(batch, self.info, self.device)
        where = done["extra_pos"] if "extra_pos" in done else self._where
        with section("augment"):
            return augment_features(
                done["x"], self.aug, draws, self.bank, extra=done.get("extra"), where=where
            )

    def _fused_pass(self, batch: dict, draws) -> Tensor:
        extra = batch.get("extra") if self.aug.mode == "similarity" else None
        out = fused.decode_augment(
            batch["x"], extra, self.info.sample_shape, self._step, self._extra_step,
            self._channels, draws, self.aug.crop_pad, self._bank_np, self.aug.noise_scale,
        )  # fmt: skip
        return torch.from_numpy(out)

    def _decoded(self, batch: dict) -> Tensor:
        x = batch["x"]
        if isinstance(x, dict):
            return decode_packed(x, self.info, "x", self.device)
        return x.to(self.device, non_blocking=True)

    def clean(self) -> Iterator[Tensor]:
        """Every batch of the cache (epoch 0's order, whatever epoch ran last: the same batches
        on a resumed run), decoded, not augmented."""
        set_epoch(self.loader, 0)
        for batch in self.loader:
            yield self._decoded(batch)
