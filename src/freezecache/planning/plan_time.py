"""The plan's time prediction per candidate block, before any training: from when a discard run
would overtake FreezeOut, from a few timed steps on a real batch.

Per block: a FreezeOut step (the frozen prefix forward, the rest trained) and a step of the rest
from features, the cache's batch read, decoded and augmented as the training stage does it
(from a small cache of the batch's features built by the cache stage's writer), validation
through the whole model (FreezeOut) or the rest (the discard methods, on features computed
once), and the one-off costs a discard method adds: a cache stage (its start-up, the prefix's
forward over the training set, twice with stored flipped channels, encoding) and the features
of the validation set. The break-even is those one-off seconds over the seconds saved per epoch.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from freezecache.cache import Build, CacheSpec, CacheWriter, open_cache
from freezecache.codecs.registry import calibrate
from freezecache.core import runtime
from freezecache.core.methods import method
from freezecache.models import split
from freezecache.steps.suffix import cache_feed
from freezecache.training.train import Trainer, set_frozen

REPEATS = 3  # timed repeats per measurement (the median), after one untimed


def _seconds(fn, device: torch.device) -> float:
    """Median seconds of ``fn()`` over :data:`REPEATS` runs after a warm-up."""
    times = []
    for i in range(REPEATS + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _data_seconds(ctx, spec: CacheSpec, feats: torch.Tensor, y, name: str, layout: str) -> float:
    """Seconds to read, decode and augment one batch from a cache, as the training stage does
    (a cache of ``feats`` written by the cache stage's writer, read by its feed)."""
    codec = spec.new_codec()
    calibrate(codec, feats.cpu().numpy(), spec.chunk_size)
    with tempfile.TemporaryDirectory(prefix="freezecache-plan-") as tmp:
        path = Path(tmp) / "c.h5"
        tokens = spec.extras == "tokens"
        channels = list(range(spec.stored)) if spec.stored and not tokens else None
        layout_ = spec.layout_for(len(feats), channels)
        extra = pos = None
        if layout_.extra_shape is not None and tokens:  # the last tokens (never prefix tokens)
            first = feats.shape[1] - spec.stored
            extra = feats[:, first:].cpu().numpy()
            pos = (first + torch.arange(spec.stored)).expand(len(feats), -1).numpy()
        elif layout_.extra_shape is not None:
            extra = feats[:, : spec.stored].cpu().numpy()
        with CacheWriter(path, codec, layout_, prefix_hash="plan", build=Build(workers=0)) as w:
            w.add(feats.cpu().numpy(), y.cpu().numpy(), extra=extra, extra_pos=pos)
        info = open_cache(path)
        feed = cache_feed(ctx, path, info, method(name).augment, layout)
        g = runtime.generator(ctx.seed, "plan")
        return _seconds(lambda: list(feed.epoch(0, g)), ctx.device) / max(1, len(feed))


def predict(ctx, model: nn.Module, pos: int, spec_of, x, y) -> dict:
    """Predicted seconds at block ``pos`` and each discard method's break-even against
    FreezeOut (epochs after the freeze point); ``spec_of(ranked)`` is the point's cache spec."""
    cfg, device = ctx.cfg, ctx.device
    t = cfg.train
    n, batch = len(ctx.train), min(t.batch_size, len(x))
    steps = math.ceil(n / t.batch_size)
    m = copy.deepcopy(model)
    prefix, suffix = split(m, pos)
    trainer = Trainer(m, t, seed=ctx.seed, device=device)
    set_frozen(m, pos)
    opt = trainer.make_optimizer()
    m.train()
    prefix.eval()
    xb, yb = x[:batch], y[:batch]
    with torch.no_grad(), runtime.autocast(t.precision, device):
        feats = prefix(xb).float()
        fwd = _seconds(lambda: prefix(xb), device)
        val_full = _seconds(lambda: m(x[: t.eval_batch_size]), device)
        val_rest = _seconds(lambda: suffix(prefix(x[: t.eval_batch_size])), device) - fwd
    frozen = _frozen_forward(prefix, suffix)
    fo_step = _seconds(lambda: trainer.step(opt, frozen, xb, yb, t.lr), device)
    rest_step = _seconds(lambda: trainer.step(opt, suffix, feats, yb, t.lr), device)
    val_n = len(ctx.val) if ctx.val is not None else 0
    val_batches = math.ceil(val_n / t.eval_batch_size)
    fo_epoch = steps * fo_step + val_batches * val_full
    out = {"freezeout_epoch_s": fo_epoch, "epoch_s": {}, "one_off_s": {}, "break_even_epochs": {}}
    for name in cfg.methods.discard:
        spec = spec_of(cfg.stores_flips(name))
        data = _data_seconds(ctx, spec, feats, yb, name, model.layout)
        epoch = steps * (rest_step + data) + val_batches * max(val_rest, 0.0)
        encode = _encode_seconds(spec, feats) * n / batch
        build = (fwd * (2 if spec.stored else 1)) * n / batch + encode
        one_off = ctx.startup_s + build + val_batches * fwd * t.eval_batch_size / batch
        saved = fo_epoch - epoch
        out["epoch_s"][name] = epoch
        out["one_off_s"][name] = one_off
        out["break_even_epochs"][name] = max(0.0, one_off / saved) if saved > 0 else None
    return out


def _frozen_forward(prefix: nn.Module, suffix: nn.Module):
    def forward(x):
        with torch.no_grad():
            h = prefix(x)
        return suffix(h)

    return forward


def _encode_seconds(spec: CacheSpec, feats: torch.Tensor) -> float:
    """Seconds to encode a batch of features chunk by chunk (one thread, like a worker)."""
    codec = spec.new_codec()
    x = feats.cpu().numpy()
    calibrate(codec, x, spec.chunk_size)
    k = spec.chunk_size
    start = time.perf_counter()
    for i in range(0, len(x), k):
        codec.encode(x[i : i + k])
    return time.perf_counter() - start
