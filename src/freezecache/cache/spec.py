"""One cache's recipe, built once from params, the model and the freeze point.

The cache stage writes the cache a spec describes and the planner measures the same spec on a
batch, so the two cannot drift: the codec and its options, the chunking, the feature shape and
how many flip-sensitive channels or replacement tokens are stored next to each sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from freezecache.cache.format import Layout
from freezecache.codecs import Codec
from freezecache.codecs.registry import make_codec
from freezecache.config import Config
from freezecache.models import BlockModel, feature_shape
from freezecache.training.augment import stored_channels_shape
from freezecache.training.rank import num_selected_tokens


@dataclass(frozen=True)
class CacheSpec:
    """What the cache at one freeze point holds and how it is coded.

    ``stored``: flip-sensitive channels (CNN maps) or replacement tokens (ViT) stored per sample
    next to the features, 0 when the method stores none (then there is no extra data)."""

    codec: str
    tolerance: float
    chunk_size: int
    sample_shape: tuple[int, ...]
    layout: str  # the model's feature layout: nchw, nhwc or tokens
    stored: int = 0
    num_prefix_tokens: int = 0
    codec_options: dict = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        sample_shape: tuple[int, ...],
        layout: str,
        *,
        codec: str = "quant",
        tolerance: float = 0.1,
        relative: bool = False,
        coding: str = "zstd",
        chunk_size: int = 1,
        stored: int = 0,
        num_prefix_tokens: int = 0,
    ) -> CacheSpec:
        """The spec of features of ``sample_shape`` laid out as ``layout`` (nchw, nhwc or
        tokens): the codec's options follow from the layout (quant scales per channel)."""
        options = {}
        if codec == "quant":
            axis = 1 if layout == "nchw" else -1  # as BlockModel.channel_axis
            options = {"channel_axis": axis, "relative": relative, "coding": coding}
        return cls(
            codec=codec,
            tolerance=tolerance,
            chunk_size=chunk_size,
            sample_shape=tuple(sample_shape),
            layout=layout,
            stored=stored,
            num_prefix_tokens=num_prefix_tokens,
            codec_options=options,
        )

    @classmethod
    def at(cls, cfg: Config, model: BlockModel, block: int, index: int, ranked: bool) -> CacheSpec:
        """The spec of freeze point ``index`` (1-based) at ``block``; ``ranked``: the method
        stores what a ranking pass finds flip-sensitive (Discard & Aug.)."""
        c = cfg.cache
        shape = tuple(feature_shape(model, block))
        stored = 0
        if ranked and model.kind == "cnn":
            channels = shape[-1] if model.layout == "nhwc" else shape[0]
            stored = round(cfg.rank.gamma * channels)  # as rank.most_sensitive keeps
        elif ranked:
            stored = num_selected_tokens(shape[0], cfg.rank.alpha, model.num_prefix_tokens)
        return cls.make(
            shape,
            model.layout,
            codec=c.codec,
            tolerance=c.tolerance_at(index),
            relative=c.relative,
            coding=c.coding,
            chunk_size=c.chunk_size,
            stored=stored,
            num_prefix_tokens=model.num_prefix_tokens,
        )

    @property
    def extras(self) -> str | None:
        """What is stored next to the features: "channels", "tokens" or None."""
        if not self.stored:
            return None
        return "tokens" if self.layout == "tokens" else "channels"

    @property
    def extra_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the stored extras, laid out like the features."""
        if self.extras == "channels":
            return stored_channels_shape(self.sample_shape, self.stored, self.layout)
        if self.extras == "tokens":
            return (self.stored, self.sample_shape[1])
        return None

    def new_codec(self) -> Codec:
        """A fresh codec (data-calibrated codecs calibrate on what they see first)."""
        return make_codec(self.codec, self.tolerance, **self.codec_options)

    def layout_for(self, num_samples: int, channels: list[int] | None = None) -> Layout:
        """The file layout for ``num_samples`` samples; ``channels``: the stored channels'
        indices (CNN), which the file records."""
        return Layout(
            self.sample_shape,
            num_samples,
            self.chunk_size,
            self.extra_shape,
            tuple(channels or ()),
        )
