"""What verifying a state file costs (issue 33): loading the default profile's largest state and
checkpoint with their digest checked (``freezecache.core.states.load_state``) against a plain
``torch.load`` of the same file, and saving them canonically with a digest against a plain
``torch.save``, side by side in one run (median of ``--repeats``, alternating).

The files are built with the default profile's shapes: its model (resnet20 on 1x28x28, five
classes) with SGD momentum for every parameter, a history of its 8 epochs, the test set's 5000
per-image bits; the checkpoint adds a criterion monitor with a full weight snapshot (the
``weight_change`` rule's, the largest any rule keeps). ``--file`` adds existing files, e.g. a
run's ``runs/s0/prefix/state.pt``.

    python benchmarks/state_files.py [--repeats 30] [--file PATH ...]
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer

from freezecache.accounting.stats import pack_correct
from freezecache.config import load_config
from freezecache.core.states import canonical, content_digest, load_state, save_state
from freezecache.steps.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def default_states() -> dict[str, dict]:
    """The default profile's largest published state and checkpoint, as dicts."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    meta = {"num_classes": 5, "channels": 1, "img_size": cfg.data.img_size}
    model = build_model(cfg.model, meta)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    momentum = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    history = [
        {"epoch": e, "state": "full" if e == 1 else "discard", "position": 0 if e == 1 else 3,
         "lr": 0.01, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.95,
         "epoch_time_s": 4.5, "samples_per_s": 880.0, "data_wait_frac": 0.01,
         "cuda_peak_mb": 0.0}
        for e in range(1, cfg.train.epochs + 1)
    ]  # fmt: skip
    correct = np.random.default_rng(0).random(5000) < 0.95
    test = {"test_loss": 0.2, "test_acc": 0.95, "correct": pack_correct(correct), "images": 5000}
    state = {"model": weights, "momentum": momentum, "epoch": cfg.train.epochs,
             "history": history, "extra": {"test": test}}  # fmt: skip
    snapshot = [p.detach().float().flatten().clone() for p in model.parameters()]
    rows = [{"step": 20 * i, "epoch": 1, "values": [0.1] * model.num_blocks} for i in range(4)]
    monitor = {"step": 63, "rows": rows, "sum": [0.0] * model.num_blocks, "prev": snapshot,
               "epoch": 1}  # fmt: skip
    checkpoint = {**state, "epoch": 1, "history": history[:1], "extra": {"monitor": monitor}}
    return {"state": state, "checkpoint": checkpoint}


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(name: str, value: dict | None, path: Path, repeats: int) -> dict:
    """Load and save times of one state, plain and verified, alternating."""
    if value is not None:
        save_state(value, path)
    plain_ms, checked_ms = [], []
    for _ in range(repeats):  # alternating: a drifting machine load hits both alike
        plain_ms.append(_median_ms(lambda: torch.load(path, weights_only=False), 1))
        checked_ms.append(_median_ms(lambda: load_state(path), 1))
    row = {
        "file": name,
        "mb": path.stat().st_size / 1e6,
        "load_ms": statistics.median(plain_ms),
        "load_checked_ms": statistics.median(checked_ms),
    }
    loaded = load_state(path)
    row["digest_ms"] = _median_ms(lambda: content_digest(loaded), repeats)
    if value is not None:
        row["save_ms"] = _median_ms(lambda: torch.save(value, io.BytesIO()), repeats)
        row["save_checked_ms"] = _median_ms(lambda: save_state(value, path), repeats)
        row["canonical_ms"] = _median_ms(lambda: canonical(value), repeats)
    return row


def main(
    repeats: int = typer.Option(30, help="loads and saves timed per file"),
    file: list[Path] = typer.Option([], help="also time these state files (verified ones)"),
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure(name, value, Path(tmp) / f"{name}.pt", repeats)
            for name, value in default_states().items()
        ]
        rows += [measure(str(f), None, f, repeats) for f in file]
    print(f"{'file':<40} {'MB':>6} {'load':>8} {'checked':>8} {'added':>8} {'ratio':>6} "
          f"{'save':>8} {'checked':>8}")  # fmt: skip
    for r in rows:
        plain, checked = r["load_ms"], r["load_checked_ms"]
        save = f"{r['save_ms']:>6.1f}ms {r['save_checked_ms']:>6.1f}ms" if "save_ms" in r else ""
        print(
            f"{r['file']:<40} {r['mb']:>6.2f} {plain:>6.1f}ms {checked:>6.1f}ms "
            f"{checked - plain:>6.1f}ms {checked / plain:>6.2f} {save}"
        )
    print("load: torch.load; checked: load_state (the same load, then the content digest); "
          "save: torch.save to memory; checked: save_state (canonical copy, digest, atomic "
          "write)")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
