"""Where and when to freeze, decided from the training itself (``freeze.points: auto``).

While the full model trains (the shared run up to the first freeze point, ``train_prefix``), a
:class:`Monitor` measures one statistic per block every ``criterion.interval`` steps
(``freeze.criterion.rule``):

- ``grad_change``: AutoFreeze's (Liu et al., 2021) relative change of the block's gradient
  norm, averaged over the interval, between two measurements: small once the block's gradients
  settle;
- ``weight_change``: how far the block's weights moved per step over the interval, relative to
  their norm (SlimFit's signal: layers whose weights move least are frozen first);
- ``output_change``: one minus the cosine similarity of the block's output on a fixed probe
  batch between two measurements: the block's representation has stopped drifting.

A block is ready once its statistic stayed below ``criterion.threshold`` for
``criterion.patience`` measurements in a row. At each epoch's end the run decides (front blocks
only, as freezing is a prefix): it freezes at the deepest block whose blocks are all ready, that
the plan allows (its caches fit on the disk and it pays back its one-off FLOPs in the epochs
left), and no shallower than ``criterion.min_block``; or, with a fixed block, once that block
and those before it are ready; or, with a fixed epoch, at that epoch. It freezes at
``criterion.epoch_max`` at the latest, at the deepest ready allowed block or else the shallowest
allowed one. The decision is a DVC output of the run (``decision.json``) that every later stage
reads, so ``dvc repro`` reruns exactly what a changed decision changes; the monitor's state
rides in the run's checkpoints, so a killed run resumes and decides the same.
"""

from __future__ import annotations

import math

import torch

from freezecache.config import AUTO, Config, Criterion, Freeze, FreezePoint
from freezecache.core.errors import FreezecacheError
from freezecache.core.io import read_json
from freezecache.pipeline import STAGES


