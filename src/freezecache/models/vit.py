"""DeiT (timm's VisionTransformer) as token stem -> transformer blocks -> pooled head."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from freezecache.core.errors import ModelOptionError
from freezecache.models import BlockModel, divisors, unsupported_option

log = logging.getLogger(__name__)

_TIMM_NAMES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
_SMALL_IMG = 128  # below this, 16x16 patches leave too few tokens; default to 4x4
# timm key prefixes that move under our stem / head (timm's ``head.*`` becomes ``head.fc.*``)
_TIMM_STEM_KEYS = ("cls_token", "pos_embed", "patch_embed.", "norm_pre.")
_TIMM_HEAD_KEYS = ("norm.", "fc_norm.")


class ViTStem(nn.Module):
    """Patch embedding, class token and position embedding: ``(B, C, H, W) -> (B, 1+N, D)``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (1, 1, D) -> (B, 1, D)
        # DeiT's position embedding covers the class token too: concat first, then add.
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class ViTHead(nn.Module):
    """Final norm, class-token (or mean-token) pooling, classifier: ``(B, 1+N, D) -> (B, K)``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head_drop = vit.head_drop
        self.fc = vit.head
        self.global_pool = vit.global_pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)  # (B, D)
        return self.fc(self.head_drop(self.fc_norm(x)))


class DeiT(BlockModel):
    """A timm DeiT split into :class:`ViTStem`, its transformer blocks and :class:`ViTHead`."""

    def __init__(self, vit: nn.Module, *, in_chans: int, img_size: int, num_classes: int) -> None:
        _check_supported(vit)
        super().__init__(
            ViTStem(vit),
            list(vit.blocks),
            ViTHead(vit),
            layout="tokens",
            num_prefix_tokens=1,
            in_chans=in_chans,
            img_size=img_size,
            num_classes=num_classes,
        )

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rename timm keys onto stem/head and resample patch/position embeddings to fit."""
        if "cls_token" in state_dict:
            state_dict = {_rename_timm(k): v for k, v in state_dict.items()}
        return self._fit_pos_embed(self._fit_patch_embed(state_dict))

    def _fit_patch_embed(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Adapt the patch projection to our input channels and patch size."""
        key = "stem.patch_embed.proj.weight"
        weight, own = state_dict.get(key), self.stem.patch_embed.proj.weight
        if weight is None or weight.ndim != 4 or weight.shape == own.shape:
            return state_dict
        if weight.shape[1] != own.shape[1]:
            from timm.models import adapt_input_conv

            log.info(
                "adapting checkpoint patch embedding from %d to %d input channels",
                weight.shape[1],
                own.shape[1],
            )
            weight = adapt_input_conv(own.shape[1], weight)
        if weight.shape[2:] != own.shape[2:]:
            from timm.layers import resample_patch_embed

            log.info(
                "resampling checkpoint patch embedding from %s to %s patches",
                tuple(weight.shape[2:]),
                tuple(own.shape[2:]),
            )
            weight = resample_patch_embed(weight, list(own.shape[2:]))
        return {**state_dict, key: weight}

    def _fit_pos_embed(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Interpolate the position embedding to our token grid (image / patch size)."""
        key = "stem.pos_embed"
        posemb, own = state_dict.get(key), self.stem.pos_embed
        if posemb is None or posemb.ndim != 3 or posemb.shape == own.shape:
            return state_dict
        if posemb.shape[2] != own.shape[2]:
            return state_dict  # another width: a real mismatch that load_checkpoint reports
        from timm.layers import resample_abs_pos_embed

        grid = list(self.stem.patch_embed.grid_size)
        log.info(
            "resampling checkpoint position embedding from %d to %s tokens + class token",
            posemb.shape[1] - 1,
            grid,
        )
        return {**state_dict, key: resample_abs_pos_embed(posemb, grid, num_prefix_tokens=1)}


def _rename_timm(key: str) -> str:
    """timm ``VisionTransformer`` key -> our key (``norm.w`` -> ``head.norm.w`` etc.)."""
    if key.startswith(_TIMM_STEM_KEYS):
        return "stem." + key
    if key.startswith(_TIMM_HEAD_KEYS):
        return "head." + key
    if key.startswith("head."):
        return "head.fc." + key[len("head.") :]
    return key


def _check_supported(vit: nn.Module) -> None:
    """Our stem/head reproduce DeiT's layout only: one class token, no register tokens."""
    unsupported = {
        "no class token": vit.cls_token is None,
        "register tokens": vit.reg_token is not None,
        "position embedding without the class token": vit.no_embed_class,
        "dynamic image size": vit.dynamic_img_size,
        "attention pooling": vit.attn_pool is not None,
        f"global_pool={vit.global_pool!r}": vit.global_pool not in ("token", "avg"),
        "pooling over the class token": getattr(vit, "pool_include_prefix", False),
    }
    found = [what for what, bad in unsupported.items() if bad]
    if found:
        raise ModelOptionError(
            "kwargs",
            f"DeiT options give {', '.join(found)}, which the block view does not support — "
            "drop those model options",
        )


def build_timm_vit(
    timm_name: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int,
    **kwargs: object,
) -> nn.Module:
    """timm's VisionTransformer with random weights (never downloads)."""
    import timm

    if img_size % patch_size != 0:
        raise ModelOptionError(
            "kwargs.patch_size",
            f"img_size {img_size} is not a multiple of patch_size {patch_size} — "
            f"pick a patch_size that divides it: {divisors(img_size)}",
        )
    try:
        return timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            patch_size=patch_size,
            **kwargs,
        )
    except TypeError as err:  # timm's way of rejecting an unknown option
        raise unsupported_option(timm_name, err, kwargs) from None


def _deit(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int | None,
    kwargs: dict[str, object],
) -> BlockModel:
    if patch_size is None:
        patch_size = 16 if img_size >= _SMALL_IMG else 4
    vit = build_timm_vit(
        _TIMM_NAMES[name],
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        patch_size=patch_size,
        **kwargs,
    )
    return DeiT(vit, in_chans=in_chans, img_size=img_size, num_classes=num_classes)


def deit_tiny(
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    patch_size: int | None = None,
    **kwargs: object,
) -> BlockModel:
    """DeiT-Ti (192 wide, 12 blocks); ``kwargs`` (e.g. ``drop_path_rate``) go to timm."""
    return _deit("deit_tiny", num_classes, in_chans, img_size, patch_size, kwargs)


def deit_small(
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    patch_size: int | None = None,
    **kwargs: object,
) -> BlockModel:
    """DeiT-S (384 wide, 12 blocks); ``kwargs`` (e.g. ``drop_path_rate``) go to timm."""
    return _deit("deit_small", num_classes, in_chans, img_size, patch_size, kwargs)
