"""Building a cache: a frozen prefix over a whole data set, once, into one compressed file.

One implementation for every caller: the cache stage (:mod:`freezecache.steps.cache`, the
prefix of the model at a freeze point over the prepared training images) and the public
:func:`freezecache.build_cache` (any prefix over any torch ``Dataset``,
:mod:`freezecache.cache.from_data`) both call :func:`write_cache`; they differ only in where
the recipe (:class:`CacheSpec`) and the build's identity come from (params, or arguments).

A build: ranks the flip-sensitive channels (or tokens) when the recipe stores some (SSIM of
flip(F(x)) against F(flip(x)) on the first samples, the paper's sections 3.2 and 3.3),
calibrates a codec that needs it on the first samples, then pushes every sample through the
prefix in data-set order and hands the features (and the stored F(flip(x)) channels or tokens)
to a :class:`CacheWriter`: resumable from its spool, atomic, and shared among the ranks of a
torchrun job (rank 0 ranks and calibrates, every rank encodes its range, rank 0 publishes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from freezecache.cache.spec import CacheSpec
from freezecache.cache.writer import Build, CacheWriter
from freezecache.codecs.registry import calibrate, needs_calibration
from freezecache.core import runtime
from freezecache.core.timing import section
from freezecache.models import prefix_digest
from freezecache.training import augment, distributed, rank
from freezecache.training.train import progress

log = logging.getLogger(__name__)

BUILD_BATCH = 256  # samples per forward pass of a build (and its resume granularity)
REUSE_BYTES = 256 << 20  # the ranking's passes are kept for the build up to this many bytes

Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # batch size -> (x, y) in order


@dataclass(frozen=True)
class Ranking:
    """How the flip-sensitive channels (or tokens) are ranked: on the first ``samples``
    samples, ``batch_size`` at a time."""

    samples: int = 1024
    batch_size: int = BUILD_BATCH


@dataclass(frozen=True)
class Built:
    """What a build returns: the file's stats (``CacheWriter.close``; empty on ranks other than
    0), the ranking (``{"kind": "none"}`` without one) and the stored channels (maps) or None."""

    stats: dict
    ranking: dict
    channels: list[int] | None


def frozen_pairs(
    prefix: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    flipped: bool,
    device: torch.device,
    precision: str = "fp32",
    start: int = 0,
    limit: int | None = None,
    names: tuple[str, str] = ("prefix forward", "flipped forward"),
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """(F(x), F(flip(x)) or None, y) of ``batches`` in order from sample ``start`` (a multiple of
    the batch size), until ``limit`` samples were seen; ``names``: the timing sections of the
    two passes. Skipped batches are counted, not computed (a resumed build's spool holds them).
    """
    seen = 0
    with torch.no_grad(), runtime.autocast(precision, device):
        for x, y in batches:
            if limit is not None and seen >= limit:
                return
            if seen < start:
                seen += y.numel()
                continue
            x = x.to(device, non_blocking=True)
            fa = None
            if flipped:
                with section(names[1]):
                    fa = prefix(x.flip(-1)).float()
            seen += y.numel()
            with section(names[0]):
                f = prefix(x).float()
            yield f, fa, y


def flip_ranking(pairs: Iterable[tuple[Tensor, Tensor | None, Tensor]], layout: str) -> dict:
    """Flip sensitivity per channel (SSIM, maps) or mean best-match cosine per token (tokens)
    over ``pairs`` of (F(x), F(flip(x)), y): low scores are the most flip-sensitive."""
    if layout != "tokens":
        sens = rank.ChannelSensitivity(layout)
        for f, fa, _ in pairs:
            sens.update(f, fa)
        scores, count = sens.scores(), sens.count
    else:
        total, count = None, 0
        for f, fa, _ in pairs:
            _, best = rank.match_tokens(f, fa)
            total = best.sum(0) if total is None else total + best.sum(0)
            count += f.shape[0]
        scores = (total / count).cpu()
    order = torch.argsort(scores, stable=True)
    kind = "vit" if layout == "tokens" else "cnn"
    return {"kind": kind, "samples": count, "scores": scores.tolist(), "order": order.tolist()}


def build_ranges(
    num_samples: int, chunk_size: int, world: int, batch: int = BUILD_BATCH
) -> list[tuple[int, int]]:
    """The chunk ranges the ranks encode, in rank order: contiguous, each starting at a
    multiple of ``batch`` samples (a resume point), as even as that allows; fewer ranges than
    ranks when the data set is too small to give every rank one."""
    chunks = math.ceil(num_samples / chunk_size)
    unit = math.lcm(chunk_size, batch) // chunk_size  # chunks per resumable unit
    units = math.ceil(chunks / unit)
    ranges = []
    for r in range(min(world, units)):
        part = distributed.share(units, r, min(world, units))
        ranges.append((part.start * unit, min(part.stop * unit, chunks)))
    return ranges


def spool_name(key: str, rank: int, ranges: int) -> str:
    """A build spool's folder name (one process: the key alone, as a resumed single-process
    build expects)."""
    return key if ranges == 1 else f"{key}-r{rank}of{ranges}"


def write_cache(
    prefix: nn.Module,
    batches: Batches,
    num_samples: int,
    path: Path,
    spec: CacheSpec,
    *,
    resume_key: str,
    spool_root: Path,
    ranking: Ranking | None = None,
    meta: dict | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    workers: int = 2,
    batch_size: int = BUILD_BATCH,
    label: str | None = None,
) -> Built:
    """Build the cache ``spec`` describes at ``path``: ``prefix`` (in eval mode, frozen) over
    the ``num_samples`` samples that ``batches(batch_size)`` yields in order.

    With a ``ranking`` the recipe's ``spec.stored`` flip-sensitive channels (maps) or tokens are
    stored with every sample (exact F(flip(x)): one more forward pass). ``resume_key`` names
    what the samples depend on (weights, data, recipe): a build killed and rerun with the same
    key goes on from its spool under ``spool_root``. Every rank of a torchrun job calls it; the
    returned stats are rank 0's, the others get ``{}``.
    """
    device = torch.device(device)
    path = Path(path)

    def pairs(flipped: bool, size: int, limit=None, start=0, names=None):
        return frozen_pairs(
            prefix, batches(size), flipped=flipped, device=device, precision=precision,
            start=start, limit=limit, **({"names": names} if names else {}),
        )  # fmt: skip

    # The ranking runs once, on rank 0; every rank gets its channels (or tokens' count).
    ranked, kept = {"kind": "none"}, []
    if distributed.is_main() and ranking is not None:
        with section("ranking"):
            per_sample = 2 * 4 * math.prod(spec.sample_shape)
            reuse = ranking.batch_size == batch_size and (
                per_sample * min(ranking.samples, num_samples) <= REUSE_BYTES
            )
            names = ("ranking: prefix forward", "ranking: flipped forward")
            found = pairs(True, ranking.batch_size, ranking.samples, names=names)
            ranked = flip_ranking(_keeping(found, kept) if reuse else found, spec.layout)
    ranked = distributed.broadcast_object(ranked)
    channels = None
    if spec.extras == "channels":
        scores = torch.tensor(ranked["scores"])
        channels = torch.argsort(scores, stable=True)[: spec.stored].sort().values
    codec = spec.new_codec()
    if needs_calibration(codec):
        # Fixed on the data set's first batches whatever sample a build resumes at, and the
        # same on every rank: the chunks of a resumed or shared build decode alike.
        if distributed.is_main():
            first = min(num_samples, math.ceil(spec.chunk_size / batch_size) * batch_size)
            feats = torch.cat([f for f, _, _ in pairs(False, batch_size, first)])
            calibrate(codec, feats.cpu().numpy(), spec.chunk_size)
        options = distributed.broadcast_object(codec.options)
        codec = dataclasses.replace(spec, codec_options=options).new_codec()
    # With several ranks each encodes its own range of chunks into its own spool; rank 0 then
    # writes the one file from all of them (the file one process writes: tested).
    ranges = build_ranges(num_samples, spec.chunk_size, distributed.world_size(), batch_size)
    me = distributed.rank()
    spools = [Path(spool_root) / spool_name(resume_key, r, len(ranges)) for r in range(len(ranges))]
    listed = None if channels is None else channels.tolist()
    if me >= len(ranges):  # fewer ranges than ranks (a tiny data set): nothing to encode
        if len(ranges) > 1:
            distributed.barrier()  # rank 0 publishes once every range is spooled
        return Built({}, ranked, listed)
    writer = CacheWriter(
        path,
        codec,
        spec.layout_for(num_samples, listed),
        prefix_hash=prefix_digest(prefix),
        meta=meta,
        build=Build(
            workers=workers,
            spool_dir=spools[me],
            resume_key=resume_key,
            align=batch_size,
            chunk_range=ranges[me],
            publish=len(ranges) == 1,
        ),
    )
    if len(ranges) > 1:
        log.info(
            "cache %s: rank %d encodes samples %d..%d of %d",
            label or path.name, me, writer.range_start, writer.range_end, num_samples,
        )  # fmt: skip
    bar = progress(writer.range_end - writer.range_start, f"cache {label or path.name}")
    bar.update(writer.resume_from - writer.range_start)
    # a resumed or shared build starts at a batch boundary (align), like the kept batches
    todo = _build_pairs(kept, pairs, spec.extras is not None, writer.range_end, writer.resume_from,
                        batch_size)  # fmt: skip
    with writer:
        for f, fa, y in todo:
            extra = extra_pos = None
            if channels is not None:
                extra = augment.take_channels(fa, channels.to(fa.device), spec.layout)
            elif spec.extras == "tokens":
                pos, extra, _ = rank.select_tokens(
                    f, fa, 0.0, num_prefix_tokens=spec.num_prefix_tokens, count=spec.stored
                )
                extra_pos = pos.cpu().numpy().astype(np.int32)
            with section("encode + write"):
                writer.add(
                    f.cpu().numpy(),
                    y.cpu().numpy(),
                    extra=None if extra is None else extra.float().cpu().numpy(),
                    extra_pos=extra_pos,
                )
            bar.update(y.numel())
    bar.close()
    with section("encode + write"):
        stats = writer.close()  # idempotent: the stats of the published file (and build timings)
    if len(ranges) > 1:
        distributed.barrier()  # every range's spool is complete and durable
        if not distributed.is_main():
            return Built({}, ranked, listed)
        stats = writer.publish_ranges(list(zip(spools[1:], ranges[1:], strict=True)))
    return Built(stats, ranked, listed)


def _keeping(pairs, kept: list):
    for pair in pairs:
        kept.append(pair)
        yield pair


def _build_pairs(kept: list, pairs, flipped: bool, end: int, start: int, batch_size: int):
    """The build's (F(x), F(flip(x)), y) batches from sample ``start`` to ``end``: the kept
    ranking batches first (those from ``start`` on), then computed ones."""
    seen = 0
    for f, fa, y in kept:
        if seen >= start and seen < end:
            yield f, fa if flipped else None, y
        seen += y.numel()
    if seen < end:
        yield from pairs(flipped, batch_size, end, start=max(start, seen))
