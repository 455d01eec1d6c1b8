"""Augmentation of raw image batches and of cached feature maps / tokens.

All functions work on whole batches with an explicit torch.Generator, so a run is
reproducible whatever the number of loader workers, and resuming at an epoch boundary
replays the same draws.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from freezecache.config import Augment

MODES = ("none", "standard", "similarity")


def _draw(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0,1) draws made on the CPU generator, then moved (same numbers on any device)."""
    return torch.rand(shape, generator=g).to(device)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Pixels (B,C,H,W) in 0..255 (uint8 or float) -> normalized with per-channel mean/std given
    in [0,1] units."""
    x = images.float().div(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop(x: Tensor, pad: int, g: torch.Generator) -> Tensor:
    """Zero-pads by `pad` and crops back to the original size at a random offset per sample."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offs = (torch.randint(0, 2 * pad + 1, (b, 2), generator=g)).to(x.device)
    rows = offs[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offs[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    # gather rows then columns: (B,C,Hp,Wp) -> (B,C,H,Wp) -> (B,C,H,W)
    idx_r = rows.view(b, 1, h, 1).expand(b, c, h, padded.shape[3])
    out = padded.gather(2, idx_r)
    idx_c = cols.view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, idx_c)


def random_flip_mask(batch: int, p: float, g: torch.Generator, device: torch.device) -> Tensor:
    """Boolean (B,) mask of the samples to flip."""
    return _draw((batch,), g, device) < p


def flip_where(x: Tensor, mask: Tensor) -> Tensor:
    """Horizontally flips the samples selected by `mask` (last axis is width)."""
    return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def augment_images(x: Tensor, *, crop_pad: int, hflip: bool, g: torch.Generator) -> Tensor:
    """The standard raw-image augmentation: padded random crop and horizontal flip."""
    x = random_crop(x, crop_pad, g)
    if hflip:
        x = flip_where(x, random_flip_mask(x.shape[0], 0.5, g, x.device))
    return x


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Depthwise 3x3 Gaussian blur of (B,C,H,W) maps."""
    r = torch.arange(-1, 2, dtype=x.dtype, device=x.device)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, k2, padding=1, groups=x.shape[1])


def replace_channels(flipped: Tensor, stored: Tensor, channels: Tensor) -> Tensor:
    """Puts the stored F(flip(x)) channels in place of the flip-sensitive ones of flip(F(x))."""
    out = flipped.clone()
    out[:, channels] = stored.to(out.dtype)
    return out


def replace_tokens(tokens: Tensor, stored: Tensor, positions: Tensor) -> Tensor:
    """Substitutes stored augmented tokens (B,m,D) at per-sample positions (B,m) of (B,N,D)."""
    out = tokens.clone()
    idx = positions.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    out.scatter_(1, idx, stored.to(out.dtype))
    return out


def augmented_view(x: Tensor, extra: Tensor | None, where: Tensor | None) -> Tensor:
    """The deterministic 'augmented twin' the cache can give: F(flip(x)) approximated by flip(F(x))
    with the stored channels put back (CNN, x 4-D) or the stored tokens substituted (ViT, x 3-D).
    `where` is the channel index (CNN) or the per-sample token positions (ViT)."""
    if x.dim() == 4:
        flipped = x.flip(-1)
        return flipped if extra is None else replace_channels(flipped, extra, where)
    return x if extra is None else replace_tokens(x, extra, where)


def augment_features(
    x: Tensor,
    *,
    mode: str,
    g: torch.Generator,
    flip_p: float,
    crop_pad: int,
    noise_std: float,
    blur_p: float = 0.0,
    blur_sigma: float = 0.5,
    extra: Tensor | None = None,
    where: Tensor | None = None,
) -> Tensor:
    """Augments a batch of cached features.

    CNN maps (B,C,H,W): `standard` flips, crops and adds noise directly on the maps (the
    paper's "Discard"); `similarity` does the same but flipped samples get their stored
    flip-sensitive channels back ("Discard & Aug."). ViT tokens (B,N,D): spatial transforms
    do not apply; `similarity` substitutes the stored augmented tokens for the drawn samples,
    both modes add noise.
    """
    if mode == "none":
        return x
    b = x.shape[0]
    flip = random_flip_mask(b, flip_p, g, x.device)
    if x.dim() == 4:
        if mode == "similarity" and extra is not None:
            flipped = replace_channels(x.flip(-1), extra, where)
        else:
            flipped = x.flip(-1)
        x = torch.where(flip.view(-1, 1, 1, 1), flipped, x)
        x = random_crop(x, crop_pad, g)
        if blur_p > 0:
            blur = _draw((b,), g, x.device) < blur_p
            x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, blur_sigma), x)
    elif mode == "similarity" and extra is not None:
        x = torch.where(flip.view(-1, 1, 1), replace_tokens(x, extra, where), x)
    if noise_std > 0:
        scale = noise_std * x.detach().float().std().item()
        noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        x = x + scale * noise
    return x


def scaled_pad(pad: int, feature_size: int, img_size: int) -> int:
    """Crop padding for a feature map: the input padding scaled to its resolution (at least 1)."""
    if pad <= 0:
        return 0
    return max(1, math.floor(pad * feature_size / img_size + 0.5))


def augment_cached(
    x: Tensor,
    a: Augment,
    *,
    mode: str,
    g: torch.Generator,
    crop_pad: int,
    extra: Tensor | None = None,
    where: Tensor | None = None,
) -> Tensor:
    """:func:`augment_features` with the knobs of the ``augment`` params section."""
    return augment_features(
        x,
        mode=mode,
        g=g,
        flip_p=a.flip_p,
        crop_pad=crop_pad,
        noise_std=a.noise_std,
        blur_p=a.blur_p,
        blur_sigma=a.blur_sigma,
        extra=extra,
        where=where,
    )
