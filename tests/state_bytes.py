"""Where a torch state file keeps its tensor bytes, and flipping one: the faults a flaky disk
makes, for the state-file tests."""

from __future__ import annotations

import zipfile
from pathlib import Path


def tensor_spans(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the tensor records' data inside a torch zip file."""
    spans = []
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" not in info.filename:
                continue
            head = info.header_offset
            name_len = int.from_bytes(raw[head + 26 : head + 28], "little")
            extra_len = int.from_bytes(raw[head + 28 : head + 30], "little")
            start = head + 30 + name_len + extra_len
            spans.append((start, start + info.compress_size))
    return spans


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
