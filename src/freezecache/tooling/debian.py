"""The embedded default dataset: Debian's `dataset-fashion-mnist` package."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.data.fashion_mnist import FASHION_MNIST_FILES, FASHION_MNIST_ROOT

PACKAGE = "dataset-fashion-mnist"


def _present(root: Path) -> bool:
    return all((root / f).is_file() for f in FASHION_MNIST_FILES)


def ensure_fashion_mnist(root: Path = FASHION_MNIST_ROOT) -> str:
    """Installs the Debian package when the files are missing and we may (root + apt-get)."""
    if _present(root):
        return f"Fashion-MNIST: present in {root}"
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise FreezecacheError(
            f"Fashion-MNIST not found in {root} — run `sudo apt-get install {PACKAGE}` "
            "or set data.root in params.yaml to a folder with the four IDX .gz files"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "-qq", "update"], [apt, "install", "-y", "-qq", PACKAGE]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise FreezecacheError(
                f"`{' '.join(cmd[1:])}` failed: {last[0]} — install {PACKAGE} by hand"
            )
    if not _present(root):
        raise FreezecacheError(
            f"{PACKAGE} installed but {root} lacks the IDX files — set data.root"
        )
    return f"Fashion-MNIST: installed {PACKAGE} into {root}"
