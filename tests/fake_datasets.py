"""Builders of tiny datasets in their published formats, for the freezecache.data tests."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from freezecache.data import CIFAR10_CLASSES


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX gzip: 00 00 08 <ndim>, big-endian uint32 dims, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Fashion-MNIST-like folder: 10 classes in turn, image value = 10 * label + 5."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 10 + 5, 28 * 28).reshape(n, 28, 28)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> tuple[bytes, dict]:
    """One pickled CIFAR batch (bytes keys, as Python 2 wrote them) and its content."""
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(i % num_classes) for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2), batch


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add bytes as a file member of a tar archive."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_cifar10(folder: Path) -> tuple[Path, dict]:
    """cifar-10-python.tar.gz with data_batch_1, data_batch_2 (12 each), test_batch (10), meta."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-10-python.tar.gz"
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for seed, (name, n) in enumerate(
            [("data_batch_1", 12), ("data_batch_2", 12), ("test_batch", 10)]
        ):
            raw, batches[name] = cifar_batch(n, 10, b"labels", seed)
            add_member(tar, f"cifar-10-batches-py/{name}", raw)
        names = [c.encode() for c in CIFAR10_CLASSES]
        add_member(
            tar,
            "cifar-10-batches-py/batches.meta",
            pickle.dumps({b"label_names": names}, protocol=2),
        )
    return path, batches


def make_cifar100(folder: Path) -> Path:
    """cifar-100-python.tar.gz with train (20), test (10), meta of 100 fine names."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for seed, (name, n) in enumerate([("train", 20), ("test", 10)]):
            raw, _ = cifar_batch(n, 100, b"fine_labels", seed)
            add_member(tar, f"cifar-100-python/{name}", raw)
        fine = [f"fine{i}".encode() for i in range(100)]
        meta = {b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20}
        add_member(tar, "cifar-100-python/meta", pickle.dumps(meta, protocol=2))
    return path


WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: labels follow sorted wnids
COLOURS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def jpeg(colour: tuple[int, int, int], mode: str = "RGB") -> bytes:
    """A 64x64 solid-colour JPEG."""
    img = Image.new("RGB", (64, 64), colour).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tiny_imagenet(folder: Path) -> Path:
    """tiny-imagenet-200.zip: 3 wnids x 4 train JPEGs (one grayscale), 6 val JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-imagenet-200.zip"
    top = "tiny-imagenet-200"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/wnids.txt", "\n".join(WNIDS) + "\n")
        for w in WNIDS:
            z.writestr(f"{top}/train/{w}/{w}_boxes.txt", "")
            for i in range(4):
                mode = "L" if (w, i) == ("n01", 0) else "RGB"  # the real set has grayscale JPEGs
                z.writestr(f"{top}/train/{w}/images/{w}_{i}.JPEG", jpeg(COLOURS[w], mode))
        rows = []
        for i in range(6):
            w = sorted(WNIDS)[i % 3]
            z.writestr(f"{top}/val/images/val_{i}.JPEG", jpeg(COLOURS[w]))
            rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        z.writestr(f"{top}/val/val_annotations.txt", "\n".join(rows) + "\n")
    return path


def make_imagefolder(root: Path, sizes: tuple[tuple[int, int], ...], mode: str = "RGB") -> Path:
    """root/{train,test}/{cat,dog}/*.png, one image per size, class value 50 or 150."""
    for part in ("train", "test"):
        for cls, value in (("cat", 50), ("dog", 150)):
            d = root / part / cls
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.new(mode, (w, h), value if mode == "L" else (value,) * 3).save(d / f"{i}.png")
    return root


def make_unique_fashion(root: Path, n_train: int = 60, n_test: int = 30) -> Path:
    """Like make_fashion, but pixel (0, 0) of image i holds i: every sample can be told apart."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 10 + 5, 28 * 28).reshape(n, 28, 28)
        images[:, 0, 0] = np.arange(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


MESSY_CLASSES = ["circle", "plus sign", "ring", "square", "triangle"]
MESSY_BAD = {  # name -> the words its reason must hold
    "ring/empty.jpg": "empty (0 bytes)",
    "ring/cut.jpg": "truncated",
    "square/notes.png": "a text file",
}
MESSY_IGNORED = [".DS_Store", "circle/._img_0000.jpg", "square/Thumbs.db", "README.txt"]


def _shape(cls: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A light background with one dark shape of the class, at a random place and scale."""
    from PIL import ImageDraw

    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(180, 255, 3)))
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.25, 0.4))
    cx, cy = w // 2 + int(rng.integers(-w // 8, w // 8 + 1)), h // 2
    colour = tuple(int(v) for v in rng.integers(0, 90, 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        draw.ellipse(box, fill=colour)
    elif cls == "ring":
        draw.ellipse(box, outline=colour, width=max(2, r // 4))
    elif cls == "square":
        draw.rectangle(box, fill=colour)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        t = max(2, r // 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    return img


def _save_kind(img: Image.Image, path: Path, kind: str) -> Path:
    """One image saved as a kind of file real folders hold."""
    if kind == "gray":
        img.convert("L").save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "rgba":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 200))
        rgba.save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path.with_suffix(".gif"))
        return path.with_suffix(".gif")
    if kind == "cmyk":
        img.convert("CMYK").save(path.with_suffix(".jpg"), quality=95)
        return path.with_suffix(".jpg")
    if kind == "16bit":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "exif":  # stored sideways, EXIF says rotate back
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 CW to display
        img.transpose(Image.Transpose.ROTATE_90).save(path.with_suffix(".jpg"), exif=exif)
        return path.with_suffix(".jpg")
    suffix = {"JPG": ".JPG", "PNG": ".PNG", "bmp": ".bmp", "webp": ".webp", "tif": ".tif"}
    target = path.with_suffix(suffix.get(kind, ".jpg"))
    img.save(target, **({"quality": 90} if target.suffix.lower() == ".jpg" else {}))
    return target


MESSY_KINDS = ("jpg", "JPG", "PNG", "gray", "rgba", "palette", "cmyk", "16bit", "exif", "bmp",
               "webp", "tif")  # fmt: skip


def make_messy_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A user's folder as it comes: 5 classes (one named with a space) of shapes at mixed sizes
    (40x40 to 300x200) and every kind of file MESSY_KINDS lists, plus the junk real folders
    hold (MESSY_IGNORED) and three bad files (MESSY_BAD)."""
    rng = np.random.default_rng(seed)
    k = 0
    for cls in MESSY_CLASSES:
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(40, 301)), int(rng.integers(40, 201)))
            _save_kind(_shape(cls, size, rng), folder / f"img_{i:04d}", MESSY_KINDS[k % 12])
            k += 1
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "README.txt").write_text("shapes drawn for the tests\n")
    (root / "circle" / "._img_0000.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    (root / "square" / "Thumbs.db").write_bytes(bytes(512))
    (root / "ring" / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    _shape("ring", (120, 90), rng).save(whole, format="JPEG", quality=90)
    (root / "ring" / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "square" / "notes.png").write_text("TODO: sort these pictures\n")
    return root
