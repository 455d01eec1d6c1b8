"""Stage cache: at one freeze point, rank what a flip changes (when the method stores it) and
push the training set once through the frozen prefix into a compressed HDF5 cache.

Every point's cache is built from the raw training images through the whole frozen prefix: the
features are exact F(x), and the stored flipped channels or tokens are exact F(flip(x)) (one
extra forward pass, charged in the FLOPs), not a previous cache's partly corrected flipped view
pushed through more blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from freezecache.cache import Build, CacheSpec, CacheWriter
from freezecache.codecs.registry import calibrate, needs_calibration
from freezecache.config import Config
from freezecache.core import runtime
from freezecache.core.io import atomic_write_json
from freezecache.core.timing import section, stage_timings
from freezecache.models import feature_shape, split
from freezecache.steps.context import Context
from freezecache.steps.model import prefix_hash
from freezecache.steps.run import checkpoint_dir, run_key, start_of_point
from freezecache.training import augment, distributed, rank
from freezecache.training.decide import resolve
from freezecache.training.train import progress

log = logging.getLogger(__name__)

BUILD_BATCH = 256  # samples per forward pass of a cache build (and its resume granularity)


def frozen_model(ctx: Context, point) -> tuple[nn.Module, Path]:
    """The model as it stands at a freeze point, in eval mode, and the file it came from."""
    path, state = start_of_point(ctx, point)
    model = ctx.new_model()
    model.load_state_dict(state.model)
    return model.eval(), path


def feature_pairs(
    ctx: Context,
    model: nn.Module,
    block: int,
    flipped: bool,
    batch_size: int,
    limit: int | None,
    start: int = 0,
    names: tuple[str, str] = ("prefix forward", "flipped forward"),
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """(F(x), F(flip(x)) or None, y) over the training set in order from sample ``start`` (a
    multiple of ``batch_size``), raw images through the frozen prefix at ``block``; ``names``:
    the timing sections of the two passes."""
    prefix, _ = split(model, block)
    seen = 0
    with torch.no_grad(), runtime.autocast(ctx.cfg.train.precision, ctx.device):
        for x, y in ctx.train.batches(batch_size):
            if limit is not None and seen >= limit:
                return
            if seen < start:  # already in a resumed build's spool: skip without computing
                seen += y.numel()
                continue
            fa = None
            if flipped:
                with section(names[1]):
                    fa = prefix(x.flip(-1)).float()
            seen += y.numel()
            with section(names[0]):
                f = prefix(x).float()
            yield f, fa, y


def ranking(ctx: Context, model: nn.Module, block: int, kept: list | None = None) -> dict:
    """Flip sensitivity per channel (SSIM, CNN) or mean best-match cosine per token (ViT).

    ``kept``: a list the ranking's (F(x), F(flip(x)), y) batches are appended to, for the
    cache build to reuse instead of computing them again (see :func:`_reusable`)."""
    r = ctx.cfg.rank
    names = ("ranking: prefix forward", "ranking: flipped forward")  # within "ranking"
    pairs = feature_pairs(ctx, model, block, True, r.batch_size, r.samples, names=names)
    if kept is not None:
        pairs = _keeping(pairs, kept)
    if model.kind == "cnn":
        sens = rank.ChannelSensitivity(model.layout)
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
    return {
        "kind": model.kind,
        "samples": count,
        "scores": scores.tolist(),
        "order": order.tolist(),
    }


def _keeping(pairs, kept: list):
    for pair in pairs:
        kept.append(pair)
        yield pair


# The ranking's passes are kept for the build when they take at most this many bytes.
REUSE_BYTES = 256 << 20


def _reusable(ctx: Context, model, block: int) -> bool:
    """Whether the build can take the ranking's batches as its first ones: the same batch size
    (so the same features, bit for bit) and little enough memory to hold them."""
    r = ctx.cfg.rank
    per_sample = 2 * 4 * math.prod(feature_shape(model, block))
    return (
        r.batch_size == BUILD_BATCH and per_sample * min(r.samples, len(ctx.train)) <= REUSE_BYTES
    )


def _build_pairs(ctx, model, block: int, flipped: bool, end: int, start: int, kept: list):
    """The build's (F(x), F(flip(x)), y) batches from sample ``start`` to ``end``: the kept
    ranking batches first (those from ``start`` on), then computed ones."""
    seen = 0
    for f, fa, y in kept:
        if seen >= start and seen < end:
            yield f, fa if flipped else None, y
        seen += y.numel()
    if seen < end:
        yield from feature_pairs(
            ctx, model, block, flipped, BUILD_BATCH, end, start=max(start, seen)
        )


def build_ranges(num_samples: int, chunk_size: int, world: int) -> list[tuple[int, int]]:
    """The chunk ranges the ranks encode, in rank order: contiguous, each starting at a
    multiple of BUILD_BATCH samples (a resume point), as even as that allows; fewer ranges
    than ranks when the data set is too small to give every rank one."""
    chunks = math.ceil(num_samples / chunk_size)
    unit = math.lcm(chunk_size, BUILD_BATCH) // chunk_size  # chunks per resumable unit
    units = math.ceil(chunks / unit)
    ranges = []
    for r in range(min(world, units)):
        part = distributed.share(units, r, min(world, units))
        ranges.append((part.start * unit, min(part.stop * unit, chunks)))
    return ranges


def spool_name(key: str, rank: int, ranges: int) -> str:
    """The build spool's folder name under the stage's checkpoint folder (one process: the
    key alone, as a resumed single-process build expects)."""
    return key if ranges == 1 else f"{key}-r{rank}of{ranges}"


def cache_point(cfg: Config, seed: int, name: str, i: int) -> dict:
    """Builds the cache of method ``name`` at freeze point ``i`` (0-based; with several ranks:
    each encodes its range of the training set, rank 0 writes the file and returns its stats,
    the others {})."""
    stats = _cache_point(resolve(cfg, seed), seed, name, i)
    distributed.barrier()  # the stage ends on every rank once the cache is published
    return stats


def _cache_point(cfg: Config, seed: int, name: str, i: int) -> dict:
    point = cfg.point(i)
    index, block = i + 1, point.block
    ctx = Context(cfg, seed, "cache", method=name, p=point)
    t0 = time.perf_counter()
    model, start_file = frozen_model(ctx, point)
    # Flipped views are ranked and stored only when something is flipped (Config.stores_flips):
    # the ranking runs once, on rank 0; every rank gets its channels (or tokens' count).
    flips = cfg.stores_flips(name)
    ranked, kept = None, []
    if ctx.main:
        with section("ranking"):
            keep = kept if flips and _reusable(ctx, model, block) else None
            ranked = ranking(ctx, model, block, keep) if flips else {"kind": "none"}
        atomic_write_json(ctx.out("ranking"), ranked)
    ranked = distributed.broadcast_object(ranked)
    spec = CacheSpec.at(cfg, model, block, index, flips)
    channels = None
    if spec.extras == "channels":
        channels = rank.most_sensitive(torch.tensor(ranked["scores"]), cfg.rank.gamma).sort().values
    path = ctx.out("cache")
    # Identity of the build's inputs: a killed build resumes from its spool only when it matches.
    key = run_key(ctx, start_file, ctx.data_dir / "train.npz")
    c = cfg.cache
    codec = spec.new_codec()
    if needs_calibration(codec):
        # Fixed on the data set's first batches whatever sample a build resumes at, and the
        # same on every rank: the chunks of a resumed or shared build decode alike.
        if ctx.main:
            first = min(len(ctx.train), math.ceil(c.chunk_size / BUILD_BATCH) * BUILD_BATCH)
            feats = feature_pairs(ctx, model, block, False, BUILD_BATCH, first)
            calibrate(codec, torch.cat([f for f, _, _ in feats]).cpu().numpy(), c.chunk_size)
        options = distributed.broadcast_object(codec.options)
        codec = dataclasses.replace(spec, codec_options=options).new_codec()
    # With several ranks each encodes its own range of chunks into its own spool; rank 0 then
    # writes the one file from all of them (the file one process writes: tested).
    ranges = build_ranges(len(ctx.train), c.chunk_size, distributed.world_size())
    me = distributed.rank()
    spools = [checkpoint_dir(ctx) / spool_name(key, r, len(ranges)) for r in range(len(ranges))]
    if me >= len(ranges):  # fewer ranges than ranks (a tiny data set): nothing to encode
        if len(ranges) > 1:
            distributed.barrier()  # rank 0 publishes once every range is spooled
        return {}
    writer = CacheWriter(
        path,
        codec,
        spec.layout_for(len(ctx.train), None if channels is None else channels.tolist()),
        prefix_hash=prefix_hash(model, block),
        meta={
            "method": name,
            "point": index,
            "block": block,
            "seed": seed,
            "model": cfg.model.name,
        },
        build=Build(
            workers=c.encode_workers,
            spool_dir=spools[me],
            resume_key=key,
            align=BUILD_BATCH,
            chunk_range=ranges[me],
            publish=len(ranges) == 1,
        ),
    )
    if len(ranges) > 1:
        log.info(
            "cache %s: rank %d encodes samples %d..%d of %d",
            ctx.name, me, writer.range_start, writer.range_end, len(ctx.train),
        )  # fmt: skip
    bar = progress(writer.range_end - writer.range_start, f"cache {ctx.name}")
    bar.update(writer.resume_from - writer.range_start)
    # a resumed or shared build starts at a batch boundary (align), like the kept batches
    pairs = _build_pairs(
        ctx, model, block, spec.extras is not None, writer.range_end, writer.resume_from, kept
    )
    with writer:
        for f, fa, y in pairs:
            extra = extra_pos = None
            if channels is not None:
                extra = augment.take_channels(fa, channels.to(fa.device), model.layout)
            elif spec.extras == "tokens":
                pos, extra, _ = rank.select_tokens(
                    f, fa, cfg.rank.alpha, num_prefix_tokens=spec.num_prefix_tokens
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
        if not ctx.main:
            return {}
        stats = writer.publish_ranges(list(zip(spools[1:], ranges[1:], strict=True)))
    stats.update(
        point=index,
        block=block,
        tolerance=spec.tolerance,
        codec=spec.codec,
        chunk_size=cfg.cache.chunk_size,
        build_s=time.perf_counter() - t0,
        stage_wall_s=runtime.process_seconds(),
        peak_rss_mb=runtime.peak_rss_mb(),
        stored_channels=0 if channels is None else len(channels),
        stores_flips=flips,
        timings=stage_timings(ctx.startup_s),
    )
    atomic_write_json(ctx.out("stats"), stats)
    return stats
