"""report.md: the paper-style tables of :mod:`freezecache.reporting.report`'s collection, in words
where
numbers alone mislead (gaps within noise, flips that hurt, a run that does not pay back)."""

from __future__ import annotations

from freezecache.core.methods import METHODS
from freezecache.reporting.labels import label


def _gap_cell(r: dict, base: str) -> str:
    """A gap with its interval, or with its spread over seeds when no interval was kept."""
    if f"gap_to_{base}" not in r:
        return "–"
    ci = r.get(f"gap_to_{base}_ci")
    if ci is None:
        return f"{r[f'gap_to_{base}']:+.2f} ± {r[f'gap_to_{base}_std']:.2f}"
    return f"{ci['gap']:+.2f} [{ci['lo']:+.2f}, {ci['hi']:+.2f}]"


def _gap_lines(methods: dict) -> list[str]:
    """Each discard method's gaps in words: within noise or significant, from the interval."""
    lines = []
    for m, r in methods.items():
        if METHODS[m].kind != "discard":
            continue
        said = [
            f"{label(b)} {ci['gap']:+.2f} points ({ci['verdict']})"
            for b in ("normal", "freezeout")
            if (ci := r.get(f"gap_to_{b}_ci")) is not None
        ]
        if said:
            lines.append(f"{r['label']} against {' and against '.join(said)}.")
    return [""] + lines if lines else []


def _time_lines(methods: dict, points: list[dict], epochs: int, plan: dict | None) -> list[str]:
    """Where each method's time goes after the shared prefix run, and from when each discard
    method overtakes FreezeOut (measured here; predicted by the plan before any training)."""
    timed = {m: r["time"] for m, r in methods.items() if "time" in r and m != "normal_noflip"}
    if "freezeout" not in timed or not points:
        return []
    lines = [
        "",
        "Time after the shared run up to the first freeze point (mean over seeds; every stage "
        "records its own: results/report.json):",
        "",
        "| Method | Stages' wall time (s) | Epochs | Per epoch: training + validation (s) | "
        "One-off: start-up, setup, cache build, accounting, test (s) |",
        "|---|---|---|---|---|",
    ]
    for m, t in timed.items():
        lines.append(
            f"| {label(m)} | {t['wall_s']:.1f} | {t['epochs']:.0f} | {t['epoch_s']:.2f} | "
            f"{t['one_off_s']:.1f} |"
        )
    after = epochs - points[0]["epoch"]
    predicted = _predicted(plan, points[0]["block"])
    fo = timed["freezeout"]
    for m, t in timed.items():
        if METHODS[m].kind != "discard":
            continue
        be = t.get("break_even_epochs")
        pred = predicted.get(m)
        shown = "never (it saves no time per epoch)" if be is None else f"after {be:.1f} epochs"
        pred_text = "" if pred is None else f"; the plan predicted {pred:.1f} before training"
        faster = fo["wall_s"] - t["wall_s"]
        lines.append(
            f"\nBreak-even: {label(m)} overtakes FreezeOut {shown} from the freeze point "
            f"(one-off seconds over seconds saved per epoch){pred_text}. This run trains {after} "
            f"epochs after it: {label(m)}'s stages took {abs(faster):.1f} s "
            f"{'less' if faster >= 0 else 'more'} than FreezeOut's."
        )
    return lines


def _predicted(plan: dict | None, block: int) -> dict:
    """The plan's predicted break-even per discard method: for the configured schedule (every
    point), else for a single freeze at ``block``."""
    sched = (plan or {}).get("schedule_time")
    if sched:
        return sched.get("break_even_epochs", {})
    for row in (plan or {}).get("blocks", []):
        if row["block"] == block:
            return row.get("time", {}).get("break_even_epochs", {})
    return {}


def _saving(value: float, base: float) -> str:
    return "" if base == 0 else f" ({100.0 * (value - base) / base:+.1f}%)"


