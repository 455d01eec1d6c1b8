"""The training loader over a cache: whole chunks in a seeded order (the paper's coarse-grained
shuffling), shared among ranks, held in memory when it fits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Sampler

from freezecache.cache.format import CacheInfo
from freezecache.cache.reader import CacheDataset, collate_chunks
from freezecache.core.errors import FreezecacheError


class ChunkShuffleSampler(Sampler[int]):
    """Chunk order for one epoch: a permutation seeded by (seed, epoch); identity if not shuffle.

    Shuffling whole chunks (the paper's coarse-grained shuffling) keeps each read one blob.
    """

    def __init__(self, num_chunks: int, seed: int, shuffle: bool = True) -> None:
        self.num_chunks = num_chunks
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_chunks))
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.num_chunks).tolist())

    def __len__(self) -> int:
        return self.num_chunks


class ShardedChunkBatches(Sampler[list[int]]):
    """One rank's chunk batches: every global batch of ``chunks_per_batch`` chunks, taken from
    the epoch's permutation (the same on every rank), cut into contiguous shares that differ by
    at most one chunk; this rank yields its own share of each.

    Its length is the number of global steps (every rank steps together). Only the last global
    batch can be short; when it has fewer chunks than ranks, the last ranks' share of it is empty
    and not yielded (:attr:`empty_tail`): the training loop steps on an empty batch there.
    """

    def __init__(
        self, order: ChunkShuffleSampler, chunks_per_batch: int, rank: int, world: int
    ) -> None:
        if chunks_per_batch < world or order.num_chunks < world:
            raise FreezecacheError(
                f"{min(chunks_per_batch, order.num_chunks)} cache chunks per batch cannot be "
                f"shared by {world} processes — raise train.batch_size or lower cache.chunk_size"
            )
        self.order = order
        self.chunks_per_batch = chunks_per_batch
        self.rank = rank
        self.world = world

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        ids = list(self.order)
        for lo in range(0, len(ids), self.chunks_per_batch):
            group = ids[lo : lo + self.chunks_per_batch]
            mine = group[_share(len(group), self.rank, self.world)]
            if mine:
                yield mine

    @property
    def empty_tail(self) -> bool:
        """Whether this rank's share of the last global batch is empty."""
        tail = self.order.num_chunks % self.chunks_per_batch
        return 0 < tail <= self.rank

    def __len__(self) -> int:
        return math.ceil(self.order.num_chunks / self.chunks_per_batch)


def _share(n: int, rank: int, world: int) -> slice:
    """Contiguous shares differing by at most one, the larger to the lower ranks (as
    :func:`freezecache.training.distributed.share`, which store does not import)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch a loader from :func:`make_loader` yields next (one rank or several)."""
    sharded = isinstance(loader.batch_sampler, ShardedChunkBatches)
    (loader.batch_sampler if sharded else loader.sampler).set_epoch(epoch)


def set_seed(loader: DataLoader, seed: int) -> None:
    """Select the seed whose permutations a loader from :func:`make_loader` yields."""
    sharded = isinstance(loader.batch_sampler, ShardedChunkBatches)
    (loader.batch_sampler.order if sharded else loader.sampler).seed = seed


def empty_tail(loader: DataLoader) -> bool:
    """Whether this rank's share of the epoch's last global batch is empty (see
    :class:`ShardedChunkBatches`); False in one process."""
    sampler = loader.batch_sampler
    return isinstance(sampler, ShardedChunkBatches) and sampler.empty_tail


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def codes_bytes(info: CacheInfo) -> int:
    """What holding the cache's codes unpacked takes: a byte plane per byte of the widest code,
    for the features and the stored extras (the small per-chunk lo arrays aside)."""
    width = max(1, int(info.stats.get("max_code_bytes", 1)))
    extra = math.prod(info.extra_shape) if info.extra_shape is not None else 0
    return info.num_samples * width * (math.prod(info.sample_shape) + extra)


def fits_in_memory(info: CacheInfo, share: float = 0.25, nbytes: int | None = None) -> bool:
    """Whether the compressed cache (or ``nbytes``) takes at most ``share`` of the available
    memory. Where the available memory is unknown, up to 1 GB counts as fitting."""
    stored = int(info.stats.get("stored_bytes", 0)) if nbytes is None else nbytes
    available = _available_bytes()
    return stored <= (share * available if available is not None else 1e9)


def held_in_memory(
    info: CacheInfo,
    in_memory: bool | str,
    procs_per_host: int = 1,
    *,
    codes: bool = False,
) -> str | None:
    """What :func:`make_loader` holds in memory: "codes" (unpacked once, so that an epoch
    decompresses nothing), "compressed" (the blobs) or None (each batch reads the file).

    ``in_memory``: "codes", True (compressed), False, or "auto": the codes when ``codes`` is
    possible (device decode in the training process) and they fit in each of
    ``procs_per_host`` copies' part of a quarter of the available memory, else the compressed
    blobs when those fit, else None."""
    share = 0.25 / max(1, procs_per_host)
    if in_memory == "auto":
        if codes and fits_in_memory(info, share, codes_bytes(info)):
            return "codes"
        return "compressed" if fits_in_memory(info, share) else None
    if in_memory == "codes":
        return "codes" if codes else "compressed"
    return "compressed" if in_memory else None


def held_bytes(info: CacheInfo, held: str | None) -> int:
    """The bytes :func:`held_in_memory`'s choice keeps in memory."""
    if held == "codes":
        return codes_bytes(info)
    return int(info.stats.get("stored_bytes", 0)) if held else 0


def make_loader(
    path: Path,
    info: CacheInfo,
    *,
    batch_size: int,
    seed: int,
    workers: int,
    shuffle: bool = True,
    device_decode: bool = False,
    pin_memory: bool = False,
    in_memory: bool | str = False,
    shard: tuple[int, int] = (0, 1),
    procs_per_host: int = 1,
) -> DataLoader:
    """DataLoader over whole chunks; ``batch_size`` in samples (rounded down to chunks, >= 1).

    ``in_memory``: "codes", True, False or "auto" (:func:`held_in_memory`; the codes only with
    ``device_decode`` and no workers, whose batches would carry them). Call :func:`set_epoch`
    (one process: ``loader.sampler.set_epoch``) before each epoch.

    ``shard=(rank, world)``: with several processes each global batch is cut into per-rank
    shares of whole chunks (:class:`ShardedChunkBatches`); the loader yields this rank's.
    """
    chunks_per_batch = max(1, batch_size // info.chunk_size)
    held = held_in_memory(info, in_memory, procs_per_host, codes=device_decode and workers == 0)
    mode = {"codes": "codes", "compressed": True, None: False}[held]
    dataset = CacheDataset(path, info, device_decode=device_decode, in_memory=mode)
    order = ChunkShuffleSampler(info.num_chunks, seed, shuffle)
    common = {
        "num_workers": workers,
        "collate_fn": collate_chunks,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    if shard[1] > 1:
        batches = ShardedChunkBatches(order, chunks_per_batch, *shard)
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=chunks_per_batch, sampler=order, **common)
