"""Stage report: the paper-style tables over methods and seeds, the caches, the headline metrics."""

# isort: off
import _env  # noqa: F401  (first: without the venv, one line instead of a traceback)
# isort: on

from pathlib import Path

import typer

from freezecache.pipeline.guard import Params, stage
from freezecache.reporting.provenance import record_stage
from freezecache.reporting.report import write_report


def main(params: Params = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        report = write_report(cfg)
        # how long the whole pipeline took: what `make results` expects it to take next time
        record_stage("report", cfg, params, duration_s=report["stage_seconds"])
        for m, r in report["methods"].items():
            print(
                f"{m:14s} acc {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}  "
                f"avg mem {r['avg_memory_mb']:.1f} MB  flops {r['train_flops']:.3g}"
            )


if __name__ == "__main__":
    typer.run(main)
