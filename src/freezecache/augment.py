"""Augmentation of raw image batches and of cached feature maps / tokens.

All functions work on whole batches with an explicit torch.Generator, so a run is
reproducible whatever the number of loader workers, and resuming at an epoch boundary
replays the same draws.

Feature functions follow the feature layout (a model's ``layout``), not the model: ``"nchw"``
and ``"nhwc"`` maps get flips along W, crops, blur and similarity-aware channel replacement on
their channel axis; ``"tokens"`` get token replacement. ``layout=None`` keeps the older rule
(4-D = NCHW, 3-D = tokens). NHWC maps draw the same random numbers as NCHW ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from freezecache.config import Augment
from freezecache.errors import FreezecacheError

MODES = ("none", "standard", "similarity")
LAYOUTS = ("nchw", "nhwc", "tokens")
_RANK = {"nchw": 4, "nhwc": 4, "tokens": 3}


def resolve_layout(x: Tensor, layout: str | None) -> str:
    """``layout``, checked against ``x``'s rank; None means 4-D = NCHW, 3-D = tokens."""
    if layout is None:
        layout = "nchw" if x.dim() == 4 else "tokens"
    if layout not in _RANK:
        raise FreezecacheError(f"feature layout {layout!r} is unknown — use one of {LAYOUTS}")
    if x.dim() != _RANK[layout]:
        raise FreezecacheError(
            f"features of shape {tuple(x.shape)} are not {layout} — "
            f"{layout} needs {_RANK[layout]}-D batches"
        )
    return layout


def to_nchw(x: Tensor, layout: str) -> Tensor:
    """A (B,C,H,W) view of a spatial batch in ``layout`` (NHWC is permuted, not copied)."""
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


def from_nchw(x: Tensor, layout: str) -> Tensor:
    """Back from :func:`to_nchw`'s (B,C,H,W) to ``layout``."""
    return x.permute(0, 2, 3, 1) if layout == "nhwc" else x


def flip_width(x: Tensor, layout: str | None = None) -> Tensor:
    """Mirror a spatial batch along W (the last axis in NCHW, the third in NHWC)."""
    return x.flip(2 if resolve_layout(x, layout) == "nhwc" else -1)


def take_channels(x: Tensor, channels: Tensor, layout: str | None = None) -> Tensor:
    """The ``channels`` of a spatial batch, on its channel axis: what the cache stores."""
    if resolve_layout(x, layout) == "nhwc":
        return x[..., channels]
    return x[:, channels]


def map_width(sample_shape: tuple[int, ...], layout: str) -> int:
    """Width W of a per-sample map shape (C,H,W) or (H,W,C), e.g. for :func:`scaled_pad`."""
    return sample_shape[-2] if layout == "nhwc" else sample_shape[-1]


def stored_channels_shape(sample_shape: tuple[int, ...], k: int, layout: str) -> tuple[int, ...]:
    """Per-sample shape of :func:`take_channels` for ``k`` channels of ``sample_shape``."""
    if layout == "nhwc":
        return (*sample_shape[:-1], k)
    return (k, *sample_shape[1:])


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


def replace_channels(
    flipped: Tensor, stored: Tensor, channels: Tensor, layout: str | None = None
) -> Tensor:
    """Puts the stored F(flip(x)) channels in place of the flip-sensitive ones of flip(F(x)).

    ``stored`` is laid out like ``flipped`` (see :func:`take_channels`): (B,k,H,W) for NCHW,
    (B,H,W,k) for NHWC.
    """
    out = flipped.clone()
    if resolve_layout(flipped, layout) == "nhwc":
        out[..., channels] = stored.to(out.dtype)
    else:
        out[:, channels] = stored.to(out.dtype)
    return out


def replace_tokens(tokens: Tensor, stored: Tensor, positions: Tensor) -> Tensor:
    """Substitutes stored augmented tokens (B,m,D) at per-sample positions (B,m) of (B,N,D)."""
    out = tokens.clone()
    idx = positions.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    out.scatter_(1, idx, stored.to(out.dtype))
    return out


def augmented_view(
    x: Tensor, extra: Tensor | None, where: Tensor | None, *, layout: str | None = None
) -> Tensor:
    """The deterministic 'augmented twin' the cache can give: F(flip(x)) approximated by flip(F(x))
    with the stored channels put back (spatial maps) or the stored tokens substituted (tokens).
    `where` is the channel index (maps) or the per-sample token positions (tokens; prefix
    tokens are never among them, see :func:`freezecache.rank.select_tokens`)."""
    layout = resolve_layout(x, layout)
    if layout != "tokens":
        flipped = flip_width(x, layout)
        return flipped if extra is None else replace_channels(flipped, extra, where, layout)
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
    layout: str | None = None,
) -> Tensor:
    """Augments a batch of cached features.

    Spatial maps (NCHW or NHWC): `standard` flips along W, crops and adds noise directly on
    the maps (the paper's "Discard"); `similarity` does the same but flipped samples get their
    stored flip-sensitive channels back ("Discard & Aug."). Tokens (B,N,D): spatial transforms
    do not apply; `similarity` substitutes the stored augmented tokens for the drawn samples,
    both modes add noise.
    """
    if mode == "none":
        return x
    layout = resolve_layout(x, layout)
    if layout == "nhwc":  # the NCHW code on a permuted view: the same draws, the same result
        extra = None if extra is None else to_nchw(extra, layout)
        x = to_nchw(x, layout)
    b = x.shape[0]
    flip = random_flip_mask(b, flip_p, g, x.device)
    if layout != "tokens":
        x = _augment_maps(x, flip, mode, g, crop_pad, blur_p, blur_sigma, extra, where)
    elif mode == "similarity" and extra is not None:
        x = torch.where(flip.view(-1, 1, 1), replace_tokens(x, extra, where), x)
    if noise_std > 0:
        scale = noise_std * x.detach().float().std().item()
        noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        x = x + scale * noise
    return from_nchw(x, layout)


def _augment_maps(
    x: Tensor,
    flip: Tensor,
    mode: str,
    g: torch.Generator,
    crop_pad: int,
    blur_p: float,
    blur_sigma: float,
    extra: Tensor | None,
    where: Tensor | None,
) -> Tensor:
    """Flip (with channel replacement in `similarity` mode), crop and blur of (B,C,H,W) maps."""
    flipped = x.flip(-1)
    if mode == "similarity" and extra is not None:
        flipped = replace_channels(flipped, extra, where)
    x = torch.where(flip.view(-1, 1, 1, 1), flipped, x)
    x = random_crop(x, crop_pad, g)
    if blur_p > 0:
        blur = _draw((x.shape[0],), g, x.device) < blur_p
        x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, blur_sigma), x)
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
    layout: str | None = None,
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
        layout=layout,
    )
