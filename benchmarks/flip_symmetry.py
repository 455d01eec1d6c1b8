"""How mirror-symmetric is each Fashion-MNIST class? (for choosing the transfer class split)

For each class of the training set, prints the Pearson correlation between the class-mean
image and its left-right mirror, the mean of the same correlation taken per image, and the
share of images that correlate better with the class mean than their mirror does. A class
whose mean is its own mirror gains nothing new from horizontal flips; a class whose images all
face one way (shoes) sees flipped images that never occur in its test set.

    PYTHONPATH=src python benchmarks/flip_symmetry.py [--root DIR] [--split train|test]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from freezecache.data import load_source
from freezecache.tooling.results import stamp


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b (rows of pixels)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), den, out=np.ones(len(a)), where=den > 0)


def class_symmetry(images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per class: mean-vs-mirror correlation, mean per-image one, share facing the mean's way."""
    rows = []
    for c in np.unique(labels):
        x = images[labels == c, 0].astype(np.float64)  # (n, H, W), one channel
        mean = x.mean(axis=0)
        flat, mirrored = x.reshape(len(x), -1), x[:, :, ::-1].reshape(len(x), -1)
        to_mean = np.broadcast_to(mean.ravel(), flat.shape)
        mean_vs_mirror = _corr_rows(mean.reshape(1, -1), mean[:, ::-1].reshape(1, -1))[0]
        facing = _corr_rows(flat, to_mean) > _corr_rows(mirrored, to_mean)
        rows.append(
            {
                "class": int(c),
                "n": len(x),
                "mean_vs_mirror": float(mean_vs_mirror),
                "image_vs_mirror": float(_corr_rows(flat, mirrored).mean()),
                "facing_mean": float(facing.mean()),
            }
        )
    return rows


def main(
    root: Path = typer.Option(None, help="Fashion-MNIST folder (default: Debian's)"),
    split: str = typer.Option("train", help="train or test"),
    out: Path = typer.Option(None, help="also write the table to this Markdown file"),
) -> None:
    if split not in ("train", "test"):
        raise typer.BadParameter(f"--split must be train or test, got {split!r}")
    train, test, classes = load_source("fashion_mnist", str(root) if root else None)
    data = train if split == "train" else test
    rows = class_symmetry(data.images, data.labels)
    lines = [
        f"Fashion-MNIST {split} ({len(data)} images): correlation with the left-right mirror",
        "",
        "| id | class | n | class mean vs mirror | image vs mirror (mean) "
        "| facing the mean's way |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['class']} | {classes[r['class']]} | {r['n']} | {r['mean_vs_mirror']:.3f} "
            f"| {r['image_vs_mirror']:.3f} | {r['facing_mean']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        stamp(__file__, [out])


if __name__ == "__main__":
    typer.run(main)
