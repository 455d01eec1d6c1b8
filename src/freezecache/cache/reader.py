"""Reading a cache: items of whole chunks, decoded on the CPU or left packed for the training
device, and batches finished on the device.

Every blob is checked against its crc when it is read (or all at once when the cache is held
in memory).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from freezecache.cache.format import INDEX_DATASETS, CacheInfo, check_index, corrupt
from freezecache.cache.packed import decode, gather, nbytes, pack, steps, unpack_chunks
from freezecache.codecs.quant import QuantCodec
from freezecache.core.errors import FreezecacheError


class CacheDataset(Dataset):
    """Item i is chunk i: ``x`` (k, *sample_shape) float32, ``y`` and ``index`` (k,) int64,
    plus ``extra`` / ``extra_pos`` when the cache has them.

    With ``device_decode=True`` (quant only) a whole batch of chunks is one item whose ``x``
    (and ``extra``) keep their codes packed (:meth:`packed_batch`): a byte per value travels to
    the training device, where :func:`finish_batch` dequantizes, or the fused CPU pass decodes
    and augments at once (:mod:`freezecache.cache.fused`).

    With ``in_memory=True`` the compressed bytes of the whole cache are read once, every crc is
    checked once, and an item is a slice of memory instead of an HDF5 read. The compressed cache
    is what is held (a fraction of the float32 features), in host memory, never on the device.
    """

    def __init__(
        self,
        path: Path,
        info: CacheInfo,
        *,
        device_decode: bool = False,
        in_memory: bool | str = False,
    ) -> None:
        self.path = Path(path)
        self.info = info
        self.codec = info.codec()
        if device_decode and not isinstance(self.codec, QuantCodec):
            raise FreezecacheError(
                f"cache {info.path}: device_decode needs the quant codec, not "
                f"{info.codec_name} — set device_decode false"
            )
        self.device_decode = device_decode
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._fd: int | None = None  # the file opened again for pread (see _h5)
        self._at: dict[str, int] = {}  # blob dataset -> its bytes' offset in the file
        self._small: dict[str, np.ndarray] = {}
        self._memory: dict[str, np.ndarray] | None = None
        self._codes: dict[str, dict] | None = None  # in_memory "codes": unpacked once
        if in_memory == "codes" and device_decode:
            self._codes = self._unpack_all()
        elif in_memory:
            self._memory = self._load_all()

    def __len__(self) -> int:
        return self.info.num_chunks

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a process boundary; each worker reopens. The
        # in-memory bytes travel (forked workers share their pages).
        return {**self.__dict__, "_file": None, "_pid": None, "_fd": None, "_at": {}, "_small": {}}

    def __del__(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        if getattr(self, "_fd", None) is not None:  # forked children hold their own copy
            os.close(self._fd)
        self._fd = None

    def _h5(self) -> h5py.File:
        """The file, opened lazily once per process (never before DataLoader workers fork).

        Labels, offsets, crcs and token positions are small: they are read into memory here
        once, so that an item costs one read per blob. The blob datasets are contiguous (the
        writer reserves them), so a blob is one ``os.pread`` at the dataset's file offset,
        about a tenth of an h5py slice read; a dataset HDF5 stores otherwise is sliced.
        """
        if self._file is None or self._pid != os.getpid():
            self._close_fd()
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            f = self._file
            self._small = {name: f[name][()] for name in INDEX_DATASETS if name in f}
            self._at = {}
            for name in ("x", "extra"):
                if name in f and f[name].chunks is None and f[name].id.get_offset() is not None:
                    self._at[name] = int(f[name].id.get_offset())
            self._fd = os.open(self.path, os.O_RDONLY) if self._at else None
            if self.info.digests:  # the file may have changed since open_cache checked it
                check_index(self._small, self.info)
        return self._file

    def _load_all(self) -> dict[str, np.ndarray]:
        """Every blob byte of the cache, crc-checked once, then the file closed."""
        f = self._h5()
        names = ("x", "extra") if self.info.extra_shape is not None else ("x",)
        memory = {name: f[name][()] for name in names}
        for name, data in memory.items():
            offsets, crcs = self._index(name)
            view = memoryview(data)
            for i in range(self.info.num_chunks):
                if zlib.crc32(view[offsets[i] : offsets[i + 1]]) != int(crcs[i]):
                    raise corrupt(self.path, name, i)
        f.close()
        self._close_fd()
        self._file = None
        return memory

    def _unpack_all(self) -> dict[str, dict]:
        """Every chunk's codes, after the lossless stage, held in memory (a byte per value for
        most caches: about a quarter of float32, two to three times the compressed bytes), so
        that an epoch decompresses nothing (:func:`freezecache.cache.packed.unpack_chunks`)."""
        memory = self._load_all()
        info, out = self.info, {}
        sizes = [stop - start for start, stop in map(info.chunk_bounds, range(info.num_chunks))]
        for name, data in memory.items():
            shape = info.sample_shape if name == "x" else info.extra_shape
            offsets, _ = self._index(name)
            view = memoryview(data)
            blobs = [view[offsets[i] : offsets[i + 1]] for i in range(info.num_chunks)]
            lo_size = max(self.codec.lo_shape((1, *shape)))
            out[name] = unpack_chunks(self.codec, blobs, sizes, shape, lo_size)
        return out

    def held_bytes(self) -> int:
        """The bytes this dataset holds in memory (codes, compressed blobs, or none)."""
        if self._codes is not None:
            return sum(nbytes(c) for c in self._codes.values())
        if self._memory is not None:
            return sum(a.nbytes for a in self._memory.values())
        return 0

    def _index(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Offsets and crcs of dataset ``name``."""
        crc = "extra_crc" if name == "extra" else "crc"
        return self._small[f"{name}_offsets"], self._small[crc]

    def _blobs(self, name: str, ids: list[int]) -> list[memoryview | bytes]:
        """Blobs ``ids`` of dataset ``name``: memory slices, or crc-checked slice reads."""
        if self._memory is not None:
            offsets, _ = self._index(name)
            view = memoryview(self._memory[name])
            return [view[offsets[i] : offsets[i + 1]] for i in ids]
        ds = self._h5()[name]
        offsets, crcs = self._index(name)
        at = self._at.get(name)

        def span(a: int, b: int) -> bytes:  # bytes a..b of the dataset
            if at is None:
                return ds[a:b].tobytes()
            return os.pread(self._fd, b - a, at + a)  # short if cut: the crc check catches it

        if ids == list(range(ids[0], ids[0] + len(ids))):  # in order (iter_cache): one read
            data = span(int(offsets[ids[0]]), int(offsets[ids[-1] + 1]))
            base = offsets[ids[0]]
            blobs = [data[offsets[i] - base : offsets[i + 1] - base] for i in ids]
        else:
            blobs = [span(int(offsets[i]), int(offsets[i + 1])) for i in ids]
        for i, blob in zip(ids, blobs, strict=True):
            if zlib.crc32(blob) != int(crcs[i]):
                raise corrupt(self.path, name, i)
        return blobs

    def read(self, ids: list[int]) -> list[tuple[int, bytes, bytes | None]]:
        """Raw (id, x blob, extra blob) for chunks ``ids``: the I/O half of an item."""
        if self._memory is None:
            self._h5()
        xs = self._blobs("x", ids)
        has_extra = self.info.extra_shape is not None
        extras = self._blobs("extra", ids) if has_extra else [None] * len(ids)
        return list(zip(ids, xs, extras, strict=True))

    def build(self, i: int, blob: bytes, extra_blob: bytes | None) -> dict:
        """Decode one chunk's blobs into its item: the CPU half (safe to run in threads)."""
        start, stop = self.info.chunk_bounds(i)
        k = stop - start
        item = {
            "y": torch.from_numpy(self._small["y"][start:stop].copy()),
            "index": torch.arange(start, stop, dtype=torch.int64),
        }
        item.update(self._decode_x(blob, (k, *self.info.sample_shape)))
        if extra_blob is not None:
            extra = self.codec.decode(extra_blob, (k, *self.info.extra_shape))
            item["extra"] = torch.from_numpy(extra)
        if "extra_pos" in self._small:
            item["extra_pos"] = torch.from_numpy(self._small["extra_pos"][start:stop].copy())
        return item

    def __getitems__(self, ids: list[int]) -> list[dict]:
        # DataLoader calls this with a whole batch of chunk ids.
        if self._codes is not None:
            return [self._held_batch(list(ids))]
        raw = self.read(list(ids))
        if self.device_decode:
            return [self.packed_batch(raw)]  # one item holding the whole batch
        return [self.build(*r) for r in raw]

    def _held_batch(self, ids: list[int]) -> dict:
        """A packed batch from the codes held in memory: index arithmetic, no copy of codes."""
        info, codes = self.info, self._codes
        bounds = [info.chunk_bounds(i) for i in ids]
        batch = self._labels(bounds)
        batch["x"] = gather(codes["x"], ids, math.prod(info.sample_shape))
        if "extra" in codes:
            batch["extra"] = gather(codes["extra"], ids, math.prod(info.extra_shape))
        return batch

    def _labels(self, bounds: list[tuple[int, int]]) -> dict:
        """``y``, ``index`` (and ``extra_pos``) of the samples in chunk ranges ``bounds``."""
        y = self._small["y"]
        batch = {
            "y": torch.from_numpy(np.concatenate([y[a:b] for a, b in bounds])),
            "index": torch.from_numpy(np.concatenate([np.arange(a, b) for a, b in bounds])),
        }
        if "extra_pos" in self._small:
            pos = self._small["extra_pos"]
            batch["extra_pos"] = torch.from_numpy(np.concatenate([pos[a:b] for a, b in bounds]))
        return batch

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def packed_batch(self, raw: list[tuple[int, bytes, bytes | None]]) -> dict:
        """A batch of chunks with its codes still packed (:mod:`freezecache.cache.packed`):
        ``x`` (and ``extra``) are dicts of numpy arrays that :func:`finish_batch`, or the fused
        CPU pass, decode; this is the hot path of training from a quant cache."""
        info = self.info
        bounds = [info.chunk_bounds(i) for i, _, _ in raw]
        sizes = [stop - start for start, stop in bounds]
        lo_size = self.codec.lo_shape((1, *info.sample_shape))
        batch = self._labels(bounds)
        batch["x"] = pack(self.codec, [r[1] for r in raw], sizes, info.sample_shape, max(lo_size))
        if info.extra_shape is not None:
            extra_lo = max(self.codec.lo_shape((1, *info.extra_shape)))
            extras = [r[2] for r in raw]
            batch["extra"] = pack(self.codec, extras, sizes, info.extra_shape, extra_lo)
        return batch

    def _decode_x(self, blob: bytes, shape: tuple[int, ...]) -> dict:
        """Decoded ``x`` on the CPU."""
        return {"x": torch.from_numpy(self.codec.decode(blob, shape))}


