"""Which channels (spatial maps) or tokens a flip changes most: the paper's sections 3.2 and 3.3.

Maps may be NCHW or NHWC (``layout``, as on the model); tokens may start with class,
distillation or register tokens (``num_prefix_tokens``), which are never selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from freezecache.core.errors import FreezecacheError
from freezecache.training import augment


def _gauss_window(size: int, sigma: float, device: torch.device) -> Tensor:
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    return k[:, None] * k[None, :]


def ssim_per_channel(a: Tensor, b: Tensor, data_range: Tensor) -> Tensor:
    """Mean SSIM of each channel over a batch: a, b (B,C,H,W); data_range (C,) -> (C,).

    Gaussian window (sigma 1.5, 7 wide, or the map size when smaller), constants of Wang et
    al. 2004 scaled by each channel's dynamic range so dead or tiny channels compare fairly.
    """
    _, c, h, w = a.shape
    size = min(7, h, w)
    win = _gauss_window(size, 1.5, a.device).expand(c, 1, size, size)

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, win, groups=c)

    rng = data_range.clamp_min(1e-8).view(1, c, 1, 1)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim.mean(dim=(0, 2, 3))


class ChannelSensitivity:
    """Accumulates per-channel SSIM between flip(F(x)) and F(flip(x)) over batches.

    ``layout`` is ``"nchw"`` (default) or ``"nhwc"``: where the channel and W axes are.
    """

    def __init__(self, layout: str = "nchw") -> None:
        if layout not in ("nchw", "nhwc"):
            raise FreezecacheError(
                f"channel sensitivity needs a spatial layout, not {layout!r} — use nchw or nhwc"
            )
        self.layout = layout
        self.total: Tensor | None = None
        self.count = 0

    def update(self, feats: Tensor, feats_of_flipped: Tensor) -> None:
        """Add a batch of F(x) and F(flip(x)), both in this sensitivity's layout."""
        a = augment.to_nchw(augment.flip_width(feats, self.layout), self.layout).float()
        b = augment.to_nchw(feats_of_flipped, self.layout).float()
        lo = torch.minimum(a.amin(dim=(0, 2, 3)), b.amin(dim=(0, 2, 3)))
        hi = torch.maximum(a.amax(dim=(0, 2, 3)), b.amax(dim=(0, 2, 3)))
        s = ssim_per_channel(a, b, hi - lo) * a.shape[0]
        self.total = s if self.total is None else self.total + s
        self.count += a.shape[0]

    def scores(self) -> Tensor:
        """Mean SSIM per channel (C,): low = flip-sensitive."""
        return (self.total / self.count).cpu()


def most_sensitive(scores: Tensor, gamma: float) -> Tensor:
    """The round(gamma * C) channels with the lowest SSIM, in ascending score order."""
    k = round(gamma * scores.numel())
    return torch.argsort(scores, stable=True)[:k]


def match_tokens(orig: Tensor, aug: Tensor) -> tuple[Tensor, Tensor]:
    """Algorithm 1's matching, batched: for each original token its most similar augmented token.

    orig, aug: (B,N,D). Returns (best_j (B,N), best_sim (B,N)). The paper's text matches by the
    highest cosine similarity (its pseudo-code's `<` would pick the least similar token, which
    contradicts the text; we follow the text).
    """
    sim = F.normalize(orig.float(), dim=-1) @ F.normalize(aug.float(), dim=-1).transpose(1, 2)
    best_sim, best_j = sim.max(dim=-1)
    return best_j, best_sim


def num_selected_tokens(num_tokens: int, alpha: float, num_prefix_tokens: int = 0) -> int:
    """How many tokens :func:`select_tokens` stores per sample: alpha of the non-prefix ones."""
    return round(alpha * (num_tokens - num_prefix_tokens))


def select_tokens(
    orig: Tensor, aug: Tensor, alpha: float, *, num_prefix_tokens: int = 0, count: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, the alpha fraction of original positions whose best match is least similar
    (``count`` of them instead, when given: what a cache's recipe says it stores).

    The first ``num_prefix_tokens`` (class/distillation/register tokens) are neither selected
    nor matched: only patch tokens take part, and positions count in the whole sequence.
    Returns (positions (B,m), stored augmented tokens (B,m,D), their similarities (B,m)).
    """
    p = num_prefix_tokens
    if not 0 <= p < orig.shape[1]:
        n = orig.shape[1]
        raise FreezecacheError(f"num_prefix_tokens={p} does not fit {n} tokens — use 0..{n - 1}")
    best_j, best_sim = match_tokens(orig[:, p:], aug[:, p:])
    m = count if count is not None else num_selected_tokens(orig.shape[1], alpha, p)
    order = torch.argsort(best_sim, dim=1, stable=True)[:, :m]  # (B, m) least similar first
    j = best_j.gather(1, order) + p
    stored = aug.gather(1, j.unsqueeze(-1).expand(-1, -1, aug.shape[-1]))
    return order + p, stored, best_sim.gather(1, order)
