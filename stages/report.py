"""Stage report: the paper-style table of every method (mean ± std over seeds) and the caches."""

from pathlib import Path

import typer

from freezecache.cli import stage
from freezecache.report import write_report


def main(params: Path = Path("params.yaml")) -> None:
    with stage(params) as cfg:
        report = write_report(cfg)
        for m, r in report["methods"].items():
            print(
                f"{m:14s} acc {r['accuracy_mean']:.2f}  avg mem {r['avg_memory_mb']:.1f} MB  "
                f"flops {r['train_flops']:.3g}"
            )


if __name__ == "__main__":
    typer.run(main)