def _flip_lines(methods: dict) -> list[str]:
    """What the control (Normal without flips) says about flip repair on this data."""
    control = methods.get("normal_noflip")
    if control is None or "gap_to_normal" not in control:
        return []
    gap, std = control["gap_to_normal"], control["gap_to_normal_std"]
    if gap - std > 0:
        verdict = (
            "horizontal flips hurt on this data, so repairing flipped features (Discard & Aug. "
            "over Discard) cannot show a gain here; what the discard methods' augmentation "
            "still does is crop and noise"
        )
    elif gap + std < 0:
        verdict = "horizontal flips help on this data, so flip repair can matter"
    else:
        verdict = (
            "horizontal flips make no measurable difference on this data, so flip repair "
            "cannot show a gain here"
        )
    return [
        "",
        f"Control: Normal trained without flips is {gap:+.2f} ± {std:.2f} points against "
        f"Normal: {verdict}.",
    ]


MAX_CLASS_ROWS = 20  # more classes: the per-class table is in report.json only


def _class_lines(report: dict) -> list[str]:
    """Per-class test accuracy per method, and what the data lacks: classes missing from a
    split, files prepare skipped."""
    names = report.get("class_names") or []
    per = report.get("per_class_accuracy") or {}
    lines = []
    if per and len(names) <= MAX_CLASS_ROWS:
        tests = report.get("class_counts", {}).get("test", [])
        lines += [
            "",
            "Test accuracy per class (%, mean over seeds):",
            "",
            "| Class | Test images | " + " | ".join(label(m) for m in per) + " |",
            "|---|---|" + "---|" * len(per),
        ]
        for c, name in enumerate(names):
            cells = ["–" if per[m][c] is None else f"{per[m][c]:.1f}" for m in per]
            n = tests[c] if c < len(tests) else ""
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    elif per:
        lines += ["", f"Test accuracy per class: report.json ({len(names)} classes)."]
    for w in report.get("data_warnings") or []:
        lines += ["", f"**Warning:** {w}."]
    skipped = report.get("skipped_files") or []
    if skipped:
        shown = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:10])
        more = (
            f"; and {len(skipped) - 10} more (data/prepared/meta.json)" if len(skipped) > 10 else ""
        )
        lines += ["", f"Skipped {len(skipped)} files that could not be used "
                  f"(data.bad_images: skip): {shown}{more}."]  # fmt: skip
    return lines


