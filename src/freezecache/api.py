"""The public names of ``import freezecache`` that have no other home: a model seen as blocks,
and its split. Each is a thin face of the library function the pipeline's stages call
(:func:`freezecache.models.create_model`, :func:`~freezecache.models.load_checkpoint`,
:func:`~freezecache.models.describe_blocks`, :func:`~freezecache.models.split`), adding only
the check that a model given from outside is block-sequential. ``build_cache`` and
``CachedFeatures`` live in :mod:`freezecache.cache` (``from_data``, ``features``), where the
cache stage and the suffix stage use them too.

The module sits at the top of the package, outside the layers (tests/test_boundaries.py): no
stage imports it, so changing it reruns nothing.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from freezecache.core.errors import FreezecacheError
from freezecache.models import BlockModel, create_model, describe_blocks, load_checkpoint
from freezecache.models import split as _split

__all__ = ["blocks", "load_model", "split"]


def load_model(
    name: str,
    *,
    num_classes: int,
    img_size: int = 32,
    in_chans: int = 3,
    weights: str | Path | None = None,
    **kwargs: object,
) -> BlockModel:
    """A classifier as a block-sequential model, ``stem -> blocks -> head``, ready to split.

    ``name``: one of freezecache's CIFAR ResNets (``resnet20`` .. ``resnet56``), ``resnet50``,
    ``deit_tiny``/``deit_small``, or any timm model whose trunk is a sequence of blocks (ResNet,
    RegNet, ConvNeXt, EfficientNet, ViT, Swin, ...; ``timm:NAME`` where a name is taken).
    Random weights, never a download: ``weights`` loads a local ``.pth``/``.pt``/
    ``.safetensors`` file (torchvision/timm key names are mapped; a classifier for another class
    count is replaced). ``kwargs`` go to the model's builder (``timm.create_model``).

    Example::

        model = freezecache.load_model("resnet18", num_classes=10, img_size=32,
                                       weights="resnet18.safetensors")
    """
    model = create_model(
        name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
    )
    if weights is not None:
        load_checkpoint(model, str(weights))
    return model


def blocks(model: BlockModel) -> list[dict]:
    """The positions ``model`` can be split at: one row per position with the ``name`` and
    ``type`` of the block ending there, what runs with it (``joins``), its parameter count
    (``params``) and the per-sample output ``shape``. Position 0 is the stem's output, ``p``
    the output of the first ``p`` blocks.

    Example::

        for row in freezecache.blocks(model):
            print(row["position"], row["type"], row["shape"])
    """
    return describe_blocks(_block_model(model))


def split(model: BlockModel, block: int) -> tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)``: the stem and the first ``block`` blocks, and the rest with the
    head; ``suffix(prefix(x))`` equals ``model(x)``. Both share the model's weights (training
    the suffix trains the model). Freeze the prefix, cache its outputs with
    :func:`freezecache.build_cache`, train the suffix from :class:`freezecache.CachedFeatures`.

    Example::

        prefix, suffix = freezecache.split(model, 3)
        prefix.requires_grad_(False)
        logits = suffix(prefix(images))
    """
    return _split(_block_model(model), block)


def _block_model(model: object) -> BlockModel:
    """``model`` when it is block-sequential, else one line saying how to get one."""
    if isinstance(model, BlockModel):
        return model
    raise FreezecacheError(
        f"{type(model).__name__} is not a block-sequential model (stem -> blocks -> head) — "
        "build it with freezecache.load_model(name, ...), which wraps timm models and "
        "freezecache's own"
    )
