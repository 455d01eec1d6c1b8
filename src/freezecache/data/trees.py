"""Image files in a folder or a zip, decoded with PIL on demand (Tiny-ImageNet, imagefolder)."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit


class DirTree:
    """Files under a folder, addressed by '/'-separated relative names."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def read(self, name: str) -> bytes:
        path = self.root / name
        if not path.is_file():
            raise FreezecacheError(f"{path} is missing — restore the dataset folder")
        return path.read_bytes()

    def where(self, name: str) -> str:
        return str(self.root / name)

    def close(self) -> None:
        pass


class ZipTree:
    """Members of a zip under one top folder, addressed by names relative to it."""

    def __init__(self, path: Path, folder: str) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise FreezecacheError(
                f"{path} is not a complete zip archive ({exc}) — download it again"
            ) from exc
        tops = {n.split("/", 1)[0] for n in self._zip.namelist() if "/" in n}
        # the official zip nests everything under tiny-imagenet-200/; a re-zipped one may not
        self.prefix = f"{folder}/" if folder in tops else ""

    def names(self) -> list[str]:
        n = len(self.prefix)
        members = self._zip.namelist()
        return sorted(m[n:] for m in members if m.startswith(self.prefix) and not m.endswith("/"))

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(self.prefix + name)
        except KeyError as exc:
            raise FreezecacheError(
                f"{self.path} has no member {self.prefix + name} — download the archive again"
            ) from exc
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise FreezecacheError(
                f"{self.path}: member {self.prefix + name} is corrupt ({exc}) — download again"
            ) from exc

    def where(self, name: str) -> str:
        return f"{self.path}:{self.prefix + name}"

    def close(self) -> None:
        self._zip.close()


def decode_image(data: bytes, where: str, channels: int) -> np.ndarray:
    """Decode an image file to uint8 (C, H, W) with C = channels (1 or 3)."""
    from PIL import Image  # PIL comes with torchvision; only image trees need it

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FreezecacheError(
            f"{where} is not a readable image ({exc}) — remove or replace it"
        ) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H,W,C) -> (C,H,W)


def is_grayscale(path: Path) -> bool:
    """Whether an image file is single-channel; reads only its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode in ("1", "L", "I", "I;16", "F")
    except OSError:
        return False  # undecodable files are reported when decoded


def tree_split(
    tree: DirTree | ZipTree, names: list[str], labels: list[int], channels: int
) -> LazySplit:
    """A split of image files in a tree, decoded to `channels` on request."""

    def decode(idx: np.ndarray) -> list[np.ndarray]:
        return [decode_image(tree.read(names[i]), tree.where(names[i]), channels) for i in idx]

    return LazySplit(labels=np.asarray(labels, dtype=np.int64), decode=decode)


def tree_files(tree: DirTree | ZipTree, path: Path, names: list[str]) -> list[tuple[str, Path]]:
    """Files to fingerprint: the archive itself, or every file read from the folder."""
    if isinstance(tree, ZipTree):
        return [(path.name, path)]
    return [(n, tree.root / n) for n in names]


def text(tree: DirTree | ZipTree, name: str) -> str:
    """A small text file of the tree."""
    return tree.read(name).decode("utf-8", errors="replace")
