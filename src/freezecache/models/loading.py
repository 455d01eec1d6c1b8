"""Loading local checkpoints into a :class:`~freezecache.models.BlockModel` (no downloads)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from freezecache.core.errors import FreezecacheError

if TYPE_CHECKING:
    from freezecache.models import BlockModel

log = logging.getLogger(__name__)

# Wrapper keys that training scripts put around a state dict (the pipeline's RunState keeps
# the model under "model"), and key prefixes added by DataParallel/DDP and torch.compile.
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_SHOW_KEYS = 5  # how many offending keys an error message names


def load_checkpoint(model: BlockModel, path: str) -> None:
    """Load a local checkpoint into ``model`` in place (no hub downloads).

    Accepts ``.pth``/``.pt`` files (``torch.load``, tensors only) and ``.safetensors``
    files holding a plain state dict, ``{'state_dict': ...}``/``{'model': ...}`` wrappers
    (the pipeline's own RunState files keep the model under ``'model'``), this model's own
    keys, or torchvision/timm key names (``model.adapt_state_dict`` renames them and fits the
    first conv to ``in_chans``). When the classifier's class count differs, the fresh head is
    kept and a message is logged.
    """
    state_dict = model.adapt_state_dict(_unwrap(_read(path), path))
    state_dict, dropped = _drop_mismatched_head(model, state_dict, path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    body_missing = [k for k in missing if not model.is_classifier_key(k)]
    if body_missing or unexpected:
        raise FreezecacheError(
            f"checkpoint {path} does not fit model {model.name}: "
            f"missing {body_missing[:_SHOW_KEYS]}, unexpected {unexpected[:_SHOW_KEYS]} — "
            "load a checkpoint of the same architecture and options"
        )
    if set(missing) - set(dropped):
        log.info("checkpoint %s has no classifier weights; keeping the fresh head", path)


def _read(path: str) -> object:
    """Read a checkpoint file: safetensors by suffix, else ``torch.load`` (tensors only)."""
    file = Path(path)
    if not file.is_file():
        raise FreezecacheError(f"checkpoint {path} does not exist — check the path")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the readers raise many types; all mean "not a checkpoint"
        raise FreezecacheError(
            f"checkpoint {path} could not be read ({type(err).__name__}: {err}) — "
            "pass a torch state dict or a .safetensors file"
        ) from err


def _unwrap(obj: object, path: str) -> dict[str, Tensor]:
    """Peel ``{'state_dict': ...}``/``{'model': ...}`` wrappers and DDP/compile key prefixes."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise FreezecacheError(
            f"checkpoint {path} holds no state dict of tensors — save model.state_dict()"
        )
    state_dict = dict(obj)
    for prefix in _KEY_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _drop_mismatched_head(
    model: BlockModel, state_dict: dict[str, Tensor], path: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Drop head tensors whose shape differs (other class count); reject other mismatches.

    Returns the remaining state dict and the dropped keys.
    """
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    body = [k for k in mismatched if not model.is_classifier_key(k)]
    if body:
        shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in body]
        raise FreezecacheError(
            f"checkpoint {path} does not fit model {model.name}: shape mismatch "
            f"{shapes[:_SHOW_KEYS]} — load a checkpoint of the same architecture and options"
        )
    if mismatched:
        log.info(
            "checkpoint %s has a classifier for another class count (%s); keeping the fresh head",
            path,
            ", ".join(mismatched),
        )
    return {k: v for k, v in state_dict.items() if k not in mismatched}, mismatched
