"""Choose each method's augmentation on the validation split (never the test set), issue 23.

Three steps, each varying one factor at a time from the profile's recipe, every variant over
the profile's seeds, through the pipeline's
own stage functions (benchmarks/_runs.py):

1. the raw-image recipe (``train.flip_p``, ``train.crop_pad``) of the run up to the freeze point
   shared by every method and of Normal and FreezeOut after it, chosen by the mean validation
   accuracy of Normal and FreezeOut; flips are one setting for every method, so the discard
   methods flip their cached features as step 1 chose;
2. with that shared run, the rest of the cached-feature recipe of the discard methods
   (``augment.crop_pad``, ``augment.noise_std``), chosen by the mean of Discard and Discard & Aug.
   (they share the ``augment`` section);
3. with that recipe, how the suffix's BatchNorm statistics end (``train.bn_recalibrate``).

    python benchmarks/recipe_search.py --out results/recipe_search

writes recipe_search.json and .md (the README shows the table); the default profile then
takes the choice, with its validation numbers in a comment.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import typer

import _runs
from freezecache.config import load_config
from freezecache.core.io import atomic_write_json, atomic_write_text
from freezecache.reporting.labels import label
from freezecache.tooling.results import stamp

log = logging.getLogger("recipe_search")

# One factor at a time from the profile's recipe (flips, crop 2, noise 0.05): on two cores a full
# grid of every step over three seeds takes hours; each factor's effect is what the choice needs.
# (results/recipe_search.md was measured when flips were two keys, train.hflip and augment.flip_p.)
IMAGE = {
    "flips + crop": {"flip_p": 0.5, "crop_pad": 2},
    "crop": {"flip_p": 0.0, "crop_pad": 2},
    "flips": {"flip_p": 0.5, "crop_pad": 0},
}
FEATURE = {
    "crop 2, noise 0.05": {"crop_pad": 2, "noise_std": 0.05},
    "no crop, noise 0.05": {"crop_pad": 0, "noise_std": 0.05},
    "crop 2, no noise": {"crop_pad": 2, "noise_std": 0.0},
}
BATCHNORM = ("off", "cache", "images")  # the profile's own is step 2's chosen run, not rerun


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _score(cfg, seeds: list[int], methods: tuple[str, ...]) -> dict:
    """Validation accuracy per method and seed, and the mean over both."""
    acc = {m: [_runs.run(cfg, s, m) for s in seeds] for m in methods}
    for m, v in acc.items():
        log.info("  %s: %s", m, ", ".join(f"{a:.2f}" for a in v))
    return {"per_seed": acc, "mean": {m: _mean(v) for m, v in acc.items()},
            "score": _mean([_mean(v) for v in acc.values()])}  # fmt: skip


def search(params: Path, root: Path) -> dict:
    cfg = load_config(params)
    seeds = cfg.seeds
    baselines = tuple(m for m in ("normal", "freezeout") if m in cfg.methods.baselines)
    discard = tuple(cfg.methods.discard)
    out = {"seeds": seeds, "image": {}, "feature": {}, "batchnorm": {}}
    works = {}
    for name, recipe in IMAGE.items():
        log.info("raw-image recipe %s", name)
        works[name] = _runs.scratch(cfg, root / f"image-{len(works)}", train=recipe)
        out["image"][name] = {"recipe": recipe, **_score(works[name], seeds, baselines)}
    image = max(out["image"], key=lambda k: out["image"][k]["score"])
    base = works[image]
    for i, (name, recipe) in enumerate(FEATURE.items()):
        log.info("feature recipe %s", name)
        work = _runs.scratch(base, root / f"feature-{i}", augment=recipe)
        for s in seeds:
            for m in discard:
                _runs.share_caches(base, work, s, m)
        out["feature"][name] = {"recipe": recipe, **_score(work, seeds, discard)}
        if i == 0:
            base = work  # later variants link the caches the first one made
    feature = max(out["feature"], key=lambda k: out["feature"][k]["score"])
    for i, how in enumerate(BATCHNORM):
        if how == cfg.train.bn_recalibrate:  # what step 2 trained
            out["batchnorm"][how] = {"recipe": {"bn_recalibrate": how}, **out["feature"][feature]}
            continue
        log.info("batchnorm %s", how)
        work = _runs.scratch(base, root / f"bn-{i}", augment=FEATURE[feature],
                             train={"bn_recalibrate": how})  # fmt: skip
        for s in seeds:
            for m in discard:
                _runs.share_caches(base, work, s, m)
        out["batchnorm"][how] = {"recipe": {"bn_recalibrate": how}, **_score(work, seeds, discard)}
    bn = max(out["batchnorm"], key=lambda k: out["batchnorm"][k]["score"])
    out["chosen"] = {"image": image, "feature": feature, "batchnorm": bn,
                     "train": {**IMAGE[image], "bn_recalibrate": bn},
                     "augment": FEATURE[feature]}  # fmt: skip
    return out


def render_markdown(res: dict) -> str:
    seeds = res["seeds"]
    lines = [
        f"Validation accuracy (%), mean over seeds {seeds}; each step keeps the choice before "
        "it. Chosen: "
        + ", ".join(f"{k} **{v}**" for k, v in res["chosen"].items() if isinstance(v, str))
        + ".",  # fmt: skip
        "",
    ]
    for step, title in (("image", "1. Raw images (the shared run, Normal, FreezeOut)"),
                        ("feature", "2. Cached features (Discard, Discard & Aug.)"),
                        ("batchnorm", "3. The suffix's BatchNorm statistics")):  # fmt: skip
        rows = res[step]
        methods = list(next(iter(rows.values()))["mean"])
        lines += [f"{title}:", "", "| recipe | " + " | ".join(label(m) for m in methods)
                  + " | mean |", "|---|" + "---|" * (len(methods) + 1)]  # fmt: skip
        for name, r in rows.items():
            mark = " (chosen)" if name == res["chosen"][step] else ""
            cells = [f"{r['mean'][m]:.2f}" for m in methods]
            lines.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {r['score']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="the profile to search"),
    out: Path = typer.Option(Path("results/recipe_search"), help="writes .json and .md"),
    work: Path = typer.Option(None, help="scratch folder kept for reruns (default: a temp one)"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with _runs.workdir(work, "freezecache-recipe-") as root:
        res = search(params, root)
    atomic_write_json(out.with_suffix(".json"), json.loads(json.dumps(res)))
    atomic_write_text(out.with_suffix(".md"), render_markdown(res))
    stamp(__file__, [out.with_suffix(".md"), out.with_suffix(".json")], params)
    print(render_markdown(res))


if __name__ == "__main__":
    typer.run(main)
