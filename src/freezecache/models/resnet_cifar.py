"""CIFAR-style ResNets (He et al. 2016, §4.2): 6n+2 layers, 3 stages of n basic blocks."""

from __future__ import annotations

from torch import Tensor, nn

from freezecache.models import BlockModel

_STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual; option-B (1x1 conv+BN) shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PoolLinearHead(nn.Module):
    """Global average pool, flatten, linear classifier: ``(B, C, H, W) -> (B, classes)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # (B, C, 1, 1) -> (B, C)


def _stem(in_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, _STAGE_WIDTHS[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(_STAGE_WIDTHS[0]),
        nn.ReLU(inplace=True),
    )


def _blocks(n: int) -> list[BasicBlock]:
    """``n`` blocks per stage; the first block of stages 2 and 3 halves the resolution."""
    blocks, in_planes = [], _STAGE_WIDTHS[0]
    for stage, planes in enumerate(_STAGE_WIDTHS):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_planes, planes, stride))
            in_planes = planes
    return blocks


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (He et al.), BN to identity; linear layers keep torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(
    depth: int, *, num_classes: int, in_chans: int = 3, img_size: int = 32
) -> BlockModel:
    """ResNet-``depth`` (depth = 6n + 2) for small images; any ``img_size`` works."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    model = BlockModel(
        _stem(in_chans),
        _blocks((depth - 2) // 6),
        PoolLinearHead(_STAGE_WIDTHS[-1], num_classes),
        layout="nchw",
        in_chans=in_chans,
        img_size=img_size,
        num_classes=num_classes,
    )
    _init_weights(model)
    return model


def resnet20(*, num_classes: int, in_chans: int = 3, img_size: int = 32) -> BlockModel:
    """ResNet-20: 9 blocks."""
    return cifar_resnet(20, num_classes=num_classes, in_chans=in_chans, img_size=img_size)


def resnet32(*, num_classes: int, in_chans: int = 3, img_size: int = 32) -> BlockModel:
    """ResNet-32: 15 blocks (the paper's CIFAR model)."""
    return cifar_resnet(32, num_classes=num_classes, in_chans=in_chans, img_size=img_size)


def resnet44(*, num_classes: int, in_chans: int = 3, img_size: int = 32) -> BlockModel:
    """ResNet-44: 21 blocks."""
    return cifar_resnet(44, num_classes=num_classes, in_chans=in_chans, img_size=img_size)


def resnet56(*, num_classes: int, in_chans: int = 3, img_size: int = 32) -> BlockModel:
    """ResNet-56: 27 blocks."""
    return cifar_resnet(56, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
