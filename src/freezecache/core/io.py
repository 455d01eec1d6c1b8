"""Atomic writes and digests: a killed stage never leaves a half-written output."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from freezecache.core.disk import NO_SPACE
from freezecache.core.errors import FreezecacheError


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file: the old content, or nothing, until
    the new one is complete. A full disk removes the temporary file and raises one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in NO_SPACE:
            raise
        raise FreezecacheError(
            f"{path}: the disk filled up while writing it ({len(data) / 2**20:.1f} MB); "
            "nothing was replaced — free space and rerun"
        ) from None
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save, atomically and with the same bytes for the same content: saved through a
    buffer, because torch names the archive inside the file after the file it writes (here a
    temporary name), which would give every rerun a new hash."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> dict:
    """Loads a state file written by freezecache; clear error when missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FreezecacheError(f"{path}: missing — run `dvc repro` to produce it")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged zips/pickles
        raise FreezecacheError(
            f"{path}: unreadable ({type(err).__name__}) — delete it and rerun `dvc repro`"
        ) from None


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FreezecacheError(f"{path}: missing — run `dvc repro` to produce it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise FreezecacheError(
            f"{path}: not valid JSON — delete it and rerun `dvc repro`"
        ) from None


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_digest(state: dict) -> str:
    """Content hash of a state dict (names, shapes, dtypes, bytes), whatever the file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
