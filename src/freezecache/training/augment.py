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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from freezecache.core.errors import FreezecacheError

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
    return crop_at(x, pad, torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=g).to(x.device))


def crop_at(x: Tensor, pad: int, offs: Tensor) -> Tensor:
    """Zero-pads (B,C,H,W) maps by `pad` and crops back to (H, W) at offsets ``offs`` (B, 2)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
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


def augment_images(x: Tensor, *, crop_pad: int, flip_p: float, g: torch.Generator) -> Tensor:
    """The standard raw-image augmentation: padded random crop, then a horizontal flip with
    probability ``flip_p`` (``train.flip_p``; 0 draws nothing)."""
    x = random_crop(x, crop_pad, g)
    if flip_p > 0:
        x = flip_where(x, random_flip_mask(x.shape[0], flip_p, g, x.device))
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
    tokens are never among them, see :func:`freezecache.training.rank.select_tokens`)."""
    layout = resolve_layout(x, layout)
    if layout != "tokens":
        flipped = flip_width(x, layout)
        return flipped if extra is None else replace_channels(flipped, extra, where, layout)
    return x if extra is None else replace_tokens(x, extra, where)


@dataclass(frozen=True)
class Draws:
    """One batch's random draws for feature augmentation, made on a CPU generator so that every
    device, and the fused CPU kernel (:mod:`freezecache.cache.fused`), sees the same ones."""

    flip: Tensor  # bool (B,): flipped samples
    crop: Tensor | None  # int64 (B, 2): row and column offsets into the padded map, 0..2*pad
    blur: Tensor | None  # bool (B,): blurred samples
    noise_at: Tensor | None  # int64 (B,): where each sample's noise starts in the bank


@dataclass(frozen=True)
class FeatureAug:
    """How a stage augments cached features: the ``augment`` params, resolved for the cache.

    ``crop_pad`` is in feature-map pixels (:func:`scaled_pad`); ``noise_scale`` is the standard
    deviation of the added noise in feature units (``augment.noise_std`` x the std of the cached
    features, measured once per stage, not per batch). Noise comes from a :class:`NoiseBank`.
    ``flip_p`` has no default: it is ``train.flip_p``, the one flip setting of every method.
    """

    mode: str  # none, standard (the paper's Discard) or similarity (Discard & Aug.)
    flip_p: float
    crop_pad: int = 0
    noise_scale: float = 0.0
    blur_p: float = 0.0
    blur_sigma: float = 0.5
    layout: str = "nchw"

    def draw(self, batch: int, g: torch.Generator, bank: NoiseBank | None, numel: int) -> Draws:
        """The draws of one batch of ``batch`` samples of ``numel`` values each."""
        flip = torch.rand((batch,), generator=g) < self.flip_p
        spatial = self.layout != "tokens"
        crop = None
        if spatial and self.crop_pad > 0:
            crop = torch.randint(0, 2 * self.crop_pad + 1, (batch, 2), generator=g)
        blur = torch.rand((batch,), generator=g) < self.blur_p if spatial and self.blur_p else None
        noise_at = None
        if self.noise_scale > 0 and bank is not None:
            noise_at = torch.randint(0, len(bank) - numel + 1, (batch,), generator=g)
        return Draws(flip, crop, blur, noise_at)


class NoiseBank:
    """Gaussian noise for feature augmentation, drawn once: each sample adds the window of
    ``numel`` values that starts at its drawn offset (the shared noise table of Salimans et al.,
    2017, "Evolution Strategies as a Scalable Alternative to Reinforcement Learning").

    Why not fresh noise per value: a cached sample is many times the size of its image (16x at
    block 3 of ResNet-20), and drawing N(0, 1) for each of its values cost as much as the
    suffix's forward on a CPU; a window at a random offset is N(0, 1) per value all the same.
    """

    def __init__(self, numel: int, g: torch.Generator, device: torch.device | str = "cpu"):
        size = max(1 << 20, 16 * numel)
        self.values = torch.randn((size,), generator=g).to(device)

    def __len__(self) -> int:
        return self.values.numel()

    def windows(self, at: Tensor, numel: int) -> Tensor:
        """(B, numel): each sample's window."""
        at = at.to(self.values.device)
        return self.values[at[:, None] + torch.arange(numel, device=at.device)]


def augment_features(
    x: Tensor,
    aug: FeatureAug,
    draws: Draws,
    bank: NoiseBank | None = None,
    *,
    extra: Tensor | None = None,
    where: Tensor | None = None,
) -> Tensor:
    """Augments a batch of cached features with ``draws`` (:meth:`FeatureAug.draw`).

    Spatial maps (NCHW or NHWC): `standard` flips along W, crops (zero padding) and adds noise
    directly on the maps (the paper's "Discard"); `similarity` does the same but flipped samples
    get their stored flip-sensitive channels back ("Discard & Aug."). Tokens (B,N,D): spatial
    transforms do not apply; `similarity` substitutes the stored augmented tokens for the drawn
    samples, both modes add noise. `none` returns ``x``.
    """
    if aug.mode == "none":
        return x
    layout = resolve_layout(x, aug.layout)
    if layout == "nhwc":  # the NCHW code on a permuted view: the same draws, the same result
        extra = None if extra is None else to_nchw(extra, layout)
        x = to_nchw(x, layout)
    flip = draws.flip.to(x.device)
    if layout != "tokens":
        x = _augment_maps(x, flip, aug, draws, extra, where)
    elif aug.mode == "similarity" and extra is not None:
        x = torch.where(flip.view(-1, 1, 1), replace_tokens(x, extra, where), x)
    if draws.noise_at is not None and bank is not None:
        noise = bank.windows(draws.noise_at, x[0].numel()).view(x.shape).to(x.dtype)
        x = x + aug.noise_scale * noise
    return from_nchw(x, layout)


def _augment_maps(
    x: Tensor, flip: Tensor, aug: FeatureAug, draws: Draws, extra: Tensor | None, where
) -> Tensor:
    """Flip (with channel replacement in `similarity` mode), crop and blur of (B,C,H,W) maps."""
    flipped = x.flip(-1)
    if aug.mode == "similarity" and extra is not None:
        flipped = replace_channels(flipped, extra, where)
    x = torch.where(flip.view(-1, 1, 1, 1), flipped, x)
    if draws.crop is not None:
        x = crop_at(x, aug.crop_pad, draws.crop.to(x.device))
    if draws.blur is not None:
        blur = draws.blur.to(x.device)
        x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, aug.blur_sigma), x)
    return x


def scaled_pad(pad: int, feature_size: int, img_size: int) -> int:
    """Crop padding for a feature map: the input padding scaled to its resolution (at least 1)."""
    if pad <= 0:
        return 0
    return max(1, math.floor(pad * feature_size / img_size + 0.5))
