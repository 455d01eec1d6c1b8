"""A cache as a torch ``Dataset`` of augmented features: what the discard methods train from,
for any training loop.

:class:`CachedFeatures` is the one reader of a cache for training. The pipeline's train_suffix
stage iterates :meth:`CachedFeatures.batches` (whole chunks in a seeded order, decoded and
augmented on the training device, or in one fused pass on the CPU: :mod:`freezecache.cache.feed`);
a user's loop can do the same, or index it like any map-style dataset (``DataLoader`` with
workers, ``DistributedSampler``), which decodes and augments each requested batch of samples in
the same way, with draws from torch's global generator (seeded per worker by the DataLoader).
:func:`features_for` resolves the pipeline's params into its arguments.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, get_worker_info

from freezecache.cache.feed import Feed, feature_std
from freezecache.cache.format import CacheInfo, open_cache
from freezecache.cache.loader import held_in_memory, make_loader, set_seed
from freezecache.cache.reader import CacheDataset, collate_chunks
from freezecache.codecs.quant import QuantCodec
from freezecache.config import Config
from freezecache.core import runtime
from freezecache.core.methods import method
from freezecache.models import prefix_digest
from freezecache.training import augment, distributed

API_HINT = "build it with freezecache.build_cache(prefix, data, path)"


class CachedFeatures(Dataset):
    """A cache built by :func:`freezecache.build_cache` (or the pipeline's cache stage) as a
    map-style torch ``Dataset`` of ``(features, label)``, augmented in feature space.

    ``flip_p`` mirrors a sample's maps along W with that probability; where the cache stores the
    flip-sensitive channels (``flip_channels`` of the build) or tokens, a flipped sample gets the
    stored F(flip(x)) ones in their place (``repair``, the paper's "Discard & Aug."). ``crop_pad``
    is a random crop with that much zero padding, in feature-map pixels; ``noise_std`` adds
    Gaussian noise of that fraction of the cached features' standard deviation (measured once).
    Nothing is augmented when all three are 0. ``prefix``: check that the cache was built from
    this frozen prefix (same weights). ``device``: where :meth:`batches` decodes and augments
    (items are always CPU tensors, for DataLoader workers and ``pin_memory``). ``in_memory``:
    hold the cache in host memory ("auto": when it fits), else read the file.

    Two ways to read it, the same augmentation either way:

    - ``features[i]`` / a ``DataLoader`` (any sampler, ``num_workers`` >= 0): each requested
      batch of samples is decoded and augmented at once (``__getitems__``), with draws from
      torch's global generator;
    - :meth:`batches`: the pipeline's own epoch, whole chunks in a seeded order, decoded on
      ``device``, with draws from ``seed`` and ``epoch`` (reproducible, sharded under torchrun).

    Example::

        features = freezecache.CachedFeatures("cache.h5", flip_p=0.5, crop_pad=1)
        loader = DataLoader(features, batch_size=64, shuffle=True, num_workers=2)
        for x, y in loader:
            loss = F.cross_entropy(suffix(x), y)
    """

    def __init__(
        self,
        path: str | Path | CacheInfo,
        *,
        flip_p: float = 0.0,
        crop_pad: int = 0,
        noise_std: float = 0.0,
        repair: bool = True,
        blur_p: float = 0.0,
        blur_sigma: float = 0.5,
        device: torch.device | str | None = None,
        in_memory: bool | str = "auto",
        prefix: nn.Module | None = None,
        layout: str | None = None,
        seed: int = 0,
        workers: int = 0,
        device_decode: bool = True,
    ) -> None:
        for name, p in (("flip_p", flip_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise _error(f"{name}={p!r} is not a probability — use 0 <= {name} <= 1")
        if crop_pad < 0 or noise_std < 0:
            raise _error(f"crop_pad={crop_pad!r}, noise_std={noise_std!r} — use values >= 0")
        if isinstance(path, CacheInfo):
            self.info = path
        else:
            expect = None if prefix is None else prefix_digest(prefix)
            self.info = open_cache(Path(path), expect_prefix_hash=expect, hint=API_HINT)
        info = self.info
        self.path = Path(info.path)
        self.layout = layout or info.meta.get("layout") or _layout_of(info.sample_shape)
        on = flip_p > 0 or crop_pad > 0 or noise_std > 0 or blur_p > 0
        mode = "none" if not on else ("similarity" if repair else "standard")
        scale = noise_std * feature_std(self.path, info) if on and noise_std > 0 else 0.0
        self.aug = augment.FeatureAug(
            mode=mode, flip_p=flip_p, crop_pad=crop_pad, noise_scale=scale, blur_p=blur_p,
            blur_sigma=blur_sigma, layout=self.layout,
        )  # fmt: skip
        self.device = torch.device(device or "cpu")
        self.seed = seed
        self.workers = workers
        self.in_memory = in_memory
        self.packed = device_decode and isinstance(info.codec(), QuantCodec)
        self._feeds: dict[int, Feed] = {}
        self._items: tuple[int, CacheDataset, Feed] | None = None

    # -- the pipeline's epoch ---------------------------------------------------------------------
    def feed(self, batch_size: int) -> Feed:
        """The batch path for ``batch_size``: a loader of whole chunks and its decode (built
        once per batch size)."""
        if batch_size not in self._feeds:
            loader = make_loader(
                self.path,
                self.info,
                batch_size=batch_size,
                seed=self.seed,
                workers=self.workers,
                device_decode=self.packed,
                pin_memory=self.device.type == "cuda",
                in_memory=self.in_memory,
                shard=(distributed.rank(), distributed.world_size()),
                procs_per_host=distributed.local_world_size(),
            )
            bank = self._bank(self.device)
            self._feeds[batch_size] = Feed(loader, self.info, self.aug, bank, self.device)
        return self._feeds[batch_size]

    def batches(
        self, batch_size: int, *, seed: int | None = None, epoch: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of ``(features, labels)`` batches on ``device``: whole chunks of about
        ``batch_size`` samples in the order of ``seed`` (default: the constructor's) and
        ``epoch``, augmented with draws from them; under torchrun, this rank's share of each
        global batch. The pipeline's train_suffix stage trains from exactly these.

        Example::

            for epoch in range(3):
                for x, y in features.batches(64, seed=0, epoch=epoch):
                    ...
        """
        feed = self.feed(batch_size)
        seed = self.seed if seed is None else seed
        set_seed(feed.loader, seed)
        return feed.epoch(epoch, runtime.generator(*distributed.stream(seed, epoch, "features")))

    def num_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields per epoch."""
        return len(self.feed(batch_size))

    def _bank(self, device: torch.device) -> augment.NoiseBank | None:
        """The noise table, the same on every device and in every worker (from ``seed``)."""
        if self.aug.noise_scale <= 0:
            return None
        g = runtime.generator(self.seed, "noise bank")
        return augment.NoiseBank(math.prod(self.info.sample_shape), g, device)

    # -- a map-style dataset ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.info.num_samples

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, ids: list[int]) -> list[tuple[Tensor, int]]:
        """Samples ``ids`` (a DataLoader's batch), decoded and augmented together on the CPU."""
        ids = [int(i) for i in ids]
        n, k = self.info.num_samples, self.info.chunk_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise IndexError(f"sample {bad[0]} is outside cache {self.path} ({n} samples)")
        data, feed = self._item_path()
        chunks = list(dict.fromkeys(i // k for i in ids))  # in first-seen order, once each
        batch = collate_chunks(data.__getitems__(chunks))
        x = feed.augmented(batch, None)  # draws from torch's global generator
        row = {s: r for r, s in enumerate(batch["index"].tolist())}
        labels = batch["y"].tolist()
        return [(x[row[i]], labels[row[i]]) for i in ids]

    def _item_path(self) -> tuple[CacheDataset, Feed]:
        """The chunks' reader and their decode on the CPU, built on first use in each process.

        In a DataLoader worker the decode goes through torch, not the fused numba pass: the
        workers are forked, and numba's OpenMP threads abort a child forked from a process that
        ran them. Both give the same values (tests/test_fused.py)."""
        if self._items is None or self._items[0] != os.getpid():
            held = held_in_memory(self.info, self.in_memory, codes=self.packed)
            mode = {"codes": "codes", "compressed": True, None: False}[held]
            data = CacheDataset(self.path, self.info, device_decode=self.packed, in_memory=mode)
            cpu = torch.device("cpu")
            fuse = get_worker_info() is None
            feed = Feed(None, self.info, self.aug, self._bank(cpu), cpu, self.packed, fuse)
            self._items = (os.getpid(), data, feed)
        return self._items[1:]

    def __getstate__(self) -> dict:
        # Loaders (and their worker processes) stay in the process that made them.
        return {**self.__dict__, "_feeds": {}}

    def __repr__(self) -> str:
        a = self.aug
        return (
            f"CachedFeatures({str(self.path)!r}: {len(self)} samples of {self.info.sample_shape}"
            f" {self.layout}, flip_p={a.flip_p}, crop_pad={a.crop_pad}, "
            f"noise_scale={a.noise_scale:.3g}, {a.mode})"
        )


def _layout_of(sample_shape: tuple[int, ...]) -> str:
    """A cache's layout from its sample shape when it does not record one: maps (C, H, W) are
    taken as NCHW, (N, D) as tokens (an NHWC cache must say ``layout="nhwc"``)."""
    return "tokens" if len(sample_shape) == 2 else "nchw"


def _error(text: str):
    from freezecache.core.errors import FreezecacheError

    return FreezecacheError(f"CachedFeatures: {text}")


def features_for(
    cfg: Config,
    cache: Path | CacheInfo,
    name: str,
    *,
    layout: str,
    img_size: int,
    device: torch.device,
    seed: int,
) -> CachedFeatures:
    """The cache of discard method ``name`` read as the pipeline's params say: the ``loader``
    params, ``train.flip_p`` and the ``augment`` params resolved for the cached features (crop
    padding scaled from input pixels to their resolution, noise relative to their spread), no
    augmentation for a method without any, flip repair for one that stores flipped channels."""
    info = cache if isinstance(cache, CacheInfo) else open_cache(cache)
    mode, a = method(name).augment, cfg.augment
    on = mode != "none"
    width = augment.map_width(info.sample_shape, layout)
    return CachedFeatures(
        info,
        flip_p=cfg.train.flip_p if on else 0.0,
        crop_pad=augment.scaled_pad(a.crop_pad, width, img_size) if on else 0,
        noise_std=a.noise_std if on else 0.0,
        repair=mode == "similarity",
        blur_p=a.blur_p if on else 0.0,
        blur_sigma=a.blur_sigma,
        device=device,
        in_memory=cfg.loader.in_memory,
        layout=layout,
        seed=seed,
        workers=cfg.loader.workers,
        device_decode=cfg.loader.device_decode,
    )