def render_markdown(report: dict, plan: dict | None = None) -> str:
    methods = report["methods"]
    base = methods.get("normal")
    pts = ", ".join(f"block {p['block']} at epoch {p['epoch']}" for p in report["freeze_points"])
    decisions = report.get("decisions") or []
    if any(p["block"] == "auto" or p["epoch"] == "auto" for p in report["freeze_points"]):
        pts = "auto, decided by each seed's run: " + "; ".join(
            f"seed {d['seed']} block {d['points'][0]['block']} at epoch {d['points'][0]['epoch']}"
            for d in decisions
        )
    regime = "fine-tuned from pre-trained weights" if report["pretrained"] else "from scratch"
    classes = f" (classes {report['classes']})" if report["classes"] else ""
    names = report.get("class_names")
    if report["dataset"] == "imagefolder" and names:  # your own images: say which
        classes = f" ({len(names)} classes: {', '.join(names)})"
    lines = [
        f"### {report['model']} on {report['dataset']}{classes}, {regime}, "
        f"{report['epochs']} epochs, seeds {report['seeds']}; freeze points: {pts}",
        "",
        "| Method | Test accuracy (%) | vs Normal [95% interval] | vs FreezeOut [95% interval] | "
        "Avg. memory (MB) | Min. memory (MB) | Training FLOPs (x10^12) | Wall time (s) | "
        "Peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in methods.items():
        rel = {
            k: _saving(r[k], base[k]) if base and m != "normal" else ""
            for k in ("avg_memory_mb", "min_memory_mb", "train_flops")
        }
        gaps = [_gap_cell(r, b) for b in ("normal", "freezeout")]
        lines.append(
            f"| {r['label']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | {gaps[0]} | "
            f"{gaps[1]} | {r['avg_memory_mb']:.1f}{rel['avg_memory_mb']} | "
            f"{r['min_memory_mb']:.1f}{rel['min_memory_mb']} | "
            f"{r['train_flops'] / 1e12:.3f}{rel['train_flops']} | {r['wall_time_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    won = report["summary"].get("discard_gap_won_back")
    lines += [
        "",
        "Accuracy: mean ± std over seeds on the test set, measured once at the end of each run "
        "(settings are chosen on a validation split of the training data). vs Normal / vs "
        "FreezeOut: the mean difference in points with its paired 95% bootstrap interval over "
        "seeds and test images (both resampled, the same images for both methods).",
        *_gap_lines(methods),
    ]
    if won is not None:
        lines.append(
            f"Discard & Aug. wins back {100 * won:.0f}% of Discard's gap to Normal "
            "(the paper, from scratch: 32%)."
        )
    lines += _flip_lines(methods)
    lines += _class_lines(report)
    first = decisions[0]["points"] if decisions else report["freeze_points"]
    lines += _time_lines(methods, first, report["epochs"], plan)
    bn = {m: r for m, r in methods.items() if "bn_clean_gain" in r}
    if bn:
        lines += [
            "",
            "BatchNorm of the suffix: validation accuracy with its running statistics "
            "re-estimated on the clean cached features, minus with those training built from "
            "augmented ones (points, mean ± std over seeds): "
            + "; ".join(
                f"{r['label']} {r['bn_clean_gain']:+.2f} ± {r['bn_clean_gain_std']:.2f}"
                for r in bn.values()
            )
            + ".",
        ]
    lines += [
        "",
        "Memory is accounted per freezing state on one training batch (parameters, gradients, "
        "momentum, tensors saved for backward, the input batch, a frozen prefix's largest "
        "forward buffer), averaged over epochs; minimum = after the last freeze. Peak RSS: the "
        "largest resident memory of any of the method's stage processes on this machine. FLOPs "
        "= 2 x ptflops MACs, a trained part costs 3 x its forward; discard methods include each "
        "cache build from raw images (and the flipped pass and ranking for stored channels). "
        "Wall time: every stage process of the method, start-up included, the shared prefix "
        f"run included. All training and cache stages of this run, one after another: "
        f"{report['stage_seconds'] / 60:.1f} min on this machine.",
        "",
        "Host memory when the compressed cache is held in RAM (`loader.in_memory`):",
        "",
        "| Method | Avg. accounted + cache in RAM (MB) | Min. (MB) |",
        "|---|---|---|",
    ]
    for m, r in methods.items():
        if METHODS[m].kind == "discard":
            lines.append(
                f"| {r['label']} | {r['avg_host_memory_mb']:.1f} | {r['min_host_memory_mb']:.1f} |"
            )
    if any(r.get("cuda_avg_memory_mb") for r in methods.values()):
        lines += ["", "| Method | CUDA peak avg. (MB) | CUDA peak min. (MB) |", "|---|---|---|"]
        for r in methods.values():
            if r.get("cuda_avg_memory_mb"):
                lines.append(
                    f"| {r['label']} | {r['cuda_avg_memory_mb']:.1f} | "
                    f"{r['cuda_min_memory_mb']:.1f} |"
                )
    lines += [
        "",
        "| Cache | Point (block) | Codec | Tolerance | Compression ratio | Stored MB | "
        "Max abs error | Build MB/s | Stored channels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cache"]:
        lines.append(
            f"| {label(c['method'])} | {c['point']} ({c['block']}) | {c['codec']} | "
            f"{c['tolerance']:g} | {c['compression_ratio']:.3f} | {c['stored_mb']:.1f} | "
            f"{c['max_abs_error']:.2e} | {c['compress_mb_s']:.0f} | {c['stored_channels']} |"
        )
    lines += ["", "Compression ratio = stored bytes ÷ fp32 bytes (lower is better)."]
    lines += _no_flip_lines(report["cache"])
    return "\n".join(lines) + "\n"


def _no_flip_lines(caches: list[dict]) -> list[str]:
    """Says so when a flip-repairing method stored nothing: with train.flip_p 0 its cache is
    Discard's, and it ranks nothing and runs no flipped pass (Config.stores_flips)."""
    names = sorted({c["method"] for c in caches if not c.get("stores_flips", True)})
    discard = label("discard")
    return [
        f"\n{label(m)} stores no flipped channels or tokens here: `train.flip_p` is 0, so no "
        "sample is flipped and a stored view would never be read. Its cache is "
        f"{discard}'s (no ranking, no flipped pass) and it trains as {discard} does."
        for m in names
    ]
