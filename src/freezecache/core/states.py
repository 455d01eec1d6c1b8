"""State files (run states and training checkpoints): canonical bytes and a digest inside.

**Canonical.** pickle (inside ``torch.save``) writes an object once and refers back to it when
the *same object* appears again, so the bytes depend on which equal strings happen to share one
object: a history row built by the training loop shares its keys with every other row (code
constants), a row read back from a checkpoint does not share them with rows added after it.
A resumed stage then published other bytes than an uninterrupted one, and DVC reran everything
downstream. :func:`canonical` rebuilds the value with every equal string or bytes as one object,
fresh containers, and CPU tensors that each own their storage exactly, so the file depends only
on the values.

**Verified.** The file holds a sha256 of its content (:func:`content_digest`: names, types,
shapes and every tensor byte, in order) under :data:`DIGEST_KEY`, recomputed on every load.
Inside the file, not beside it: DVC tracks one file per output, and a sidecar could be restored,
copied or deleted apart from it; the file also stays a plain ``torch.load``-able dict. A file
whose content no longer matches (a flipped bit in tensor data loads without complaint) raises
:class:`DamagedState`.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import torch

from freezecache.core.errors import FreezecacheError
from freezecache.core.io import atomic_torch_save, load_torch

DIGEST_KEY = "sha256"  # the content digest's key in a state file's top-level dict
# DVC keeps its own copy of every output: `--force` because the damaged file differs from it
RESTORE = "restore it with `dvc checkout --force {path}` or rebuild it with `dvc repro`"


class DamagedState(FreezecacheError):
    """A state file that cannot be read or does not match its digest."""


def canonical(value: object) -> object:
    """A copy of ``value`` whose pickle depends only on its values (see the module docstring):
    dicts, lists and tuples rebuilt, equal strings and bytes as one object each, numpy scalars as
    Python scalars, tensors detached, on the CPU, each the contiguous sole owner of its storage
    (copied only when it is not already)."""
    return _Canon().copy(value)


class _Canon:
    def __init__(self) -> None:
        self.atoms: dict = {}  # str or bytes -> the one object that stands for all equal ones
        self.storages: set[int] = set()  # the tensor storages taken as they are

    def copy(self, v: object) -> object:
        if v is None or type(v) is bool:
            return v
        if isinstance(v, np.generic) and not isinstance(v, (np.str_, np.bytes_)):
            return self.copy(v.item())
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v)
        if isinstance(v, (str, bytes, bytearray)):
            atom = str(v) if isinstance(v, str) else bytes(v)
            return self.atoms.setdefault(atom, atom)
        if isinstance(v, torch.Tensor):
            return self.tensor(v.detach())
        if isinstance(v, dict):
            return {self.copy(k): self.copy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.copy(x) for x in v]
        if isinstance(v, tuple):
            return tuple(self.copy(x) for x in v)
        raise TypeError(f"a state file cannot hold {type(v).__name__} (store a tensor or bytes)")

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the CPU as the sole, exact owner of its storage: torch saves whole storages,
        once each, so a view, a shared storage or a strided layout would show in the bytes. A
        tensor that already is one is taken without a copy (the usual case: a state's tensors
        are copies made for it)."""
        storage = t.untyped_storage()
        alone = (
            t.device.type == "cpu"
            and t.is_contiguous()
            and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size()
            and storage.data_ptr() not in self.storages
        )
        if not alone:
            t = t.to("cpu").clone(memory_format=torch.contiguous_format)
        if t.numel():
            self.storages.add(t.untyped_storage().data_ptr())
        return t


def content_digest(value: object) -> str:
    """sha256 of a canonical value: its structure, types, and every byte of its tensors."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, v: object) -> None:
    if v is None:
        h.update(b"N")
    elif type(v) is bool:
        h.update(b"T" if v else b"F")
    elif type(v) is int:
        h.update(b"i%d;" % v)
    elif type(v) is float:
        h.update(b"f" + struct.pack("<d", v))
    elif type(v) is str:
        data = v.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    elif type(v) is bytes:
        h.update(b"b%d:" % len(v) + v)
    elif isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"t{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif type(v) is dict:
        h.update(b"{%d:" % len(v))
        for k, x in v.items():
            _feed(h, k)
            _feed(h, x)
    elif type(v) in (list, tuple):
        h.update(b"%s%d:" % (b"[" if type(v) is list else b"(", len(v)))
        for x in v:
            _feed(h, x)
    else:
        raise TypeError(f"not a canonical state value: {type(v).__name__}")


def save_state(state: dict, path: Path) -> None:
    """Writes ``state`` (a dict of canonical values) atomically, with its content digest."""
    value = canonical(state)
    if DIGEST_KEY in value:
        raise ValueError(f"a state's keys must not include {DIGEST_KEY!r}")
    atomic_torch_save({**value, DIGEST_KEY: content_digest(value)}, path)


def load_state(path: Path, advice: str = RESTORE) -> dict:
    """The state saved at ``path``, its digest checked. :class:`DamagedState` when it cannot be
    read or its content changed; ``advice`` ends the message (``{path}`` filled in). A missing
    file is the usual one-line :class:`FreezecacheError`."""
    path = Path(path)
    try:
        raw = load_torch(path)
    except FreezecacheError as err:
        if not path.is_file():
            raise
        raise DamagedState(f"{path}: unreadable — {advice.format(path=path)}") from err
    digest = raw.pop(DIGEST_KEY, None) if isinstance(raw, dict) else None
    if digest is None:
        raise DamagedState(
            f"{path}: no content digest (not a freezecache state, or written by an older "
            f"version) — {advice.format(path=path)}"
        )
    try:
        actual = content_digest(raw)
    except TypeError:
        actual = None
    if actual != digest:
        raise DamagedState(
            f"{path}: content does not match its digest (damaged on disk) — "
            f"{advice.format(path=path)}"
        )
    return raw
