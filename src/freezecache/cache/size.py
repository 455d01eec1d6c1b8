"""How many bytes a cache will take, measured by encoding a real batch as the writer would."""

from __future__ import annotations

import math

import numpy as np

from freezecache.codecs import Codec
from freezecache.codecs.quant import QuantCodec

# HDF5 object headers, attributes and the superblock of a cache file: a few KB, claimed generously
# (the writer reserves this much for HDF5, which must never meet a full disk).
H5_OVERHEAD = 1 << 20
# What they actually take in a cache file (measured 8-9 KB): for predicting a file's size.
H5_HEADERS = 16 << 10


def _encoded_per_sample(
    codec: Codec, batch: np.ndarray, chunk_size: int, channels: list[int] | None = None
) -> float:
    """Mean blob bytes per sample of ``batch`` (n, ...) cut into chunks of ``chunk_size``;
    ``channels``: the indices of a channel subset (stored flipped channels), which a relative
    quant codec needs to pick their tolerances."""
    batch = np.ascontiguousarray(batch, np.float32)
    whole = len(batch) - len(batch) % chunk_size
    used = batch[:whole] if whole else batch  # a batch shorter than a chunk: one short chunk
    step = chunk_size if whole else len(batch)

    def encode(chunk: np.ndarray) -> bytes:
        if channels and isinstance(codec, QuantCodec):
            return codec.compress(codec.quantize(chunk[None], channels).payloads[0])
        return codec.encode(chunk)

    stored = sum(len(encode(used[i : i + step])) for i in range(0, len(used), step))
    return stored / len(used)


def estimate_cache_bytes(
    codec: Codec,
    sample_batch: np.ndarray,
    num_samples: int,
    extra_batch: np.ndarray | None = None,
    *,
    chunk_size: int = 1,
    pos_width: int = 0,
    extra_index: list[int] | None = None,
    overhead: int = H5_OVERHEAD,
) -> int:
    """Bytes a cache of ``num_samples`` will take, from a measured ``sample_batch`` (n, ...).

    ``sample_batch`` (and ``extra_batch``, the matching extra data) are encoded chunk by chunk
    as the cache writer would; their bytes per sample are scaled to ``num_samples``, plus the
    labels, offsets, crcs, ``pos_width`` token positions per sample and ``overhead`` for HDF5
    (the generous reserve by default; :data:`H5_HEADERS` to predict the file's size). The blob
    part is also what the build's spool holds.
    """
    if len(sample_batch) == 0:
        raise ValueError("estimate_cache_bytes: sample_batch is empty")
    per_sample = _encoded_per_sample(codec, sample_batch, chunk_size)
    blob_sets = 1
    if extra_batch is not None:
        per_sample += _encoded_per_sample(codec, extra_batch, chunk_size, extra_index)
        blob_sets = 2
    chunks = math.ceil(num_samples / chunk_size)
    index = num_samples * 8 * (1 + pos_width) + blob_sets * chunks * (8 + 4) + 8
    return math.ceil(per_sample * num_samples) + index + overhead
