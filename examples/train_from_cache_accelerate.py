"""The same fine-tuning inside Hugging Face Accelerate: one process, or several with
`accelerate launch` (the cache is built once, each rank encoding its share; the DataLoader and
the suffix are the ones Accelerate prepares)."""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from train_from_cache import accuracy, fashion

import freezecache as fc


def main(a: argparse.Namespace) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = fc.load_model(a.model, num_classes=10, in_chans=1, img_size=28, weights=a.weights)
    prefix, suffix = fc.split(model, a.block)
    prefix.requires_grad_(False)
    train, test = fashion("train", a.samples), fashion("t10k", max(a.samples // 4, 100))
    with tempfile.TemporaryDirectory() as tmp:
        path = broadcast_object_list([tmp])[0]  # rank 0's folder (one machine)
        info = fc.build_cache(prefix.eval(), train, Path(path) / "c.h5", flip_channels=8)
        features = fc.CachedFeatures(info.path, flip_p=0.5, crop_pad=1, noise_std=0.05)
        loader = DataLoader(features, batch_size=64, shuffle=True, num_workers=a.workers)
        opt = torch.optim.SGD(suffix.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        suffix, opt, loader = accelerator.prepare(suffix, opt, loader)
        for epoch in range(a.epochs):
            suffix.train()
            for x, y in loader:
                loss = F.cross_entropy(suffix(x), y)
                opt.zero_grad()
                accelerator.backward(loss)
                opt.step()
            acc = accuracy(prefix.to(accelerator.device), accelerator.unwrap_model(suffix), test)
            accelerator.print(f"epoch {epoch + 1}: test accuracy {acc:.3f}")
        accelerator.wait_for_everyone()  # no rank leaves the cache's folder before the others


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag, value in (("model", "resnet18"), ("block", 2), ("samples", 4000), ("epochs", 3),
                        ("workers", 2), ("weights", None)):  # fmt: skip
        p.add_argument(f"--{flag}", default=value, type=type(value) if value else None)
    main(p.parse_args())
