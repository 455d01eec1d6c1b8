"""Bottleneck ResNet-50 built on torchvision's, so torchvision/timm checkpoints load."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

from torch import Tensor, nn

from freezecache.core.errors import FreezecacheError
from freezecache.models import BlockModel
from freezecache.models.resnet_cifar import PoolLinearHead

log = logging.getLogger(__name__)

_STAGES = ("layer1", "layer2", "layer3", "layer4")
_CIFAR_STEM_MAX_IMG = 64  # at or below this size the ImageNet stem's 4x downsampling hurts
_STEM_KEY = re.compile(r"^(conv1|bn1)\.")
_STAGE_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")
_FC_KEY = re.compile(r"^fc\.")


class ResNet50(BlockModel):
    """ResNet-50 as 16 bottleneck blocks (3 + 4 + 6 + 3) between a stem and a pooled head."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        cifar_stem: bool,
        zero_init_residual: bool,
    ) -> None:
        from torchvision.models import resnet50 as tv_resnet50

        tv = tv_resnet50(
            weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        stem = OrderedDict(conv1=_stem_conv(in_chans, cifar_stem), bn1=tv.bn1, relu=tv.relu)
        if not cifar_stem:
            stem["maxpool"] = tv.maxpool
        head = PoolLinearHead(tv.fc.in_features, num_classes)
        head.fc = tv.fc
        super().__init__(
            nn.Sequential(stem),
            [block for s in _STAGES for block in getattr(tv, s)],
            head,
            layout="nchw",
            in_chans=in_chans,
            img_size=img_size,
            num_classes=num_classes,
        )
        self.cifar_stem = cifar_stem
        self.stage_sizes = [len(getattr(tv, s)) for s in _STAGES]  # (3, 4, 6, 3)
        self.block_names = [
            f"{s}.{i}" for s, n in zip(_STAGES, self.stage_sizes, strict=True) for i in range(n)
        ]

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename torchvision/timm keys (``conv1``, ``layerS.I``, ``fc``) and fit the first conv."""
        if any(_STAGE_KEY.match(k) for k in state_dict):
            state_dict = {self._rename(k): v for k, v in state_dict.items()}
        return self._fit_stem_conv(state_dict)

    def _rename(self, key: str) -> str:
        """``layer2.1.conv1.weight`` -> ``blocks.4.conv1.weight`` etc.; unknown keys unchanged."""
        if _STEM_KEY.match(key):
            return "stem." + key
        if _FC_KEY.match(key):
            return "head." + key
        match = _STAGE_KEY.match(key)
        if match is None:
            return key
        stage, index = int(match.group(1)) - 1, int(match.group(2))
        return f"blocks.{sum(self.stage_sizes[:stage]) + index}." + key[match.end() :]

    def _fit_stem_conv(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Adapt the first conv to ``in_chans``; reject a 7x7 ImageNet stem for the CIFAR stem."""
        key = "stem.conv1.weight"
        weight = state_dict.get(key)
        own = self.stem.conv1.weight
        if weight is None or weight.shape == own.shape:
            return state_dict
        if weight.shape[2:] != own.shape[2:]:
            raise FreezecacheError(
                f"checkpoint stem conv is {tuple(weight.shape[2:])} but model resnet50 has "
                f"{tuple(own.shape[2:])} (cifar_stem={self.cifar_stem}) — "
                f"create it with cifar_stem={not self.cifar_stem}"
            )
        if weight.shape[1] != own.shape[1]:
            from timm.models import adapt_input_conv

            log.info(
                "adapting checkpoint stem conv from %d to %d input channels",
                weight.shape[1],
                own.shape[1],
            )
            state_dict = {**state_dict, key: adapt_input_conv(own.shape[1], weight)}
        return state_dict


def _stem_conv(in_chans: int, cifar_stem: bool) -> nn.Conv2d:
    """ImageNet 7x7/2 conv, or a 3x3/1 conv for small images; initialised as torchvision does."""
    if cifar_stem:
        conv = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def resnet50(
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    cifar_stem: bool | None = None,
    zero_init_residual: bool = False,
) -> BlockModel:
    """ResNet-50; ``cifar_stem`` (3x3/1 conv, no max-pool) defaults to ``img_size <= 64``.

    ``zero_init_residual`` zeroes each block's last BN scale, as in torchvision.
    """
    if cifar_stem is None:
        cifar_stem = img_size <= _CIFAR_STEM_MAX_IMG
    return ResNet50(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        cifar_stem=cifar_stem,
        zero_init_residual=zero_init_residual,
    )
