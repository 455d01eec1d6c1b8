"""What a method costs, per freezing state: accounted memory, CUDA peak, FLOPs (Appendix A.1).

Every training stage writes `costs.json` for its method's whole schedule (the last stage of a
method therefore holds the method's numbers). Memory is counted from tensors on one real
training batch; FLOPs are 2 x ptflops MACs per sample, x samples x epochs, plus the one-off
overheads of the discard methods (cache builds, the flipped pass for stored channels, ranking).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from freezecache.accounting.flops import part_flops, ptflops, training_flops
from freezecache.accounting.memory import accounted_memory, average_and_min_memory
from freezecache.config import AUTO
from freezecache.core import runtime
from freezecache.core.methods import method
from freezecache.core.records import Costs, StateCost
from freezecache.core.timing import section
from freezecache.models import split
from freezecache.training.schedule import phases
from freezecache.training.train import set_frozen

log = logging.getLogger(__name__)


def require_counter() -> None:
    """One line before a training stage trains, not after, when ptflops (the FLOP counter its
    costs.json needs) is missing or broken."""
    ptflops()


def _example(ctx, n: int) -> torch.Tensor:
    x, _ = next(iter(ctx.train.batches(n)))
    return x


def state_memory(ctx, model: nn.Module, state: str, position: int) -> dict:
    """Accounted training memory of one step in a freezing state, on a real batch."""
    t = ctx.cfg.train
    batch = t.micro_batch or t.batch_size
    example = _example(ctx, batch)
    set_frozen(model, position if state != "full" else 0)
    model.train()
    with runtime.autocast(t.precision, ctx.device):
        if state == "full":
            mem = accounted_memory(model, example)
        else:
            prefix, suffix = split(model, position)
            prefix.eval()
            if state == "freeze":
                mem = accounted_memory(suffix, example, frozen=prefix)
            else:
                with torch.no_grad():
                    feats = prefix(example).float()
                mem = accounted_memory(suffix, feats)
    set_frozen(model, 0)
    return mem


def overhead_flops(cfg, parts: dict, num_samples: int, name: str) -> dict:
    """One-off FLOPs of a discard method: at each freeze point the training set goes once
    through the whole frozen prefix from raw images, twice for the flipped pass when channels
    or tokens are stored (:meth:`Config.stores_flips`), plus the ranking passes over the rank
    sample."""
    if method(name).kind != "discard":
        return {}
    extras = {}
    for k, p in enumerate(cfg.points, start=1):
        fwd = parts[p.block]["prefix_fwd"]
        extras[f"cache_build_p{k}"] = fwd * num_samples
        if cfg.stores_flips(name):
            extras[f"flipped_pass_p{k}"] = fwd * num_samples
            extras[f"rank_p{k}"] = 2 * fwd * min(cfg.rank.samples, num_samples)
    return extras


def method_costs(
    ctx,
    model: nn.Module,
    name: str,
    history: list[dict],
    host_cache_mb: dict | None = None,
    schedule: list[tuple[str, int, int]] | None = None,
) -> Costs:
    """costs.json of method ``name`` for its whole schedule (or ``schedule``): accounted memory
    per freezing state, FLOPs, and (discard methods) the compressed cache each state holds in
    host memory."""
    with section("accounting"):
        return _method_costs(ctx, model, name, history, host_cache_mb, schedule)


def _method_costs(ctx, model, name, history, host_cache_mb, schedule) -> Costs:
    cfg = ctx.cfg
    meta = ctx.meta
    input_shape = (meta["channels"], meta["img_size"], meta["img_size"])
    schedule = schedule or [(ph.state, ph.position, ph.epochs) for ph in phases(cfg, name)]
    # a discard method's one-off FLOPs need each point's prefix (auto: known once decided); no
    # other method's costs read the points beyond its schedule (Normal's stay put when one moves)
    discards = method(name).kind == "discard"
    blocks = {p.block for p in cfg.points if p.block != AUTO} if discards else set()
    positions = sorted(blocks | {pos for _, pos, _ in schedule})
    parts = {p: part_flops(model, p, input_shape) for p in positions}
    n = len(ctx.train)
    flops = training_flops(
        parts, schedule=schedule, num_samples=n, extras=overhead_flops(cfg, parts, n, name)
    )
    states = []
    for state, position, epochs in schedule:
        mem = state_memory(ctx, model, state, position)
        rows = [r for r in history if r.get("state") == state and r.get("position") == position]
        peaks = [r["cuda_peak_mb"] for r in rows if r.get("cuda_peak_mb") is not None]
        states.append(
            StateCost(
                state=state,
                position=position,
                epochs=epochs,
                accounted_memory_mb=mem["total_mb"],
                memory_breakdown_mb={k[:-3]: v for k, v in mem.items() if k.endswith("_mb")},
                cuda_peak_mb=max(peaks) if peaks else None,
                cache_in_ram_mb=(host_cache_mb or {}).get(position, 0.0),
            )
        )
    avg, low = average_and_min_memory([(s.accounted_memory_mb, s.epochs) for s in states])
    costs = Costs(avg_memory_mb=avg, min_memory_mb=low, train_flops=flops["train_flops"])
    if all(s.cuda_peak_mb is not None for s in states):
        cavg, clow = average_and_min_memory([(s.cuda_peak_mb, s.epochs) for s in states])
        costs.cuda_avg_memory_mb, costs.cuda_min_memory_mb = cavg, clow
    costs.states, costs.flops = states, flops
    costs.parts = {str(k): v for k, v in parts.items()}
    return costs
