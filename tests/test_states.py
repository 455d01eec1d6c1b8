"""State files (core.states, training.state): canonical bytes whatever the objects' history,
a digest checked on every load, flipped bytes inside tensor data refused, and checkpoints that
fall back to the one before a damaged one."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from freezecache.core.states import (
    DIGEST_KEY,
    DamagedState,
    canonical,
    content_digest,
    load_state,
    save_state,
)
from freezecache.training.state import Checkpoint, RunState
from state_bytes import flip, tensor_spans


def _row(epoch: int, state: str) -> dict:
    """An epoch's history row as the training loop builds it: literal keys, f-string keys."""
    return {
        "epoch": epoch,
        "state": state,
        "position": 0,
        "lr": 0.1 / epoch,
        "train_loss": 1.0 / epoch,
        **{f"val_{k}": 0.5 + epoch for k in ("loss", "acc")},
    }


def _state(epochs: int, seed: int = 0) -> RunState:
    g = torch.Generator().manual_seed(seed)
    model = {"conv.weight": torch.randn(16, 8, 3, 3, generator=g), "bn.n": torch.tensor(7)}
    s = RunState(model=model, momentum={"conv.weight": torch.randn(16, 8, 3, 3, generator=g)})
    for e in range(1, epochs + 1):
        s.history.append(_row(e, "full"))
        s.epoch = e
    return s


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_state_that_went_through_a_checkpoint_saves_to_the_same_bytes(tmp_path):
    """The resume bug at its root: rows read back from a file no longer share their strings
    with rows built afterwards, which pickle used to write as other bytes."""
    straight = _state(3)
    straight.save(tmp_path / "straight.pt")
    first = _state(1)
    first.save(tmp_path / "ckpt.pt")
    resumed = RunState.load(tmp_path / "ckpt.pt")
    for e in (2, 3):
        resumed.history.append(_row(e, "full"))
        resumed.epoch = e
    resumed.save(tmp_path / "resumed.pt")
    assert resumed.history == straight.history
    assert _sha(tmp_path / "resumed.pt") == _sha(tmp_path / "straight.pt")


def test_canonical_values_have_one_digest_and_one_pickle(tmp_path):
    a = "state"
    b = "".join(["st", "ate"])  # equal, another object
    assert a is not b
    value = {"rows": [{a: 1}, {b: 2}], "np": np.float32(0.5), "t": torch.ones(2, 3).t(),
             "bytes": b"\x00\x01", "tuple": (1, None, True)}  # fmt: skip
    c = canonical(value)
    assert c["rows"][0].keys() == c["rows"][1].keys()
    assert next(iter(c["rows"][0])) is next(iter(c["rows"][1]))  # one object for equal strings
    assert type(c["np"]) is float and c["t"].is_contiguous()
    assert content_digest(c) == content_digest(canonical(c))
    save_state(value, tmp_path / "a.pt")
    save_state(c, tmp_path / "b.pt")
    assert _sha(tmp_path / "a.pt") == _sha(tmp_path / "b.pt")
    # one storage seen twice, or a view into a larger one, is saved as separate exact tensors
    shared = torch.arange(8.0)
    save_state({"a": shared, "b": shared, "c": shared[2:5]}, tmp_path / "shared.pt")
    save_state({"a": shared.clone(), "b": shared.clone(), "c": shared[2:5].clone()},
               tmp_path / "apart.pt")  # fmt: skip
    assert _sha(tmp_path / "shared.pt") == _sha(tmp_path / "apart.pt")
    kept = torch.ones(4)
    assert canonical({"k": kept})["k"] is not kept  # a new tensor object...
    assert canonical({"k": kept})["k"].data_ptr() == kept.data_ptr()  # ...without a copy
    with pytest.raises(TypeError, match="cannot hold ndarray"):
        canonical({"x": np.zeros(3)})


def test_a_flipped_byte_inside_tensor_data_is_refused_in_one_line(tmp_path):
    path = tmp_path / "runs" / "state.pt"
    _state(2).save(path)
    start, end = max(tensor_spans(path), key=lambda s: s[1] - s[0])
    assert end - start >= 16 * 8 * 9 * 4  # the convolution's weights
    flip(path, (start + end) // 2)
    torch.load(path, weights_only=False)  # torch itself reads it without a word
    with pytest.raises(DamagedState) as err:
        RunState.load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: content does not match")
    assert f"`dvc checkout --force {path}`" in message and "`dvc repro`" in message


def test_no_flipped_byte_passes_silently(tmp_path):
    """Anywhere in the file: the load fails in one line, or (bytes no one reads, such as zip
    padding) gives the same content."""
    path = tmp_path / "state.pt"
    _state(2).save(path)
    want = content_digest(canonical(_state(2).__dict__))
    raw = path.read_bytes()
    spans = tensor_spans(path)
    positions = list(range(0, len(raw), max(1, len(raw) // 400)))
    positions += (
        [(a + b) // 2 for a, b in spans] + [a for a, _ in spans] + [b - 1 for _, b in spans]
    )
    refused = 0
    for at in positions:
        path.write_bytes(raw)
        flip(path, at)
        try:
            got = load_state(path)
        except DamagedState:
            refused += 1
            continue
        assert content_digest(got) == want, f"byte {at} changed the content unnoticed"
    assert refused > len(positions) // 2


def test_a_file_without_a_digest_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_state(1).__dict__, path)  # as freezecache wrote states before digests
    with pytest.raises(DamagedState, match="no content digest"):
        RunState.load(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(DamagedState, match="unreadable"):
        RunState.load(path)
    with pytest.raises(ValueError, match=DIGEST_KEY):
        save_state({DIGEST_KEY: 1}, tmp_path / "x.pt")


def test_a_damaged_checkpoint_is_dropped_for_the_one_before_it(tmp_path, caplog):
    ckpt = Checkpoint(tmp_path / "ckpt" / "k.pt")
    for epochs in (1, 2, 3):
        ckpt.save(_state(epochs))
    assert ckpt.path.is_file() and ckpt.prev.is_file()
    assert RunState.load(ckpt.prev).epoch == 2
    start, end = tensor_spans(ckpt.path)[0]
    flip(ckpt.path, (start + end) // 2)
    with caplog.at_level(logging.WARNING):
        got = ckpt.load()
    assert got is not None and got.epoch == 2 and got.history == _state(2).history
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and str(ckpt.path) in lines[0] and "dropped" in lines[0]
    assert not ckpt.path.exists()  # never rotated into the place of the good one
    ckpt.save(_state(3))
    assert RunState.load(ckpt.prev).epoch == 2
    for path in (ckpt.path, ckpt.prev):
        flip(path, sum(tensor_spans(path)[0]) // 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ckpt.load() is None  # the run starts from the beginning
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2
    assert not ckpt.path.exists() and not ckpt.prev.exists()
