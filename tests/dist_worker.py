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

from freezecache.config import load_config
from freezecache.pipeline import STAGES
from freezecache.pipeline.guard import setup_logging
from freezecache.steps import run as stage_run
from freezecache.steps.baselines import baseline, train_prefix
from freezecache.steps.cache import cache_point
from freezecache.steps.pretrain import pretrain
from freezecache.steps.suffix import train_suffix
from freezecache.training import distributed
from freezecache.training.train import Trainer


def _dump_on_finish(folder: Path) -> None:
    finish = stage_run.Run.finish

    def dumping(self, costs, *, final=False):
        finish(self, costs, final=final)
        state = {"model": self.model.state_dict(), "momentum": self.state.momentum}
        torch.save(state, folder / f"{self.ctx.name}.rank{distributed.rank()}.pt")

    stage_run.Run.finish = dumping


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
    import faulthandler

    faulthandler.register(signal.SIGUSR1)
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
    seed, m = cfg.seeds[0], opts.method
    # As DVC would, a restarted job skips the stages that finished: rerunning one rewrites its
    # outputs (torch.save's bytes differ per process), and a checkpoint resumes only when its
    # inputs' bytes are the same.
    _unless_done(cfg, "pretrain", "state", lambda: pretrain(cfg))
    _unless_done(cfg, "train_prefix", "state", lambda: train_prefix(cfg, seed), seed=seed)
    if opts.baseline:
        run = lambda: baseline(cfg, seed, opts.baseline)  # noqa: E731
        _unless_done(cfg, "baseline", "state", run, seed=seed, method=opts.baseline)
    for p in cfg.points:
        _point(cfg, seed, m, p)


def _point(cfg, seed: int, m: str, p) -> None:
    item = {"seed": seed, "method": m, "p": p}
    _unless_done(cfg, "cache", "stats", lambda: cache_point(cfg, seed, m, p.i), **item)
    _unless_done(cfg, "train_suffix", "state", lambda: train_suffix(cfg, seed, m, p.i), **item)


def _unless_done(cfg, stage: str, role: str, run, **item) -> None:
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if not (restarted and STAGES[stage].path(role, cfg, **item).is_file()):
        run()


if __name__ == "__main__":
    main()