def collate_chunks(items: list[dict]) -> dict:
    """Concatenate chunk items along the sample axis into one batch."""
    if len(items) == 1:
        return items[0]  # already a batch (CacheDataset.packed_batch): no copy
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def finish_batch(batch: dict, info: CacheInfo, device: torch.device | str) -> dict:
    """Move a batch to ``device``, decoding its packed codes there (``q * step + lo``)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):  # packed codes
            out[key] = decode_packed(value, info, key, device)
        else:
            out[key] = value.to(device, non_blocking=True)
    return out


def decode_packed(part: dict, info: CacheInfo, key: str, device) -> torch.Tensor:
    """The features (``key`` "x") or stored extras ("extra") of a packed batch, on ``device``."""
    codec = info.codec()
    shape = info.sample_shape if key == "x" else info.extra_shape
    channels = list(info.extra_index) if key == "extra" and info.extra_index else None
    lo_shape = codec.lo_shape((1, *shape))[1:]
    return decode(part, shape, lo_shape, steps(codec, shape, channels), device)


def iter_cache(
    path: Path, info: CacheInfo, batch_chunks: int = 64, workers: int = 2, first_chunk: int = 0
) -> Iterator[dict]:
    """Read the cache in order from ``first_chunk`` on, decoded on CPU, ``batch_chunks`` chunks
    per batch.

    For pushing a cache through more blocks; decoding runs in ``workers`` threads. A resumed
    cache build starts at ``writer.resume_from // chunk_size`` (with ``align`` a multiple of
    ``batch_chunks * chunk_size``, its batches are those of an uninterrupted build).
    """
    dataset = CacheDataset(path, info)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for first in range(first_chunk, info.num_chunks, batch_chunks):
            raw = dataset.read(list(range(first, min(first + batch_chunks, info.num_chunks))))
            # h5py serialises reads behind one lock, so only decoding runs in the threads.
            yield collate_chunks(list(pool.map(lambda r: dataset.build(*r), raw)))
