"""Models with one block-sequential view: ``model(x) == head(blocks(stem(x)))``.

The registry holds the paper's CIFAR ResNets, a torchvision-based ResNet-50 and DeiT; any other
timm model name goes through the generic view of :mod:`freezecache.models.timm_view`.
Positions count blocks as the paper does: position ``p`` means "the first ``p`` blocks"
(residual, MBConv or attention blocks, across stages), ``0 <= p <= num_blocks``.
``split(model, p)`` cuts the model there into a prefix (to freeze and cache) and a suffix (to
keep training); :func:`describe_blocks` lists the positions.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from freezecache.core.errors import FreezecacheError, ModelOptionError

log = logging.getLogger(__name__)

# name -> "module:builder"; imported on first use so that importing freezecache stays cheap
# (timm and torchvision are only loaded when a model that needs them is built).
_REGISTRY: dict[str, str] = {
    "resnet20": "freezecache.models.resnet_cifar:resnet20",
    "resnet32": "freezecache.models.resnet_cifar:resnet32",
    "resnet44": "freezecache.models.resnet_cifar:resnet44",
    "resnet56": "freezecache.models.resnet_cifar:resnet56",
    "resnet50": "freezecache.models.resnet:resnet50",
    "deit_tiny": "freezecache.models.vit:deit_tiny",
    "deit_small": "freezecache.models.vit:deit_small",
}

_TIMM_PREFIX = "timm:"  # forces the timm model where a registered one has the same name
LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclasses.dataclass
class _CheckpointSetting:
    """Grad-checkpointing setting shared by a model and the prefix/suffix split from it."""

    every: int = 0  # blocks per checkpointed segment; 0 = off


class BlockModel(nn.Module):
    """A classifier seen as ``stem -> blocks[0..n-1] -> head``.

    ``layout`` says how features are laid out between blocks: ``"nchw"`` (CNN maps
    ``(B, C, H, W)``), ``"nhwc"`` (maps ``(B, H, W, C)``, e.g. Swin) or ``"tokens"``
    (``(B, N, D)``, whose first ``num_prefix_tokens`` are class/distillation/register tokens).
    ``kind`` (``"cnn"`` or ``"vit"``) is derived from it for older callers. Subclasses override
    :meth:`adapt_state_dict` (and :meth:`is_classifier_key`) to read foreign checkpoints.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        in_chans: int,
        img_size: int,
        num_classes: int,
        layout: str | None = None,
        kind: str | None = None,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.layout = _layout_of(layout, kind)
        self.num_prefix_tokens = num_prefix_tokens if self.layout == "tokens" else 0
        self.name = type(self).__name__  # create_model sets the registry name
        self.in_chans = in_chans
        self.img_size = img_size
        self.num_classes = num_classes
        self.block_names = [f"blocks.{i}" for i in range(len(self.blocks))]
        self._ckpt = _CheckpointSetting()

    @property
    def kind(self) -> str:
        """``"vit"`` for token sequences, ``"cnn"`` for spatial maps (NCHW or NHWC)."""
        return "vit" if self.layout == "tokens" else "cnn"

    @property
    def channel_axis(self) -> int:
        """Axis of a feature batch that holds channels: 1 for NCHW, -1 for NHWC and tokens."""
        return 1 if self.layout == "nchw" else -1

    @property
    def num_blocks(self) -> int:
        """Number of blocks (valid positions are ``0..num_blocks``)."""
        return len(self.blocks)

    def forward_features(self, x: Tensor, end: int | None = None) -> Tensor:
        """Run ``stem`` and ``blocks[:end]`` (all blocks when ``end`` is None)."""
        # A list slice, not ModuleList slicing, which would build a new Module every call.
        return run_blocks(list(self.blocks)[:end], self.stem(x), self._ckpt.every)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``head(blocks(stem(x)))``."""
        return self.head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute trainable blocks' activations in backward, ``every`` blocks per segment.

        Frozen blocks (no parameter requires grad) are never checkpointed: they keep no
        activations for backward anyway. Prefixes and suffixes from :func:`split` follow
        this setting, also when it changes after the split.
        """
        if enable and every < 1:
            raise FreezecacheError(
                f"grad checkpointing every={every} blocks is not positive — use every >= 1"
            )
        self._ckpt.every = every if enable else 0

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a foreign checkpoint's keys/shapes onto this model's; identity by default."""
        return state_dict

    def is_classifier_key(self, key: str) -> bool:
        """Whether ``key`` belongs to the classifier, which a checkpoint may size differently."""
        return key.startswith("head.")


def _layout_of(layout: str | None, kind: str | None) -> str:
    """The feature layout from ``layout`` or, for older callers, ``kind``."""
    if layout is None and kind is not None:
        layout = {"cnn": "nchw", "vit": "tokens"}.get(kind)
        if layout is None:
            raise FreezecacheError(f"model kind {kind!r} is unknown — use 'cnn' or 'vit'")
    if layout not in LAYOUTS:
        raise FreezecacheError(f"feature layout {layout!r} is unknown — use one of {LAYOUTS}")
    return layout


class BlockPrefix(nn.Module):
    """``stem + blocks[:position]`` of a :class:`BlockModel`, sharing its modules."""

    def __init__(self, model: BlockModel, position: int) -> None:
        super().__init__()
        self.stem = model.stem
        self.blocks = model.blocks[:position]
        self._ckpt = model._ckpt

    def forward(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, self.stem(x), self._ckpt.every)


class BlockSuffix(nn.Module):
    """``blocks[position:] + head`` of a :class:`BlockModel`, sharing its modules."""

    def __init__(self, model: BlockModel, position: int) -> None:
        super().__init__()
        self.blocks = model.blocks[position:]
        self.head = model.head
        self._ckpt = model._ckpt

    def forward(self, x: Tensor) -> Tensor:
        return self.head(run_blocks(self.blocks, x, self._ckpt.every))


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, every: int = 0) -> Tensor:
    """Apply ``blocks`` in order; checkpoint runs of trainable blocks when ``every > 0``."""
    if every <= 0 or not torch.is_grad_enabled():
        for block in blocks:
            x = block(x)
        return x
    segment: list[nn.Module] = []
    for block in blocks:
        if not _is_trainable(block):
            x = _checkpointed(segment, x)
            segment = []
            x = block(x)
            continue
        segment.append(block)
        if len(segment) == every:
            x = _checkpointed(segment, x)
            segment = []
    return _checkpointed(segment, x)


def _is_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _run_sequence(blocks: tuple[nn.Module, ...], x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


# Observers called with (segment, input) before each checkpointed segment runs: profiling uses
# one to count what backward will recompute, which checkpoint's own hooks hide from outside.
SegmentProbe = Callable[[tuple[nn.Module, ...], Tensor], None]
_SEGMENT_PROBES: contextvars.ContextVar[tuple[SegmentProbe, ...]] = contextvars.ContextVar(
    "freezecache_segment_probes", default=()
)


@contextlib.contextmanager
def segment_probe(probe: SegmentProbe) -> Iterator[None]:
    """Within the block, call ``probe(blocks, x)`` before every checkpointed segment runs."""
    token = _SEGMENT_PROBES.set((*_SEGMENT_PROBES.get(), probe))
    try:
        yield
    finally:
        _SEGMENT_PROBES.reset(token)


def _checkpointed(segment: list[nn.Module], x: Tensor) -> Tensor:
    """Run ``segment`` under one activation checkpoint (a no-op for an empty segment)."""
    if not segment:
        return x
    for probe in _SEGMENT_PROBES.get():
        probe(tuple(segment), x)
    return checkpoint(functools.partial(_run_sequence, tuple(segment)), x, use_reentrant=False)


def list_models() -> list[str]:
    """Names registered here; :func:`create_model` also takes any timm model name."""
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs: object
) -> BlockModel:
    """Build a model with random weights (never a download).

    ``name`` is a registered model (:func:`list_models`), or any timm model name — also as
    ``timm:NAME`` where a registered model has the same name, e.g. ``timm:resnet50``. Extra
    ``kwargs`` go to the builder (for timm: ``timm.create_model``, e.g. ``depth``,
    ``patch_size``, ``drop_path_rate``).
    """
    sizes = {"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size}
    for arg, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise FreezecacheError(f"model {name}: {arg}={value!r} — use a positive integer")
    if name not in _REGISTRY:
        return _create_timm(name, sizes, kwargs)
    module_name, builder_name = _REGISTRY[name].split(":")
    builder = getattr(importlib.import_module(module_name), builder_name)
    try:  # check the options before building, so typos are user errors, not tracebacks
        inspect.signature(builder).bind(**sizes, **kwargs)
    except TypeError as err:
        raise unsupported_option(name, err, kwargs) from None
    model = builder(**sizes, **kwargs)
    model.name = name
    return model


def _create_timm(name: str, sizes: dict[str, int], kwargs: dict[str, object]) -> BlockModel:
    """A timm model through the generic block view (see :mod:`freezecache.models.timm_view`)."""
    import timm

    from freezecache.models.timm_view import timm_model

    timm_name = name.removeprefix(_TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise ModelOptionError(
            "name",
            f"unknown model {name!r} — use one of: {', '.join(list_models())}, "
            "or a timm model name (timm.list_models())",
        )
    model = timm_model(timm_name, **sizes, **kwargs)
    model.name = name
    return model


def unsupported_option(name: str, err: TypeError, kwargs: dict[str, object]) -> ModelOptionError:
    """The error for options a builder refused with ``err``, naming the option where Python's
    message does (``unexpected keyword argument 'x'``), else all of them."""
    named = re.findall(r"keyword argument '(\w+)'", str(err))
    keys = [k for k in named if k in kwargs] or sorted(kwargs)
    what = " ".join(str(err).split())
    return ModelOptionError(
        f"kwargs.{keys[0]}" if len(keys) == 1 else "kwargs",
        f"model {name} refuses option {', '.join(keys)} ({what}) — remove it or check its spelling",
    )


def divisors(size: int) -> str:
    """The patch sizes that tile a ``size``-pixel image, for messages: ``2, 4, 7 or 14``."""
    found = [str(d) for d in range(2, size) if size % d == 0] or ["1", str(size)]
    return ", ".join(found[:-1]) + f" or {found[-1]}" if len(found) > 1 else found[0]


def _check_position(model: BlockModel, position: int) -> None:
    if not isinstance(position, int) or not 0 <= position <= model.num_blocks:
        raise FreezecacheError(
            f"freeze position {position!r} is outside model {model.name} — "
            f"use 0..{model.num_blocks} (number of blocks in the prefix)"
        )


def split(model: BlockModel, position: int) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix): prefix = stem + blocks[:position]; suffix = blocks[position:] + head.

    Both share the model's parameters (no copies: training the suffix trains the model),
    and ``suffix(prefix(x)) == model(x)`` in eval mode. Both follow the model's
    grad-checkpointing setting.
    """
    _check_position(model, position)
    return BlockPrefix(model, position), BlockSuffix(model, position)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def feature_shape(model: BlockModel, position: int) -> tuple[int, ...]:
    """Per-sample shape after the prefix at ``position`` for the model's ``img_size`` inputs."""
    _check_position(model, position)
    param = next(model.parameters())
    x = torch.zeros(
        1, model.in_chans, model.img_size, model.img_size, device=param.device, dtype=param.dtype
    )
    # A dry run of one sample; eval + no_grad so BN running stats are not touched.
    with torch.no_grad(), eval_mode(model):
        out = model.forward_features(x, end=position)
    return tuple(out.shape[1:])


