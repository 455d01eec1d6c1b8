"""The cache of any frozen prefix over any torch ``Dataset``: :func:`build_cache`, the public
face (:func:`freezecache.build_cache`) of :func:`freezecache.cache.build.write_cache`, the
function the pipeline's cache stage builds with.

What it adds is only what the stage gets from params: the recipe from keyword arguments and the
prefix's first output (its shape and layout), the data as batches in order, a resume key from
what it can see (the prefix's weights, the recipe, the data's length), and a summary read back
from the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from freezecache.cache.build import BUILD_BATCH, Batches, Ranking, write_cache
from freezecache.cache.format import open_cache
from freezecache.cache.spec import CacheSpec
from freezecache.core.errors import FreezecacheError
from freezecache.models import eval_mode, prefix_digest
from freezecache.training import distributed


@dataclass(frozen=True)
class CacheSummary:
    """What :func:`build_cache` wrote: ``samples`` of per-sample ``shape`` (laid out as
    ``layout``), ``stored_bytes`` on disk against ``raw_bytes`` as float32 (``ratio``), the
    largest absolute error of a decoded value (``max_abs_error``), how many flip-sensitive
    channels or tokens each sample stores (``flip_channels``) and the ranking that chose them."""

    path: Path
    samples: int
    shape: tuple[int, ...]
    layout: str
    stored_bytes: int
    raw_bytes: int
    ratio: float
    max_abs_error: float | None
    flip_channels: int
    ranking: dict


def build_cache(
    prefix: nn.Module,
    data,
    path: str | Path,
    *,
    codec: str = "quant",
    tolerance: float = 0.1,
    flip_channels: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = BUILD_BATCH,
    relative: bool = False,
    coding: str = "zstd",
    chunk_size: int = 1,
    rank_samples: int = 1024,
    workers: int = 2,
    precision: str = "fp32",
) -> CacheSummary:
    """Push every sample of ``data`` once through the frozen ``prefix`` and store the outputs,
    compressed, in one HDF5 file at ``path``: the cache the pipeline's cache stage writes, by the
    same function.

    ``data``: a torch ``Dataset`` of ``(image, label)`` (read in order, ``batch_size`` at a
    time) or a ``DataLoader`` that does not shuffle. ``codec``: "quant" (error-bounded
    quantisation, ``tolerance`` absolute, or relative to each channel's spread with
    ``relative``), "zfp" (needs zfpy) or "none" (float32). ``flip_channels``: store that many
    flip-sensitive channels (maps) or tokens of F(flip(x)) per sample, ranked on the first
    ``rank_samples`` samples, so that :class:`CachedFeatures` can repair a flip (0: none).
    ``device``: where the prefix runs (default: where its weights are). The build is atomic
    (a file at ``path`` is whole) and resumable: rerun after an interruption with the same
    prefix, data and settings, it goes on from its spool (next to ``path``). Under torchrun
    every rank calls it and encodes its share.

    Example::

        prefix, suffix = freezecache.split(model, 3)
        info = freezecache.build_cache(prefix, train_set, "cache.h5", tolerance=0.1)
        print(info.samples, info.shape, f"{info.ratio:.3f} of float32")
    """
    if not (isinstance(tolerance, int | float) and tolerance > 0):
        raise FreezecacheError(
            f"build_cache: tolerance={tolerance!r} must be > 0 — the largest error a cached "
            "value may have, e.g. 0.1"
        )
    if batch_size < 1 or chunk_size < 1 or flip_channels < 0:
        raise FreezecacheError(
            f"build_cache: batch_size={batch_size}, chunk_size={chunk_size} must be >= 1 and "
            f"flip_channels={flip_channels} >= 0"
        )
    path = Path(path)
    batches, num_samples, batch_size = _batches_of(data, batch_size)
    param = next(prefix.parameters(), None)
    device = torch.device(device or (param.device if param is not None else "cpu"))
    with eval_mode(prefix):
        x0, _ = next(iter(batches(1)))
        with torch.no_grad():
            out = prefix(x0[:1].to(device))
        layout = getattr(prefix, "layout", None) or ("tokens" if out.dim() == 3 else "nchw")
        prefix_tokens = getattr(prefix, "num_prefix_tokens", 0)
        shape = tuple(out.shape[1:])
        _check_flips(flip_channels, shape, layout, prefix_tokens)
        spec = CacheSpec.make(
            shape, layout, codec=codec, tolerance=float(tolerance), relative=relative,
            coding=coding, chunk_size=chunk_size, stored=flip_channels,
            num_prefix_tokens=prefix_tokens,
        )  # fmt: skip
        spec.new_codec()  # an unknown codec or option: one line before any work
        key = _resume_key(prefix, spec, num_samples, batch_size)
        spool_root = path.with_name(f".{path.name}.build")
        built = write_cache(
            prefix, batches, num_samples, path, spec, resume_key=key, spool_root=spool_root,
            ranking=Ranking(rank_samples, batch_size) if flip_channels else None,
            meta={"layout": layout}, device=device, precision=precision, workers=workers,
            batch_size=batch_size,
        )  # fmt: skip
    distributed.barrier()
    if distributed.is_main() and spool_root.is_dir() and not any(spool_root.iterdir()):
        spool_root.rmdir()
    info = open_cache(path)
    s = info.stats
    return CacheSummary(
        path=path, samples=info.num_samples, shape=info.sample_shape, layout=layout,
        stored_bytes=int(s["stored_bytes"]), raw_bytes=int(s["raw_bytes"]),
        ratio=float(s["compression_ratio"]), max_abs_error=s.get("max_abs_error"),
        flip_channels=flip_channels, ranking=built.ranking,
    )  # fmt: skip


def _batches_of(data, batch_size: int) -> tuple[Batches, int, int]:
    """(batch size -> batches in order, the number of samples, the build's batch size) of a
    Dataset or a DataLoader (whose own batch size then counts)."""
    if isinstance(data, DataLoader):
        sampler = data.batch_sampler.sampler if data.batch_sampler is not None else data.sampler
        if not isinstance(sampler, SequentialSampler) or data.batch_size is None:
            raise FreezecacheError(
                "build_cache: the DataLoader shuffles or samples — a cache is built once, in "
                "order: pass the Dataset, or a DataLoader with shuffle=False and a batch_size"
            )
        return (lambda _size: data), len(data.dataset), data.batch_size
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise FreezecacheError("build_cache: the data set is empty — nothing to cache")
        return (
            (lambda size: DataLoader(data, batch_size=size, shuffle=False)),
            len(data),
            batch_size,
        )
    raise FreezecacheError(
        f"build_cache: data is a {type(data).__name__} — pass a torch Dataset of (image, label) "
        "with a length, or a DataLoader over one"
    )


def _check_flips(count: int, shape: tuple[int, ...], layout: str, prefix_tokens: int) -> None:
    have = shape[0] - prefix_tokens if layout == "tokens" else (
        shape[-1] if layout == "nhwc" else shape[0]
    )  # fmt: skip
    what = "tokens" if layout == "tokens" else "channels"
    if count > have:
        raise FreezecacheError(
            f"build_cache: flip_channels={count} but the prefix's features have {have} {what} "
            f"— use 0..{have}"
        )


def _resume_key(prefix: nn.Module, spec: CacheSpec, num_samples: int, batch_size: int) -> str:
    """What a build's samples depend on, as far as it can see (the prefix's weights, the recipe,
    the data's length): a spool is resumed only for the same."""
    doc = {"prefix": prefix_digest(prefix), "spec": dataclasses.asdict(spec),
           "samples": num_samples, "batch": batch_size}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
