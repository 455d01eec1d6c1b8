"""One torchrun worker of tests/test_distributed.py: runs the method's steps of a params file.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py \\
        --params P --dump DIR [--method M] [--kill-rank R --kill-epoch E --kill-step S]

Each rank saves the weights and momentum it ends every training step with under DIR
(``<stage name>.rank<r>.pt``), so a test can compare ranks. ``--kill-*`` makes rank R kill
itself (SIGKILL) at step S of epoch E (0-based) of the first training stage that reaches it,
on torchrun's first attempt only, so a restarted job runs through.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

from freezecache import distributed
from freezecache.config import load_config
from freezecache.guard import setup_logging
from freezecache.steps import context
from freezecache.steps.baselines import baseline, train_prefix
from freezecache.steps.cache import cache_point
from freezecache.steps.pretrain import pretrain
from freezecache.steps.suffix import train_suffix
from freezecache.train import Trainer


def _dump_on_finish(folder: Path) -> None:
    finish = context.Context.finish

    def dumping(self, trainer, model, costs, *, final=False):
        finish(self, trainer, model, costs, final=final)
        state = {"model": model.state_dict(), "momentum": trainer.state.momentum}
        torch.save(state, folder / f"{self.name}.rank{distributed.rank()}.pt")

    context.Context.finish = dumping


def _kill_at(rank: int, epoch: int, step: int) -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    original = Trainer.step

    def step_or_die(self, *args, **kwargs):
        if self.state.epoch != epoch:
            self._steps_seen = 0
        elif distributed.rank() == rank:
            self._steps_seen = getattr(self, "_steps_seen", 0) + 1
            if self._steps_seen == step + 1:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    Trainer.step = step_or_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--method", default="discard_aug")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-epoch", type=int, default=1)
    parser.add_argument("--kill-step", type=int, default=1)
    opts = parser.parse_args()
    setup_logging()
    opts.dump.mkdir(parents=True, exist_ok=True)
    _dump_on_finish(opts.dump)
    if opts.kill_rank is not None:
        _kill_at(opts.kill_rank, opts.kill_epoch, opts.kill_step)
    cfg = load_config(opts.params)
    seed = cfg.seeds[0]
    pretrain(cfg)
    train_prefix(cfg, seed)
    if opts.baseline:
        baseline(cfg, seed, opts.baseline)
    for p in cfg.points:
        cache_point(cfg, seed, opts.method, p.block)
        train_suffix(cfg, seed, opts.method, p.block)


if __name__ == "__main__":
    main()
