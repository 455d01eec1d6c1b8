"""The timm families the generic block view is tested on, measured at their tiny test sizes.

Prints one row per family (the table of tests/test_timm_models.py): timm name, blocks, layout,
prefix tokens, forward FLOPs per sample (FlopCounterMode), 2 x ptflops MACs / FlopCounterMode,
and the seconds create_model takes (structure trace and the forward check included). With
``--full``, also real-size models at 224 px (minutes on a small CPU). Run:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/timm_families.py [--full]
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from freezecache.accounting.flops import forward_flops_counter, forward_macs_ptflops
from freezecache.models import create_model

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_timm_models.py"
HEADER = "| family | timm name | px | blocks | layout | prefix | MFLOPs | 2*ptflops/counter | s |"
FULL_SIZE = (
    "convnext_tiny",
    "efficientnet_b0",
    "regnety_016",
    "vit_small_patch16_224",
    "eva02_small_patch14_224",
    "swin_tiny_patch4_window7_224",
)


def _families() -> dict:
    spec = importlib.util.spec_from_file_location("test_timm_models", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FAMILIES


def _row(family: str, name: str, img: int, options: dict) -> str:
    t0 = time.perf_counter()
    model = create_model(name, num_classes=10, img_size=img, **options)
    build = time.perf_counter() - t0
    flops = forward_flops_counter(model, torch.randn(1, 3, img, img))
    ratio = 2 * forward_macs_ptflops(model, (3, img, img)) / flops
    return (
        f"| {family} | {name} | {img} | {model.num_blocks} | {model.layout} | "
        f"{model.num_prefix_tokens} | {flops / 1e6:.2f} | {ratio:.3f} | {build:.2f} |"
    )


def main() -> None:
    create_model("resnet18", num_classes=10, layers=(1, 1, 1, 1))  # import timm before timing
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    print(HEADER)
    print("|---" * (HEADER.count("|") - 1) + "|")
    for family, (name, options, *_) in sorted(_families().items()):
        print(_row(family, name, 32, options))
    if "--full" in sys.argv[1:]:
        for name in FULL_SIZE:
            print(_row("full size", name, 224, {}))


if __name__ == "__main__":
    main()