def feature_shapes(model: BlockModel) -> list[tuple[int, ...]]:
    """Per-sample output shapes of the stem and of every block (one dry run of one sample)."""
    shapes: list[tuple[int, ...]] = []

    def record(_module: nn.Module, _args: tuple, out: Tensor) -> None:
        shapes.append(tuple(out.shape[1:]))

    param = next(model.parameters())
    x = torch.zeros(
        1, model.in_chans, model.img_size, model.img_size, device=param.device, dtype=param.dtype
    )
    handles = [m.register_forward_hook(record) for m in (model.stem, *model.blocks)]
    try:
        with torch.no_grad(), eval_mode(model):
            model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def describe_blocks(model: BlockModel) -> list[dict[str, object]]:
    """One row per freeze position, for ``freezecache blocks MODEL``.

    ``position`` 0 is the stem's output, ``p`` the output of the first ``p`` blocks. Each row
    has the ``name`` and ``type`` of the module ending there, what runs with it (``joins``: a
    stage's downsample or norm), its parameter count and the per-sample output ``shape``.
    """
    joins = getattr(model, "block_joins", [[] for _ in model.blocks])
    parts = [("stem", model.stem, []), *zip(model.block_names, model.blocks, joins, strict=True)]
    rows = []
    for position, ((name, module, extra), shape) in enumerate(
        zip(parts, feature_shapes(model), strict=True)
    ):
        inner = getattr(module, "block", module)  # a timm block inside its wrapper
        rows.append(
            {
                "position": position,
                "name": name,
                "type": type(inner).__name__,
                "joins": list(extra),
                "params": sum(p.numel() for p in module.parameters()),
                "shape": shape,
            }
        )
    return rows


from freezecache.models.loading import load_checkpoint  # noqa: E402 (needs BlockModel)

__all__ = [
    "LAYOUTS",
    "BlockModel",
    "create_model",
    "describe_blocks",
    "eval_mode",
    "feature_shape",
    "feature_shapes",
    "list_models",
    "load_checkpoint",
    "segment_probe",
    "split",
]
