"""Stage cache: at one freeze point, rank what a flip changes (when the method stores it) and
push the training set once through the frozen prefix into a compressed HDF5 cache.

Every point's cache is built from the raw training images through the whole frozen prefix: the
features are exact F(x), and the stored flipped channels or tokens are exact F(flip(x)) (one
extra forward pass, charged in the FLOPs), not a previous cache's partly corrected flipped view
pushed through more blocks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from freezecache import augment, distributed, rank, runtime, store
from freezecache.codec import make_codec
from freezecache.config import Config
from freezecache.io import atomic_write_json, tensors_digest
from freezecache.methods import method
from freezecache.models import feature_shape, split
from freezecache.steps.context import Context, start_of_point
from freezecache.train import progress

BUILD_BATCH = 256  # samples per forward pass of a cache build (and its resume granularity)


def prefix_hash(model: nn.Module, position: int) -> str:
    """Content hash of the frozen prefix a cache was built with."""
    prefix, _ = split(model, position)
    return tensors_digest(prefix.state_dict())


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
) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
    """(F(x), F(flip(x)) or None, y) over the training set in order from sample ``start`` (a
    multiple of ``batch_size``), raw images through the frozen prefix at ``block``."""
    prefix, _ = split(model, block)
    seen = 0
    with torch.no_grad(), runtime.autocast(ctx.cfg.train.precision, ctx.device):
        for x, y in ctx.train.batches(batch_size):
            if limit is not None and seen >= limit:
                return
            if seen < start:  # already in a resumed build's spool: skip without computing
                seen += y.numel()
                continue
            fa = prefix(x.flip(-1)).float() if flipped else None
            seen += y.numel()
            yield prefix(x).float(), fa, y


def ranking(ctx: Context, model: nn.Module, block: int) -> dict:
    """Flip sensitivity per channel (SSIM, CNN) or mean best-match cosine per token (ViT)."""
    r = ctx.cfg.rank
    pairs = feature_pairs(ctx, model, block, True, r.batch_size, r.samples)
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


def cache_point(cfg: Config, seed: int, name: str, block: int) -> dict:
    """Builds the cache of method ``name`` at the freeze point at ``block`` (with several ranks:
    rank 0 builds it and returns its stats, the others {})."""
    stats = _cache_point(cfg, seed, name, block)
    distributed.barrier()  # the stage ends on every rank once the cache is published
    return stats


def _cache_point(cfg: Config, seed: int, name: str, block: int) -> dict:
    index, point = cfg.point(block)
    ctx = Context(cfg, seed, "cache", method=name, p=point)
    t0 = time.perf_counter()
    model, start_file = frozen_model(ctx, point)
    m = method(name)
    # The ranking runs once, on rank 0; every rank gets its channels (or tokens' count).
    ranked = None
    if ctx.main:
        ranked = ranking(ctx, model, block) if m.needs_ranking else {"kind": "none"}
        atomic_write_json(ctx.out("ranking"), ranked)
    ranked = distributed.broadcast_object(ranked)
    shape = feature_shape(model, block)
    channels = extra_shape = None
    tokens = model.num_prefix_tokens
    if m.needs_ranking and model.kind == "cnn":
        channels = rank.most_sensitive(torch.tensor(ranked["scores"]), cfg.rank.gamma).sort().values
        extra_shape = augment.stored_channels_shape(shape, len(channels), model.layout)
        extra_shape = None if len(channels) == 0 else extra_shape
    elif m.needs_ranking:
        count = rank.num_selected_tokens(shape[0], cfg.rank.alpha, tokens)
        extra_shape = (count, shape[1]) if count else None
    if extra_shape is None:
        channels = None
    # Seam for the per-rank build (issue 12). CacheWriter spools chunks 0..num_chunks of one
    # process and publishes the file itself, so with several ranks rank 0 encodes the whole
    # training set and the others stop here. Left to do: a writer over a chunk range that only
    # spools (store.Spool takes a range already); each rank would encode the chunks
    # distributed.share(num_chunks, rank, world) with the same ranking and channels (the
    # feature_pairs of its samples), then after a barrier rank 0 would merge the ranks' stats
    # and call store.assemble_cache(path, spools in chunk order, attrs), which gives the file
    # one process writes.
    if not ctx.main:
        return {}
    path = ctx.out("cache")
    # Identity of the build's inputs: a killed build resumes from its spool only when it matches.
    key = ctx.run_key(start_file, ctx.data_dir / "train.npz")
    tol = cfg.cache.tolerance_at(index)
    c = cfg.cache
    options = {}
    if c.codec == "quant":
        options = {"channel_axis": model.channel_axis, "relative": c.relative, "coding": c.coding}
    writer = store.CacheWriter(
        path,
        codec=make_codec(cfg.cache.codec, tol, **options),
        sample_shape=shape,
        chunk_size=cfg.cache.chunk_size,
        num_samples=len(ctx.train),
        prefix_hash=prefix_hash(model, block),
        extra_shape=extra_shape,
        extra_index=channels.tolist() if channels is not None else None,
        meta={
            "method": name,
            "point": index,
            "block": block,
            "seed": seed,
            "model": cfg.model.name,
        },
        workers=cfg.cache.encode_workers,
        spool_dir=ctx.checkpoint_dir() / key,
        resume_key=key,
        align=BUILD_BATCH,
    )
    bar = progress(len(ctx.train), f"cache {ctx.name}")
    bar.update(writer.resume_from)
    pairs = feature_pairs(
        ctx, model, block, extra_shape is not None, BUILD_BATCH, None, start=writer.resume_from
    )
    with writer:
        for f, fa, y in pairs:
            extra = extra_pos = None
            if channels is not None:
                extra = augment.take_channels(fa, channels.to(fa.device), model.layout)
            elif extra_shape is not None:
                pos, extra, _ = rank.select_tokens(f, fa, cfg.rank.alpha, num_prefix_tokens=tokens)
                extra_pos = pos.cpu().numpy().astype(np.int32)
            writer.add(
                f.cpu().numpy(),
                y.cpu().numpy(),
                extra=None if extra is None else extra.float().cpu().numpy(),
                extra_pos=extra_pos,
            )
            bar.update(y.numel())
    bar.close()
    stats = writer.close()  # idempotent: the stats of the published file (and build timings)
    stats.update(
        point=index,
        block=block,
        tolerance=tol,
        codec=cfg.cache.codec,
        chunk_size=cfg.cache.chunk_size,
        build_s=time.perf_counter() - t0,
        stage_wall_s=runtime.process_seconds(),
        peak_rss_mb=runtime.peak_rss_mb(),
        stored_channels=0 if channels is None else len(channels),
    )
    atomic_write_json(ctx.out("stats"), stats)
    return stats
