"""Fine-tune a timm model from a cache of its frozen prefix, in a plain PyTorch loop (flags: see
the end). Random weights unless --weights names a local file (nothing is downloaded); data:
Fashion-MNIST as `make setup` installs it (Debian's dataset-fashion-mnist)."""

import argparse
import gzip
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import freezecache as fc


def fashion(split: str, n: int, root=Path("/usr/share/datasets/fashion-mnist")) -> TensorDataset:
    """The first ``n`` images of a Fashion-MNIST split ("train", "t10k"), normalised."""
    x, y = (np.frombuffer(gzip.open(root / f"{split}-{kind}.gz").read()[skip:], np.uint8)
            for kind, skip in (("images-idx3-ubyte", 16), ("labels-idx1-ubyte", 8)))  # fmt: skip
    x = torch.tensor(x.reshape(-1, 1, 28, 28)[:n]).float() / 255
    return TensorDataset((x - 0.286) / 0.353, torch.tensor(y[:n].astype(np.int64)))


def accuracy(prefix, suffix, data: TensorDataset) -> float:  # the whole model, raw images
    prefix.eval(), suffix.eval()
    with torch.no_grad():
        return sum((suffix(prefix(x)).argmax(1) == y).sum().item()
                   for x, y in DataLoader(data, 500)) / len(data)  # fmt: skip


def main(a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = fc.load_model(a.model, num_classes=10, in_chans=1, img_size=28, weights=a.weights)
    prefix, suffix = fc.split(model, a.block)
    prefix.requires_grad_(False)
    train, test = fashion("train", a.samples), fashion("t10k", max(a.samples // 4, 100))
    with tempfile.TemporaryDirectory() as tmp:  # the prefix runs once, here
        info = fc.build_cache(prefix.eval(), train, Path(tmp) / "c.h5", flip_channels=8)
        print(f"cache: {info.samples} x {info.shape}, {info.ratio:.3f} of float32")
        features = fc.CachedFeatures(info.path, flip_p=0.5, crop_pad=1, noise_std=0.05)
        loader = DataLoader(features, batch_size=64, shuffle=True, num_workers=a.workers,
                            pin_memory=torch.cuda.is_available())  # fmt: skip
        opt = torch.optim.SGD(suffix.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for epoch in range(a.epochs):
            suffix.train()
            for x, y in loader:
                loss = F.cross_entropy(suffix(x), y)
                opt.zero_grad(), loss.backward(), opt.step()
            print(f"epoch {epoch + 1}: test accuracy {accuracy(prefix, suffix, test):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag, value in (("model", "resnet18"), ("block", 2), ("samples", 4000), ("epochs", 3),
                        ("workers", 2), ("weights", None)):  # fmt: skip
        p.add_argument(f"--{flag}", default=value, type=type(value) if value else None)
    main(p.parse_args())
