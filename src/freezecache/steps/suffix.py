"""Stage train_suffix: discard the frozen prefix and train the remaining blocks from the cache
for the freeze point's epochs.

The batches are :meth:`freezecache.CachedFeatures.batches` of the cache, the public reader, with
the params resolved by :func:`freezecache.cache.features.features_for`; :func:`suffix_spec` is
"a suffix epoch from a cache", which `freezecache doctor` and the benchmarks time as well.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from freezecache.accounting.costs import method_costs, require_counter
from freezecache.cache import open_cache
from freezecache.cache.features import CachedFeatures, features_for
from freezecache.cache.feed import Feed
from freezecache.config import Config
from freezecache.core import runtime
from freezecache.core.timing import section
from freezecache.models import BlockModel, split
from freezecache.steps.context import Context
from freezecache.steps.model import prefix_hash
from freezecache.steps.run import Run, start_of_point
from freezecache.training import distributed
from freezecache.training.decide import resolve
from freezecache.training.schedule import Phase
from freezecache.training.train import TrainSpec


def cached_features(
    ctx: Context, path: Path, name: str, model: BlockModel, block: int, **loader
) -> CachedFeatures:
    """Method ``name``'s cache at ``path`` as this stage reads it (checked against the model's
    prefix at ``block``); ``loader``: params of the ``loader`` section to override (benchmarks)."""
    info = open_cache(path, expect_prefix_hash=prefix_hash(model, block))
    cfg = ctx.cfg
    if loader:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update=loader)})
    return features_for(
        cfg, info, name, layout=model.layout, img_size=ctx.meta["img_size"], device=ctx.device,
        seed=ctx.seed,
    )  # fmt: skip


def suffix_spec(
    ctx: Context,
    model: BlockModel,
    block: int,
    features: CachedFeatures,
    epochs: tuple[int, int],
    evaluate=None,
) -> TrainSpec:
    """A suffix trained from a cache for ``epochs`` [start, end): the blocks after ``block``
    on the stage's batches of ``features`` (each epoch with its own seeded order and draws),
    validated as the stage does (the prefix's validation features computed once)."""
    _, suffix = split(model, block)
    size = ctx.cfg.train.batch_size
    return TrainSpec(
        phase=Phase("discard", block, *epochs),
        forward=suffix,
        batches=lambda epoch: features.batches(size, seed=ctx.seed, epoch=epoch),
        steps_per_epoch=features.num_batches(size),
        evaluate=evaluate or ctx.evaluator(model, block),
    )


def train_suffix(params: Config, seed: int, name: str, i: int) -> None:
    """Trains freeze point ``i`` (0-based) of method ``name`` from its cache."""
    require_counter()
    cfg = resolve(params, seed)
    point = cfg.point(i)
    block = point.block
    ctx = Context(cfg, seed, "train_suffix", params=params, method=name, p=point)
    _, start = start_of_point(ctx, point)
    model = ctx.new_model()
    model.load_state_dict(start.model)
    path = ctx.stage_path("cache", "cache")
    features = cached_features(ctx, path, name, model, block)
    _, suffix = split(model, block)
    run = Run(ctx, model, start)
    evaluate = ctx.evaluator(model, block)  # the prefix's validation features, once
    run.fit(suffix_spec(ctx, model, block, features, cfg.point_epochs(i), evaluate))
    feed = features.feed(cfg.train.batch_size)
    held = feed.loader.dataset.held_bytes()  # the cache held in host memory (codes or blobs)
    # this point's own cache in RAM; the report adds each point's figure to its state
    if cfg.train.bn_recalibrate != "off":  # part of the method: its time counts
        with section("bn recalibration"):
            recalibrate_bn(suffix, _clean_batches(ctx, model, block, feed))
            # the point ends with these statistics: its last validation is theirs (the DVCLive
            # curve keeps the epoch's own, measured before)
            run.state.history[-1].update(evaluate())
        run.state.model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    history, host = run.state.history, {block: held / 1e6}
    costs = method_costs(ctx, model, name, history, host_cache_mb=host) if ctx.main else {}
    final = i == len(cfg.points) - 1
    run.finish(costs, final=final)
    if final and cfg.train.bn_recalibrate == "off":  # a measurement, after the wall time
        measured = bn_on_clean_features(ctx, model, block, feed)  # every rank
        if run.live is not None:
            run.live.finish(measured)


def _clean_batches(ctx: Context, model, block: int, feed: Feed):
    """What the suffix's BatchNorm statistics are re-estimated on (``train.bn_recalibrate``):
    the cached features without augmentation, or the raw training images through the frozen
    prefix (no augmentation either)."""
    if ctx.cfg.train.bn_recalibrate == "cache":
        yield from feed.clean()
        return
    prefix, _ = split(model, block)
    t = ctx.cfg.train
    part = ctx.train.shard(distributed.rank(), distributed.world_size())
    with runtime.eval_mode(prefix), torch.no_grad():
        for x, _ in part.batches(t.eval_batch_size):
            with runtime.autocast(t.precision, ctx.device):
                yield prefix(x).float()


def recalibrate_bn(suffix: torch.nn.Module, batches) -> None:
    """Re-estimates the BatchNorm running statistics of ``suffix`` on ``batches`` (one pass, a
    cumulative average, no gradient); nothing else in the model changes. With several ranks
    each passes over its share and the statistics are averaged over ranks."""
    norms = [m for m in suffix.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    # everything else as at test time (dropout off), only BatchNorm gathering statistics
    with runtime.eval_mode(suffix), runtime.train_mode(*norms), torch.no_grad():
        for x in batches:
            suffix(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        if distributed.active():
            for buf in (m.running_mean, m.running_var):
                buf.copy_(distributed.all_reduce_sum(buf.clone()) / distributed.world_size())


def bn_on_clean_features(ctx: Context, model, block: int, feed: Feed) -> dict:
    """Does the suffix's BatchNorm, whose running statistics were built from augmented,
    quantised features, hurt? Re-estimates them on the clean cached features (one pass, a
    cumulative average) in a copy of the model and measures validation accuracy both ways.
    With several ranks each passes over its share and rank 0's statistics are kept."""
    probe = copy.deepcopy(model)
    _, suffix = split(probe, block)
    norms = [m for m in suffix.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or ctx.val is None:
        return {}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    suffix.train()
    with torch.no_grad():
        for x in feed.clean():
            suffix(x)
    distributed.sync_buffers(suffix)
    return {
        "val_acc_bn_trained": ctx.evaluate(model)["val_acc"],
        "val_acc_bn_clean": ctx.evaluate(probe)["val_acc"],
    }
