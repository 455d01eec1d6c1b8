"""CIFAR-10 / CIFAR-100 from the python-version tarballs of pickled batches (or extracted)."""

from __future__ import annotations

import io
import logging
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from freezecache.core.errors import FreezecacheError
from freezecache.data.base import Source, Split, array_split, check_labels, find_dataset

log = logging.getLogger(__name__)
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass(frozen=True)
class _CifarSpec:
    archive: str
    folder: str
    train: str  # regex of train batch file names
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR = {
    "cifar10": _CifarSpec(
        "cifar-10-python.tar.gz", "cifar-10-batches-py", r"data_batch_(\d+)", "test_batch",
        "batches.meta", b"labels", b"label_names", 10,
    ),
    "cifar100": _CifarSpec(
        "cifar-100-python.tar.gz", "cifar-100-python", r"(train)", "test",
        "meta", b"fine_labels", b"fine_label_names", 100,
    ),
}  # fmt: skip

# What a CIFAR pickle may reference: numpy array reconstruction and bytes. Anything else in a
# "dataset" pickle would be code execution, so it is refused.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    """Unpickler limited to plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # numpy 2 renamed numpy.core to numpy._core; pickles written by numpy 1 use the old name
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _unpickle(data: bytes, where: str) -> dict:
    """Load one CIFAR pickle (written by Python 2, hence encoding='bytes')."""
    try:
        obj = _DataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on garbage input
        raise FreezecacheError(
            f"{where} is not a readable CIFAR pickle ({exc}) — replace the archive"
        ) from exc
    if not isinstance(obj, dict):
        raise FreezecacheError(f"{where} holds a {type(obj).__name__}, not a CIFAR batch dict")
    # Python 2 pickles give bytes keys; a batch re-pickled by Python 3 has str keys
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _read_cifar_tar(path: Path, spec: _CifarSpec) -> dict[str, bytes]:
    """Member base name -> bytes for every batch/meta file of the tarball, in one pass."""
    wanted = re.compile(rf"(?:.*/)?({spec.train}|{spec.test}|{re.escape(spec.meta)})$")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                match = wanted.match(member.name)
                if member.isfile() and match:
                    found[match.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise FreezecacheError(
            f"{path} is not a complete tar.gz archive ({exc}) — download {spec.archive} again"
        ) from exc
    return found


def _read_cifar_dir(folder: Path, spec: _CifarSpec) -> tuple[dict[str, bytes], list[Path]]:
    """Base name -> bytes for the batch/meta files of an extracted CIFAR folder."""
    wanted = re.compile(rf"({spec.train}|{spec.test}|{re.escape(spec.meta)})$")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and wanted.fullmatch(p.name))
    return {p.name: p.read_bytes() for p in paths}, paths


def _cifar_batches(files: dict[str, bytes], pattern: str, where: Path, spec: _CifarSpec) -> Split:
    """Concatenate the batches whose names match pattern, in numeric order."""
    names = sorted((n for n in files if re.fullmatch(pattern, n)), key=_natural_key)
    if not names:
        raise FreezecacheError(
            f"{where} has no batch file matching {pattern!r} — it is not an intact "
            f"{spec.archive}; download it again"
        )
    images, labels = [], []
    for name in names:
        batch = _unpickle(files[name], _member(where, name))
        data = np.asarray(batch.get(b"data", np.empty(0)))
        ys = np.asarray(batch.get(spec.label_key, []), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (len(ys), 3 * 32 * 32):
            raise FreezecacheError(
                f"{_member(where, name)} has data {data.dtype}{data.shape} for {len(ys)} labels "
                f"(key {spec.label_key!r}), expected uint8 (N, 3072) — replace the archive"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # (N, 3072) -> (N, C, H, W), CIFAR is CHW
        labels.append(ys)
    return Split(np.concatenate(images), np.concatenate(labels))


def _member(where: Path, name: str) -> str:
    """How to name a file of the dataset: archive:member, or the path in an extracted folder."""
    return str(where / name) if where.is_dir() else f"{where}:{name}"


def _natural_key(name: str) -> list:
    """Sort data_batch_10 after data_batch_9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _cifar_classes(files: dict[str, bytes], where: Path, spec: _CifarSpec) -> list[str]:
    """Class names from the meta pickle; fixed names when the meta file is absent."""
    if spec.meta not in files:
        log.warning("%s has no %s; using generic class names", where, spec.meta)
        if spec.num_classes == 10:
            return list(CIFAR10_CLASSES)
        return [f"class_{i}" for i in range(spec.num_classes)]
    names = _unpickle(files[spec.meta], _member(where, spec.meta)).get(spec.names_key, [])
    if len(names) != spec.num_classes:
        raise FreezecacheError(
            f"{_member(where, spec.meta)} lists {len(names)} class names, expected "
            f"{spec.num_classes} — replace the archive"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _download_cifar(name: str, root: Path, spec: _CifarSpec) -> None:
    """Fetch the archive with torchvision; any failure becomes an instruction to place it."""
    from torchvision import datasets  # only needed here; keeps import of this module light

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=True, download=True)
    except Exception as exc:  # network errors come as URLError, OSError, RuntimeError, ...
        raise FreezecacheError(
            f"could not download {name} into {root} ({exc}) — put {spec.archive} in {root}"
        ) from exc


def open_cifar(name: str, root: Path | None, download: bool) -> Source:
    """CIFAR-10/100 from the tarball, a folder holding it, or the extracted folder."""
    spec = CIFAR[name]
    if root is None:
        raise FreezecacheError(
            f"data.root is not set for {name} — set it to the folder holding {spec.archive}"
        )
    root = Path(root)
    found = find_dataset(root, spec.archive, spec.folder, spec.test) if root.exists() else None
    if found is None and download:
        target = root.parent if root.name.endswith((".tar.gz", ".tgz")) else root
        _download_cifar(name, target, spec)
        found = find_dataset(target, spec.archive, spec.folder, spec.test)
    if found is None:
        what = "does not exist" if not root.exists() else f"holds no {spec.archive}"
        raise FreezecacheError(
            f"{root} {what} — put {spec.archive} (or its extracted {spec.folder}/) there, "
            "or set data.download: true"
        )
    if found.is_file():
        files, read = _read_cifar_tar(found, spec), [(found.name, found)]
    else:
        files, paths = _read_cifar_dir(found, spec)
        read = [(p.name, p) for p in paths]
    train = _cifar_batches(files, spec.train, found, spec)
    test = _cifar_batches(files, spec.test, found, spec)
    classes = _cifar_classes(files, found, spec)
    check_labels(train.labels, len(classes), found)
    check_labels(test.labels, len(classes), found)
    return Source(
        train=array_split(train.images, train.labels),
        test=array_split(test.images, test.labels),
        classes=classes,
        channels=3,
        files=read,
    )
