"""Stage cache: at one freeze point, rank what a flip changes (when the method stores it) and
push the training set once through the frozen prefix into a compressed HDF5 cache.

The build is :func:`freezecache.cache.build.write_cache`, the function behind the public
:func:`freezecache.build_cache`; this stage gives it the params' recipe (``CacheSpec.at``), the
model as it stands at the point and the prepared training images, and records what it did.

Every point's cache is built from the raw training images through the whole frozen prefix: the
features are exact F(x), and the stored flipped channels or tokens are exact F(flip(x)) (one
extra forward pass, charged in the FLOPs), not a previous cache's partly corrected flipped view
pushed through more blocks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor, nn

from freezecache.cache import CacheSpec
from freezecache.cache.build import BUILD_BATCH, Ranking, frozen_pairs, write_cache
from freezecache.config import Config
from freezecache.core import interrupts, runtime
from freezecache.core.io import atomic_write_json
from freezecache.core.timing import stage_timings
from freezecache.models import split
from freezecache.steps.context import Context
from freezecache.steps.run import checkpoint_dir, clear_checkpoints, stage_key, start_of_point
from freezecache.training import distributed
from freezecache.training.decide import resolve

__all__ = ["BUILD_BATCH", "cache_point", "feature_pairs", "frozen_model"]


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
    """(F(x), F(flip(x)) or None, y) over the training set in order, as the stage's build
    computes them (:func:`freezecache.cache.build.frozen_pairs`)."""
    prefix, _ = split(model, block)
    return frozen_pairs(
        prefix, ctx.train.batches(batch_size), flipped=flipped, device=ctx.device,
        precision=ctx.cfg.train.precision, start=start, limit=limit,
    )  # fmt: skip


def cache_point(cfg: Config, seed: int, name: str, i: int) -> dict:
    """Builds the cache of method ``name`` at freeze point ``i`` (0-based; with several ranks:
    each encodes its range of the training set, rank 0 writes the file and returns its stats,
    the others {})."""
    stats = _cache_point(cfg, seed, name, i)
    distributed.barrier()  # the stage ends on every rank once the cache is published
    return stats


def _cache_point(params: Config, seed: int, name: str, i: int) -> dict:
    cfg = resolve(params, seed)
    point = cfg.point(i)
    index, block = i + 1, point.block
    ctx = Context(cfg, seed, "cache", params=params, method=name, p=point)
    t0 = time.perf_counter()
    model, _ = frozen_model(ctx, point)
    # Flipped views are ranked and stored only when something is flipped (Config.stores_flips)
    flips = cfg.stores_flips(name)
    spec = CacheSpec.at(cfg, model, block, index, flips)
    prefix, _ = split(model, block)
    r = cfg.rank
    built = write_cache(
        prefix,
        ctx.train.batches,
        len(ctx.train),
        ctx.out("cache"),
        spec,
        # identity of the build's inputs: a killed build resumes from its spool only when it matches
        resume_key=stage_key(ctx),
        spool_root=checkpoint_dir(ctx),
        ranking=Ranking(r.samples, r.batch_size) if flips else None,
        meta={
            "method": name,
            "point": index,
            "block": block,
            "seed": seed,
            "model": cfg.model.name,
        },  # fmt: skip
        device=ctx.device,
        precision=cfg.train.precision,
        workers=cfg.cache.encode_workers,
        label=ctx.name,
    )
    if not ctx.main:
        return {}
    stats = dict(built.stats)
    stats.update(
        point=index,
        block=block,
        tolerance=spec.tolerance,
        codec=spec.codec,
        chunk_size=cfg.cache.chunk_size,
        build_s=time.perf_counter() - t0,
        stage_wall_s=runtime.process_seconds(),
        peak_rss_mb=runtime.peak_rss_mb(),
        stored_channels=len(built.channels or ()),
        stores_flips=flips,
        timings=stage_timings(ctx.startup_s),
    )
    with interrupts.deferred():  # the stage's other files: all of them, or (before) none
        atomic_write_json(ctx.out("ranking"), built.ranking)
        atomic_write_json(ctx.out("stats"), stats)
    interrupts.at_success(lambda: clear_checkpoints(ctx))  # other params' spools
    return stats