class Monitor:
    """Per-block statistics during full-model training, and the decision they lead to.

    ``probe``: a fixed batch of normalised images (``output_change``). :meth:`state` and
    :meth:`load` carry everything across a resume."""

    def __init__(self, model, crit: Criterion, probe: torch.Tensor | None = None) -> None:
        self.model = model
        self.crit = crit
        self.probe = probe
        self.blocks = list(model.blocks)
        self.step = 0
        self.rows: list[dict] = []  # {"step", "epoch" (1-based, in progress), "values"}
        self._sum = [0.0] * len(self.blocks)  # grad_change: norms summed over the interval
        self._prev: list | None = None  # the previous measurement's per-block quantity
        self.epoch = 0

    # -- measuring ---------------------------------------------------------------------------
    def after_backward(self) -> None:
        """Called after every backward pass of full-model training."""
        self.step += 1
        if self.crit.rule == "grad_change":
            for b, block in enumerate(self.blocks):
                grads = [p.grad for p in block.parameters() if p.grad is not None]
                self._sum[b] += float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
        if self.step % self.crit.interval == 0:
            self._measure()

    def _measure(self) -> None:
        now = self._quantity()
        values = [math.nan] * len(self.blocks)
        if self._prev is not None:
            values = [self._change(a, b) for a, b in zip(now, self._prev, strict=True)]
        self._prev = now
        self.rows.append({"step": self.step, "epoch": self.epoch + 1, "values": values})

    def _quantity(self) -> list:
        """What the rule compares between measurements, per block."""
        rule = self.crit.rule
        if rule == "grad_change":
            out = [s / self.crit.interval for s in self._sum]
            self._sum = [0.0] * len(self.blocks)
            return out
        if rule == "weight_change":
            return [torch.cat([p.detach().float().flatten().cpu() for p in b.parameters()])
                    for b in self.blocks]  # fmt: skip
        return self._outputs()

    def _outputs(self) -> list[torch.Tensor]:
        """Each block's output on the probe batch (eval mode: the running statistics)."""
        model = self.model
        was = model.training
        model.eval()
        outs = []
        with torch.no_grad():
            h = model.stem(self.probe)
            for block in self.blocks:
                h = block(h)
                outs.append(h.detach().float().flatten(1).cpu())
        model.train(was)
        return outs

    def _change(self, now, before) -> float:
        rule = self.crit.rule
        if rule == "grad_change":
            return abs(now - before) / before if before > 0 else math.nan
        if rule == "weight_change":
            norm = float(before.norm())
            return float((now - before).norm()) / (norm * self.crit.interval) if norm else math.nan
        cos = torch.nn.functional.cosine_similarity(now, before, dim=1)
        return float(1.0 - cos.mean())

    # -- deciding ----------------------------------------------------------------------------
    def ready(self) -> list[bool]:
        """Per block: below the threshold for the last ``patience`` measurements."""
        last = self.rows[-self.crit.patience :]
        if len(last) < self.crit.patience:
            return [False] * len(self.blocks)
        return [
            all(not math.isnan(r["values"][b]) and r["values"][b] < self.crit.threshold
                for r in last)
            for b in range(len(self.blocks))
        ]  # fmt: skip

    def ready_depth(self) -> int:
        """How many front blocks are all ready (a freeze at that block freezes only them)."""
        depth = 0
        for r in self.ready():
            if not r:
                break
            depth += 1
        return depth

    def decide(self, point: FreezePoint, epoch: int, allowed) -> dict | None:
        """The decision at the end of epoch ``epoch`` (1-based), or None to train on.

        ``allowed(block, epoch)``: whether the plan allows freezing at ``block`` at ``epoch``."""
        crit = self.crit
        depth = self.ready_depth()
        blocks = [b for b in range(crit.min_block, len(self.blocks)) if allowed(b, epoch)]
        if not blocks:
            return self._at_cap(point, epoch, allowed, reason="no block is allowed")
        fits = [b for b in blocks if b <= depth]
        if point.block != AUTO:  # when: once the given block's front is ready
            if point.block <= depth and allowed(point.block, epoch):
                return self._decision(point.block, epoch, "the criterion fired")
            return self._at_cap(point, epoch, allowed)
        if point.epoch != AUTO:  # where: at the given epoch
            if epoch < point.epoch:
                return None
            block = max(fits) if fits else min(blocks)
            why = "the deepest ready block" if fits else "no block was ready: the shallowest"
            return self._decision(block, epoch, why)
        if fits:
            return self._decision(max(fits), epoch, "the criterion fired")
        return self._at_cap(point, epoch, allowed)

    def _at_cap(self, point: FreezePoint, epoch: int, allowed, reason: str = "") -> dict | None:
        if epoch < self.crit.epoch_max:
            return None
        if point.block != AUTO:
            return self._decision(point.block, epoch, "epoch_max reached before it was ready")
        candidates = [b for b in range(self.crit.min_block, len(self.blocks))
                      if allowed(b, epoch)] or [self.crit.min_block]  # fmt: skip
        depth = self.ready_depth()
        ready = [b for b in candidates if b <= depth]
        block = max(ready) if ready else min(candidates)
        why = "epoch_max reached: " + (
            "the deepest ready block" if ready else "none ready, the shallowest allowed"
        )
        return self._decision(block, epoch, why + (f" ({reason})" if reason else ""))

    def _decision(self, block: int, epoch: int, why: str) -> dict:
        return {
            "block": int(block),
            "epoch": int(epoch),
            "why": why,
            "rule": self.crit.rule,
            "threshold": self.crit.threshold,
            "step": self.step,
            "ready_depth": self.ready_depth(),
            "last": [None if math.isnan(v) else v for v in self.rows[-1]["values"]]
            if self.rows
            else [],
        }

    def record(self) -> list[dict]:
        """The measurements as JSON can hold them (None where there was nothing to compare)."""
        return [{**r, "values": [None if math.isnan(v) else v for v in r["values"]]}
                for r in self.rows]  # fmt: skip

    # -- resuming ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "rows": self.rows, "sum": self._sum, "prev": self._prev,
                "epoch": self.epoch}  # fmt: skip

    def load(self, state: dict) -> None:
        self.step, self.rows, self._sum = state["step"], state["rows"], state["sum"]
        self._prev, self.epoch = state["prev"], state["epoch"]


