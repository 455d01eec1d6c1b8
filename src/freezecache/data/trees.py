"""Image files in a folder or a zip, decoded with Pillow on demand (Tiny-ImageNet, imagefolder)."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import LazySplit
from freezecache.data.images import open_image


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


def tree_split(tree: DirTree | ZipTree, names: list[str], labels: list[int]) -> LazySplit:
    """A split of image files in a tree, each decoded upright on request (Pillow images)."""

    def decode(idx: np.ndarray) -> Iterator:
        for i in idx:
            yield open_image(tree.read(names[i]), tree.where(names[i]))

    return LazySplit(labels=np.asarray(labels, dtype=np.int64), decode=decode)


def tree_files(tree: DirTree | ZipTree, path: Path, names: list[str]) -> list[tuple[str, Path]]:
    """Files to fingerprint: the archive itself, or every file read from the folder."""
    if isinstance(tree, ZipTree):
        return [(path.name, path)]
    return [(n, tree.root / n) for n in names]


def text(tree: DirTree | ZipTree, name: str) -> str:
    """A small text file of the tree."""
    return tree.read(name).decode("utf-8", errors="replace")
