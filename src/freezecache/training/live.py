"""Per-epoch metrics through DVCLive: the curves `dvc plots` draws and each stage's metrics.json.

A stage's DVCLive folder is one of its DVC outputs, which DVC deletes before rerunning the
stage, so resuming cannot rely on DVCLive's own ``resume=True`` (it reads the folder it would
continue). The run state carries the history instead: a stage logs the method's whole history
so far, epoch by epoch, and a resumed stage replays the epochs its checkpoint holds before
training on, which gives the same files as an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

# What goes into the curves and metrics.json: numbers only, few per stage.
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s")


class EpochLog:
    """Logs epoch rows (dicts from :class:`freezecache.training.train.Trainer`) to a DVCLive
    folder."""

    def __init__(self, folder: Path, history: list[dict], curves: bool = True) -> None:
        """``curves``: also write DVCLive's plots/ files (a stage that declares no plots
        output must not, or files DVC does not track appear under a tracked folder)."""
        from dvclive import Live

        self.curves = curves
        logging.getLogger("dvclive").setLevel(logging.ERROR)  # no git/DVC repo chatter
        self.live = Live(
            dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None
        )
        for row in history:
            self.log(row)

    def log(self, row: dict) -> None:
        """One epoch: DVCLive's step is the epoch number (1-based, global over the run)."""
        self.live.step = int(row["epoch"])
        for name in CURVES:
            if row.get(name) is not None:
                self.live.log_metric(name, float(row[name]), plot=self.curves)
        self.live.make_summary()

    def finish(self, summary: dict[str, float]) -> None:
        """Adds the stage's final numbers (test accuracy, wall time) to metrics.json."""
        self.live.summary.update({k: v for k, v in summary.items() if v is not None})
        self.live.make_summary()
