"""The methods freezecache compares, declared once: name, kind, augmentation and what follows
from them (labels for tables and plots live with the report,
:data:`freezecache.reporting.labels.LABELS`,
so renaming one reruns no training).

``baseline`` methods train the model on raw images (one stage each); ``discard`` methods freeze
at every freeze point, cache the frozen prefix's outputs and train the rest from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    kind: Literal["baseline", "discard"]
    freezes: bool = False  # baselines: freeze blocks at the freeze points (FreezeOut)
    flips: bool = True  # False: a control that never flips, whatever train.flip_p says
    shared_prefix: bool = True  # starts from the shared run up to the first freeze point
    augment: Literal["none", "standard", "similarity"] = "none"  # discard: feature augmentation

    @property
    def needs_ranking(self) -> bool:
        """Stores flip-sensitive channels (CNN) or tokens (ViT) chosen by a ranking pass."""
        return self.augment == "similarity"

    @property
    def uses_points(self) -> bool:
        """Follows the freeze points: freezes there (FreezeOut) or discards (the discard kind)."""
        return self.freezes or self.kind == "discard"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("normal", "baseline"),
        Method("freezeout", "baseline", freezes=True),
        # Control: does Normal gain from flips at all on this data? Trained without flips from
        # the starting weights, so no epoch of it saw a flip.
        Method("normal_noflip", "baseline", flips=False, shared_prefix=False),
        Method("discard", "discard", augment="standard"),
        Method("discard_aug", "discard", augment="similarity"),
        Method("discard_noaug", "discard", augment="none"),
    )
}
BASELINES = tuple(n for n, m in METHODS.items() if m.kind == "baseline")
DISCARD = tuple(n for n, m in METHODS.items() if m.kind == "discard")


def method(name: str) -> Method:
    """The registered method ``name`` (names are validated with the params)."""
    return METHODS[name]
