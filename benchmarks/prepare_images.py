"""How long `prepare` takes on a folder of JPEGs, and how much of it is the scan.

Writes ``--images`` JPEGs (default 1,000) of 500x375, the size of a typical web photo (and of
ImageNet's median), into five class folders: smooth colour fields with sensor-like noise, saved at
quality 90, so that each holds about as many bytes per pixel as a photo and decodes as slowly.
Then prepares them at ``--img-size`` px (data.resize: crop) three times in one process:

1. scan alone, cold (every file read, hashed, decoded at 1/8 scale);
2. the whole prepare, cold (scan, then every image decoded, resized and cropped, then written);
3. the whole prepare again, warm (the scan remembered from run 2: only stat calls).

Prints seconds per 1,000 images, wall and CPU (the process's own: what it costs on a busy
machine too), and the scan's share of a cold prepare; timm is imported before timing (a
one-off second or two).

    python benchmarks/prepare_images.py [--images 1000] [--img-size 224] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from freezecache.data import Fit, prepare, scan_folder

CLASSES = ("a", "b", "c", "d", "e")


def photo_like(rng: np.random.Generator, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth colour field (a few blobs) with per-pixel noise: a photo's JPEG entropy."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(40, 200, 3)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 200)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int) -> int:
    """n JPEGs spread over the classes; returns the bytes written."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        path = root / CLASSES[i % len(CLASSES)] / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(rng).save(path, quality=90)
        total += path.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--keep", type=Path, help="build the folder here and keep it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fc-prepare-bench-"))
    root = args.keep or work / "images"
    try:
        if not root.is_dir():
            size = make_folder(root, args.images)
            print(
                f"{args.images} JPEGs of 500x375 in {root}: {size / args.images / 1e3:.0f} kB each"
            )
        per = 1000 / args.images
        Fit(args.img_size, 3).image(Image.new("RGB", (8, 8)))  # timm imported before timing
        opts = dict(img_size=args.img_size, channels=3, train_size=None, test_size=None, seed=0)
        timed = {
            "scan alone, cold": lambda: scan_folder(root),
            f"prepare at {args.img_size} px, cold": lambda: prepare(
                "imagefolder", root, work / "out1", cache_dir=work / "ckpt", **opts
            ),
            f"prepare at {args.img_size} px, warm": lambda: prepare(
                "imagefolder", root, work / "out2", cache_dir=work / "ckpt", **opts
            ),
        }
        got = {}
        for name, fn in timed.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            got[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        print(
            f"seconds per 1,000 images (wall; CPU of this process), load {os.getloadavg()[0]:.1f}"
        )
        for name, (wall, cpu) in got.items():
            print(f"  {name:<28} {wall * per:7.2f}  {cpu * per:7.2f}")
        scan, cold = got["scan alone, cold"], got[f"prepare at {args.img_size} px, cold"]
        print(f"the scan's share of a cold prepare: {100 * scan[0] / cold[0]:.0f}% of the wall "
              f"time, {100 * scan[1] / cold[1]:.0f}% of the CPU time")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
