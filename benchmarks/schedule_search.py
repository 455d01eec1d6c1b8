"""Choose a freeze schedule on the validation split (never the test set).

FreezeOut is the cheap proxy: it freezes exactly what a discard method freezes, without a
cache, so its validation accuracy against Normal's says what a schedule costs in accuracy
before any cache is built. For each candidate schedule this trains FreezeOut from the starting
weights and prints validation accuracy next to Normal's and the schedule's FLOPs and memory
saving for Discard & Aug. (the pipeline's own accounting). Run it where `dvc repro pretrain`
has run for the profile to search:

    python benchmarks/schedule_search.py --schedule 3@1,6@2 --schedule 3@1 --schedule 3@2,6@4
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from freezecache.accounting.costs import method_costs
from freezecache.config import parse_config
from freezecache.core.yamlio import load_yaml
from freezecache.steps.context import Context
from freezecache.steps.run import image_spec
from freezecache.tooling.results import stamp
from freezecache.training.schedule import phases
from freezecache.training.train import Trainer


def _points(text: str) -> list[dict]:
    """'3@1,6@2' -> freeze points, in order (each continues from the one before)."""
    pairs = [tuple(int(v) for v in part.split("@")) for part in text.split(",")]
    return [{"block": b, "epoch": e} for b, e in pairs]


def val_accuracy(cfg, method: str, seed: int) -> tuple[float, dict]:
    """Validation accuracy at the end of ``method``, trained from the starting weights."""
    ctx = Context(cfg, seed, "baseline", method=method)
    model = ctx.new_model()
    trainer = Trainer(model, cfg.train, seed=seed, device=ctx.device)
    for ph in phases(cfg, method):
        trainer.fit(dataclasses.replace(image_spec(ctx, model, ph), evaluate=lambda: {}))
    costs = method_costs(ctx, model, method, trainer.state.history)
    return 100 * ctx.evaluate(model)["val_acc"], costs


def main(
    schedule: list[str] = typer.Option(..., help="block@epoch,... (repeatable)"),
    params: Path = typer.Option(Path("params.yaml")),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="also write the table to this Markdown file"),
) -> None:
    raw = load_yaml(params)
    base = parse_config(raw, str(params))
    normal, normal_costs = val_accuracy(base, "normal", seed)
    n = len(Context(base, seed, "baseline", method="normal").train)
    lines = [
        f"Validation accuracy (seed {seed}, {n} training images, {base.train.epochs} epochs): "
        f"Normal {normal:.2f}%",
        "",
        "| schedule (block@epoch) | FreezeOut val. acc. | vs Normal | FLOPs saved (Discard & Aug.) "
        "| avg. memory saved |",
        "|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for text in schedule:
        cfg = parse_config({**raw, "freeze": {"points": _points(text)}}, str(params))
        acc, _ = val_accuracy(cfg, "freezeout", seed)
        ctx = Context(cfg, seed, "baseline", method="normal")
        model = ctx.new_model()
        discard = method_costs(ctx, model, "discard_aug", [])
        flops = 1 - discard.train_flops / normal_costs.train_flops
        mem = 1 - discard.avg_memory_mb / normal_costs.avg_memory_mb
        gap = acc - normal
        lines.append(f"| {text} | {acc:.2f} | {gap:+.2f} | {100 * flops:.1f}% | {100 * mem:.1f}% |")
        print(lines[-1], flush=True)
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
        stamp(__file__, [out], params)


if __name__ == "__main__":
    typer.run(main)
