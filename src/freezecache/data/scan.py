"""One pass over a folder of images before any decoding: every file classified at once.

Each file is one of: used (an image Pillow reads to its end), bad (empty, not an image though
named like one, truncated or corrupt, outside a class folder: listed with the reason), or
ignored (hidden or system files such as ``.DS_Store``, ``Thumbs.db``, macOS ``._*`` and
``__MACOSX/``, and files whose extension is not an image's: counted). Bad files are all found
in the one pass, so a folder with four of them fails once, listing four.

Checking a file reads it whole (its sha256 is the source fingerprint) and decodes it cheaply:
a JPEG at 1/8 scale (Pillow's draft mode still reads every byte, so a cut-off file fails), a PNG
through its chunk checksums (``verify``), other formats fully. Results are kept per file under
the params' checkpoint folder, keyed by size and modification time (what DVC's own state
trusts), so the next scan of an unchanged folder reads no image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_write_text

log = logging.getLogger(__name__)
# Extensions of the formats Pillow reads that image folders hold (matched case-insensitively).
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
SYSTEM_DIRS = frozenset({"__macosx", "$recycle.bin", "system volume information"})
SPLIT_DIRS = ("train", "val", "test")
_FORMATS = {  # Pillow's format -> the extensions that name it
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "PNG": (".png",), "BMP": (".bmp", ".dib"),
    "DIB": (".bmp", ".dib"), "GIF": (".gif",), "WEBP": (".webp",), "TIFF": (".tif", ".tiff"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
}  # fmt: skip
_CACHE_VERSION = 1
_PROGRESS_S = 5.0  # seconds between progress lines


@dataclass(frozen=True)
class Checked:
    """What the scan learnt of one image file."""

    size: int
    sha256: str
    mode: str | None = None  # Pillow's mode; None when the file cannot be used
    format: str | None = None
    problem: str | None = None  # why it cannot be used


@dataclass
class Scan:
    """An image folder as the scan found it (names are '/'-separated, relative to root)."""

    root: Path
    layout: str  # "splits" (train/ with val/ and/or test/) or "classes" (class folders)
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split ("train", "val", "test", or "all") -> used
    bad: list[tuple[str, str]]  # (name, why)
    ignored: list[str]
    checked: dict[str, Checked] = field(default_factory=dict)

    @property
    def misnamed(self) -> list[tuple[str, str]]:
        """Readable images whose content is another format than their extension says."""
        out = []
        for name, c in self.checked.items():
            ext = os.path.splitext(name)[1].lower()
            if c.problem is None and c.format in _FORMATS and ext not in _FORMATS[c.format]:
                out.append((name, c.format))
        return out

    def fingerprint(self) -> str:
        """sha256 over (name, size, sha256) of every image-named file, used or bad, in name
        order (ignored files are left out: a Finder's .DS_Store changes nothing)."""
        outer = hashlib.sha256()
        for name in sorted(self.checked):
            c = self.checked[name]
            outer.update(f"{name}\0{c.size}\0{c.sha256}\n".encode())
        return outer.hexdigest()

    def gray(self) -> bool:
        """Whether every used image is single-channel (then the native channels are 1)."""
        from freezecache.data.images import GRAY_MODES

        modes = [self.checked[n].mode for part in self.files.values() for n, _ in part]
        return bool(modes) and all(m in GRAY_MODES for m in modes)

    def summary(self) -> str:
        """One line: what was found."""
        used = sum(len(v) for v in self.files.values())
        parts = ", ".join(f"{k} {len(v)}" for k, v in self.files.items())
        return (
            f"{self.root}: {used} images in {len(self.classes)} classes ({parts}), "
            f"{len(self.bad)} bad, {len(self.ignored)} hidden/system/other files ignored"
        )


def bad_file_lines(root: object, bad: list[tuple[str, str]], bad_images: str) -> list[str]:
    """The report of bad files: a heading and one line per file (every file, at once)."""
    if not bad:
        return []
    if bad_images == "skip":
        head = f"{root}: skipping {len(bad)} files that cannot be used (data.bad_images: skip):"
    else:
        head = (
            f"{root}: {len(bad)} files cannot be used — fix or remove them, or set "
            "data.bad_images: skip to leave them out:"
        )
    return [head, *(f"  {n}: {why}" for n, why in bad)]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(image-named files, ignored files) under root, relative names, sorted."""
    images, ignored = [], []
    for top, dirs, files in os.walk(root, followlinks=True):
        rel = Path(top).relative_to(root)
        keep = []
        for d in dirs:
            if _hidden(d) or d.lower() in SYSTEM_DIRS:
                ignored += [(rel / d / f).as_posix() for f in _all_files(Path(top) / d)]
            else:
                keep.append(d)
        dirs[:] = sorted(keep)
        for f in files:
            name = (rel / f).as_posix()
            if _hidden(f) or not f.lower().endswith(IMAGE_SUFFIXES):
                ignored.append(name)
            else:
                images.append(name)
    return sorted(images), sorted(ignored)


def _all_files(folder: Path) -> list[str]:
    return [
        (Path(t).relative_to(folder) / f).as_posix() for t, _, fs in os.walk(folder) for f in fs
    ]


def _text(data: bytes) -> bool:
    """Whether the bytes read as text (a note or a web page saved under an image's name)."""
    head = data[:512]
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in decoded)


def check_file(data: bytes, name: str) -> Checked:
    """Classify one file's bytes: a usable image (its mode and format) or why it is not one."""
    from PIL import Image

    digest = hashlib.sha256(data).hexdigest()
    ext = os.path.splitext(name)[1].lower()
    if not data:
        return Checked(0, digest, problem="empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        why = (
            f"a text file, not an image (named {ext})"
            if _text(data)
            else f"not an image Pillow can read, though named {ext} ({exc})"
        )
        return Checked(len(data), digest, problem=why)
    mode, fmt = img.mode, img.format
    try:
        if fmt == "JPEG":
            img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        elif fmt == "PNG":
            img.verify()  # every chunk's CRC up to IEND: a cut-off file fails
        else:
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Checked(len(data), digest, problem=f"truncated or corrupt {fmt} ({exc})")
    return Checked(len(data), digest, mode=mode, format=fmt)


class _Cache:
    """Per-file results of earlier scans of one root, keyed by (size, mtime_ns)."""

    def __init__(self, folder: Path | None, root: Path) -> None:
        self.path = None
        self.entries: dict[str, list] = {}
        if folder is None:
            return
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = Path(folder) / "scan" / f"{key}.json"
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") == _CACHE_VERSION:
                self.entries = raw["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}  # no cache, or a broken one: scan again

    def get(self, name: str, stat: os.stat_result) -> Checked | None:
        e = self.entries.get(name)
        if e is None or e[0] != stat.st_size or e[1] != stat.st_mtime_ns:
            return None
        return Checked(*e[2:])

    def put(self, name: str, stat: os.stat_result, c: Checked) -> None:
        self.entries[name] = [stat.st_size, stat.st_mtime_ns, c.size, c.sha256, c.mode,
                              c.format, c.problem]  # fmt: skip

    def save(self, names: list[str]) -> None:
        if self.path is None:
            return
        kept = {n: self.entries[n] for n in names if n in self.entries}
        payload = json.dumps({"version": _CACHE_VERSION, "files": kept})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, payload)
        except OSError as exc:  # a cache: a read-only checkout still scans, only slower
            log.warning("could not keep the scan of %s in %s (%s)", self.path.parent, exc)


def check_files(root: Path, names: list[str], cache_dir: Path | None) -> dict[str, Checked]:
    """Every file checked (from the cache when unchanged), with a progress line every few s."""
    cache = _Cache(cache_dir, root)
    out: dict[str, Checked] = {}
    last = start = time.monotonic()
    read = 0
    for i, name in enumerate(names, 1):
        path = root / name
        stat = path.stat()
        found = cache.get(name, stat)
        if found is None:
            found = check_file(path.read_bytes(), name)
            cache.put(name, stat, found)
            read += 1
        out[name] = found
        if time.monotonic() - last > _PROGRESS_S:
            last = time.monotonic()
            log.info("scanned %d/%d files of %s", i, len(names), root)
    cache.save(names)
    log.info(
        "scanned %d files of %s in %.1f s (%d read, %d unchanged since the last scan)",
        len(names), root, time.monotonic() - start, read, len(names) - read,
    )  # fmt: skip
    return out


def _layout(root: Path, images: list[str]) -> tuple[str, list[str]]:
    """("splits", split folders present) or ("classes", []), from the top-level folders."""
    tops = sorted({n.split("/", 1)[0] for n in images if "/" in n})
    lower = {t.lower() for t in tops}
    if "train" not in lower:
        if not tops:
            raise FreezecacheError(
                f"{root} holds no class folders — put each class's images in a folder named "
                "after it (root/<class>/...), or use train/<class>/ and test/<class>/"
            )
        return "classes", []
    others = [t for t in tops if t not in SPLIT_DIRS]
    if others or len(lower) != len(tops):
        raise FreezecacheError(
            f"{root} has train/ and also {', '.join(others or tops)} — a root holds either "
            "train/ with val/ and/or test/ (each of class folders), or class folders only"
        )
    splits = [s for s in SPLIT_DIRS if s in tops]
    if splits == ["train"]:
        raise FreezecacheError(
            f"{root} has train/ but no test/ or val/ — add one of them, or put the class folders "
            "directly under the root to have them split by data.test_fraction"
        )
    return "splits", splits


def scan_folder(root: Path, cache_dir: Path | None = None) -> Scan:
    """Walk, classify and check every file under an image-folder root (see the module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise FreezecacheError(
            f"{root} does not exist or is not a folder — set data.root to a folder of class "
            "folders (or of train/ and test/ ones)"
        )
    images, ignored = _walk(root)
    layout, splits = _layout(root, images)
    checked = check_files(root, images, cache_dir)
    bad = [(n, c.problem) for n, c in checked.items() if c.problem is not None]
    depth = 2 if layout == "splits" else 1  # a class folder's images sit below this depth
    loose = [n for n in images if n.count("/") < depth and checked[n].problem is None]
    bad += [(n, "not inside a class folder — move it into one") for n in loose]
    usable = [n for n in images if checked[n].problem is None and n not in set(loose)]
    if layout == "classes":
        classes = sorted({n.split("/", 1)[0] for n in images if n.count("/") >= 1})
        files = {"all": [(n, classes.index(n.split("/", 1)[0])) for n in usable]}
    else:
        classes = sorted({n.split("/")[1] for n in images if n.startswith("train/") and
                          n.count("/") >= 2})  # fmt: skip
        files = {}
        for s in splits:
            part = [n for n in usable if n.startswith(f"{s}/")]
            strays = sorted({n.split("/")[1] for n in part} - set(classes))
            if strays:
                raise FreezecacheError(
                    f"{root / s / strays[0]} is a class that train/ does not have — add "
                    f"train/{strays[0]}/ or remove it"
                )
            files[s] = [(n, classes.index(n.split("/")[1])) for n in part]
    return Scan(root, layout, classes, files, sorted(bad), ignored, checked)


def files_fingerprint(files: list[tuple[str, Path]], cache_dir: Path | None) -> str:
    """The source fingerprint of published dataset files (``FINGERPRINT_METHOD``: sha256 over
    name, size and content sha256), each file hashed once and remembered like the scan's."""
    if not files:
        return hashlib.sha256(b"").hexdigest()
    parent = Path(os.path.commonpath([str(p.resolve().parent) for _, p in files]))
    cache = _Cache(cache_dir, parent)
    outer = hashlib.sha256()
    for name, path in sorted(files, key=lambda f: f[0]):
        stat = path.stat()
        found = cache.get(name, stat)
        if found is None:
            inner = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    inner.update(block)
            found = Checked(stat.st_size, inner.hexdigest())
            cache.put(name, stat, found)
        outer.update(f"{name}\0{found.size}\0{found.sha256}\n".encode())
    cache.save([n for n, _ in files])
    return outer.hexdigest()
