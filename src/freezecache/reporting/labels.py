"""How tables and plots name the methods (as the paper's tables print them).

Kept apart from :mod:`freezecache.core.methods`, which every training stage imports, so that
renaming a label reruns only the report, the plan and the plots, never training."""

from __future__ import annotations

LABELS = {
    "normal": "Normal",
    "freezeout": "FreezeOut",
    "normal_noflip": "Normal, no flips (control)",
    "discard": "Ours w/ Discard",
    "discard_aug": "Ours w/ Discard & Aug.",
    "discard_noaug": "Discard, no augmentation",
}


def label(name: str) -> str:
    return LABELS[name]