class Watch:
    """The full-model run's :attr:`freezecache.training.train.TrainSpec.monitor`: measures every
    step
    (:class:`Monitor`), decides at epoch ends when ``deciding`` (an auto first point), and keeps
    both in the run state, so that a resumed run goes on from where the killed one was."""

    def __init__(self, monitor: Monitor, point: FreezePoint, allowed, deciding: bool,
                 extra: dict) -> None:  # fmt: skip
        self.monitor, self.point, self.allowed, self.deciding = monitor, point, allowed, deciding
        if "monitor" in extra:
            monitor.load(extra["monitor"])
        self.decision: dict | None = extra.get("decision")

    @property
    def stopped(self) -> bool:
        return self.deciding and self.decision is not None

    def after_backward(self) -> None:
        self.monitor.after_backward()

    def end_epoch(self, epoch: int, state) -> bool:
        self.monitor.epoch = epoch
        if self.deciding and self.decision is None:
            self.decision = self.monitor.decide(self.point, epoch, self.allowed)
            if self.decision is not None:
                state.extra["decision"] = self.decision
        state.extra["monitor"] = self.monitor.state()
        return self.stopped


def replay(rows: list[dict], crit: Criterion, point: FreezePoint, allowed) -> dict | None:
    """The decision a run whose monitor measured ``rows`` (:meth:`Monitor.record`) would have
    made under ``crit``'s threshold and patience (same rule and interval): training does not
    depend on the monitor, so one run to ``epoch_max`` answers for every threshold."""
    blocks = len(rows[0]["values"]) if rows else 0
    monitor = Monitor(_Blocks(blocks), crit)
    measured = [{**r, "values": [math.nan if v is None else v for v in r["values"]]}
                for r in rows]  # fmt: skip
    for epoch in range(1, crit.epoch_max + 1):
        monitor.rows = [r for r in measured if r["epoch"] <= epoch]
        monitor.step = monitor.rows[-1]["step"] if monitor.rows else 0
        decision = monitor.decide(point, epoch, allowed)
        if decision is not None:
            return decision
    return None


class _Blocks:
    """A model's stand-in for :func:`replay`: only the number of blocks matters."""

    def __init__(self, n: int) -> None:
        self.blocks = [None] * n


def allowed_from(plan: dict, epochs: int):
    """``allowed(block, epoch)`` from the plan's allowed blocks (:func:`freezecache.planning.plan.
    allowed_blocks`): the block's caches fit on the disk and every discard method pays back its
    one-off FLOPs within the epochs left after ``epoch``."""
    blocks = {int(b): v for b, v in plan["blocks"].items()}

    def allowed(block: int, epoch: int) -> bool:
        row = blocks.get(block)
        if row is None or not row["fits"]:
            return False
        return all(e <= epochs - epoch for e in row["flops_break_even_epochs"].values())

    return allowed


def with_points(cfg: Config, points: list[dict]) -> Config:
    """``cfg`` with concrete freeze points (``points``: {block, epoch} dicts)."""
    freeze = Freeze(points=[FreezePoint(**p) for p in points], criterion=cfg.freeze.criterion)
    return cfg.model_copy(update={"freeze": freeze})


def decided(cfg: Config, decision: dict) -> Config:
    """``cfg`` with its first point replaced by ``decision``'s block and epoch."""
    points = [{"block": decision["block"], "epoch": decision["epoch"]}]
    points += [{"block": p.block, "epoch": p.epoch} for p in cfg.points[1:]]
    return with_points(cfg, points)


def resolve(cfg: Config, seed: int) -> Config:
    """The config a stage after the shared run works with: an ``auto`` first point replaced by
    what that run decided for ``seed`` (its ``decision.json``)."""
    if not cfg.auto:
        return cfg
    path = STAGES["train_prefix"].path("decision", cfg, seed=seed)
    if not path.is_file():
        raise FreezecacheError(f"{path}: missing — run `dvc repro` to produce it")
    return decided(cfg, read_json(path))
