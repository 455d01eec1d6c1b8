"""Stage tradeoffs: {fp32, bf16} x {grad checkpointing off, on} x {full model, suffix after the
last freeze point}, measured side by side in one run."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline import STAGES
from freezecache.pipeline.guard import Params, stage
from freezecache.planning.tradeoffs import measure_tradeoffs, render_markdown, write
from freezecache.training.decide import resolve


def main(
    params: Params = Path("params.yaml"),
    # Fewer than the library's 5 + 2: bf16 steps on a CPU without native bf16 take ~10x longer
    # than fp32 ones, and the default profile's stage should stay near 90 s on 2 cores.
    steps: int = typer.Option(3, help="timed steps per configuration (the median is reported)"),
    warmup: int = typer.Option(1, help="untimed rounds before timing (the first counts FLOPs)"),
) -> None:
    with stage(params) as cfg:
        cfg = resolve(cfg, cfg.seeds[0])  # the first seed's freeze points, decided or given
        weights = STAGES["train_prefix"].path("state", cfg, seed=cfg.seeds[0])
        rows = measure_tradeoffs(cfg, steps=steps, warmup=warmup, weights=weights)
        me = STAGES["tradeoffs"]
        write(rows, me.path("json", cfg), me.path("md", cfg))
        print(render_markdown(rows))


if __name__ == "__main__":
    typer.run(main)
