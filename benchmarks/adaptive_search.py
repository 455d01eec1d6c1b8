"""Adaptive freezing chosen on validation, shown on test (issue 22).

    python benchmarks/adaptive_search.py --params configs/default.yaml --out results/adaptive

Through the pipeline's own stage functions (benchmarks/_runs.py), in scratch folders:

1. **Measure.** Per seed and criterion rule, the shared full-model run (``train_prefix``) with
   ``freeze.points: [{block: auto, epoch: epoch_max}]``: it trains to the cap and its
   ``decision.json`` keeps every measurement of the rule's statistic.
2. **Replay.** The decision each threshold would have made
(:func:`freezecache.training.decide.replay`):
   training does not depend on the monitor, so an auto run that stops at epoch e under threshold
   t is the run above cut at e, and what follows it is the fixed schedule (block, e). The grid
   of thresholds per rule spans the statistic's measured range (log-spaced quantiles).
3. **Score on validation.** Discard & Aug. from every schedule some threshold decides, and from
   a grid of fixed single-point schedules (block x epoch, the hand-written default among them):
   validation accuracy per seed and the training FLOPs saved against Normal. The best fixed
   schedule is the one with the best validation accuracy among those that save at least what
   the hand-written default saves; each rule's threshold is the one with the best validation
   accuracy among those that keep at least 90% of the best fixed schedule's FLOPs savings.
4. **Show on test.** For the hand-written default, the best fixed schedule and the chosen
   criterion (its decisions per seed): test accuracy of Discard & Aug. and FreezeOut (which
   follows the same schedule), Normal's, the FLOPs saved, the wall time of Discard & Aug.'s
   stages, and how often the criterion fired at the same point across seeds. One true auto
   chain (seed 0: prefix, cache, suffix) checks that it decides and scores what the replay said.

Writes ``<out>.json``, ``<out>.md`` and ``<out>_criterion.svg`` (the chosen rule's statistic
per block over training steps, seed 0, with the threshold and the firing step).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

import typer

import _runs
from freezecache.accounting.costs import method_costs
from freezecache.config import Config, FreezePoint, load_config
from freezecache.core.io import atomic_write_json, atomic_write_text, read_json
from freezecache.core.timing import STAGE_SECTIONS, Sections
from freezecache.pipeline import STAGES, method_runs
from freezecache.planning.plan import make_plan
from freezecache.steps.baselines import train_prefix
from freezecache.steps.context import Context
from freezecache.tooling.results import stamp
from freezecache.training.decide import allowed_from, replay

log = logging.getLogger("adaptive_search")

RULES = ("grad_change", "weight_change", "output_change")
THRESHOLDS = 10  # per rule
FIXED_BLOCKS = (2, 3, 4, 5)
FIXED_EPOCHS = (1, 2)
KEEP = 0.9  # of the best fixed schedule's FLOPs savings
Schedule = tuple[int, int]  # (block, epoch)


def _mean(v: list[float]) -> float:
    return statistics.fmean(v)


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


class Search:
    def __init__(self, cfg: Config, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.seeds = cfg.seeds
        self.cap = cfg.criterion.epoch_max
        self._work: dict[Schedule, Config] = {}
        # (epoch, seed) -> seconds of the shared prefix run, kept with the runs for a rerun
        self._prefix_file = root / "prefix_seconds.json"
        self._prefix_s: dict[str, float] = (
            read_json(self._prefix_file) if self._prefix_file.is_file() else {}
        )
        self.allowed = None
        self.normal_flops = None

    # -- 1. measure --------------------------------------------------------------------------
    def measure(self) -> dict[str, dict[int, list[dict]]]:
        """rule -> seed -> the rule's measurements over the full-model run to the cap."""
        out = {}
        for rule in RULES:
            crit = {**self.cfg.freeze.criterion.model_dump(), "rule": rule, "epoch_max": self.cap}
            work = _runs.scratch(self.cfg, self.root / f"measure-{rule}",
                                 freeze={"points": [{"block": "auto", "epoch": self.cap}],
                                         "criterion": crit})  # fmt: skip
            self._allowed_file(work)
            out[rule] = {}
            for seed in self.seeds:
                log.info("measure %s, seed %d", rule, seed)
                with Sections(STAGE_SECTIONS):
                    train_prefix(work, seed)
                decision = read_json(STAGES["train_prefix"].path("decision", work, seed=seed))
                out[rule][seed] = decision["rows"]
        return out

    def _allowed_file(self, work: Config) -> None:
        """The plan's allowed blocks (measured once) where an auto run reads them."""
        if self.allowed is None:
            ctx = Context(work, self.seeds[0], "plan")
            self.allowed = make_plan(ctx, ctx.new_model().eval())["allowed"]
        atomic_write_json(STAGES["plan"].path("allowed", work), self.allowed)

    # -- 2. replay ---------------------------------------------------------------------------
    def thresholds(self, rows: dict[int, list[dict]]) -> list[float]:
        values = sorted(v for rs in rows.values() for r in rs for v in r["values"]
                        if v is not None and v > 0)  # fmt: skip
        if not values:  # too few measurements to compare: the configured threshold alone
            return [self.cfg.criterion.threshold]
        lo, hi = values[len(values) // 20], values[-1 - len(values) // 20]
        return [lo * (hi / lo) ** (k / (THRESHOLDS - 1)) for k in range(THRESHOLDS)]

    def decisions(self, rule: str, threshold: float, rows: dict[int, list[dict]]) -> dict:
        crit = self.cfg.criterion.model_copy(update={"rule": rule, "threshold": threshold})
        point = FreezePoint(block="auto", epoch="auto")
        allowed = allowed_from(self.allowed, self.cfg.train.epochs)
        return {s: replay(rows[s], crit, point, allowed) for s in self.seeds}

    # -- 3. score ----------------------------------------------------------------------------
    def work(self, sched: Schedule) -> Config:
        """The scratch config of a fixed single-point schedule; its prefix runs linked from the
        first schedule with the same epoch."""
        if sched not in self._work:
            block, epoch = sched
            work = _runs.scratch(self.cfg, self.root / f"fixed-b{block}-e{epoch}",
                                 freeze={"points": [{"block": block, "epoch": epoch}]})  # fmt: skip
            same = [w for (b, e), w in self._work.items() if e == epoch]
            if same:
                for seed in self.seeds:
                    _runs.link_outputs(same[0], work, "train_prefix", seed)
            self._work[sched] = work
        return self._work[sched]

    def score(self, sched: Schedule, name: str = "discard_aug") -> dict:
        """Validation and test accuracy per seed, FLOPs saved against Normal, and the seconds of
        the method's own stages (the shared prefix run's included)."""
        work = self.work(sched)
        val, test, seconds = [], [], []
        for seed in self.seeds:
            if not STAGES["train_prefix"].path("state", work, seed=seed).exists():
                start = time.perf_counter()  # shared by the schedules of its epoch: timed once
                with Sections(STAGE_SECTIONS):
                    train_prefix(work, seed)
                self._prefix_s[f"{sched[1]}/{seed}"] = time.perf_counter() - start
                atomic_write_json(self._prefix_file, self._prefix_s)
            start = time.perf_counter()
            val.append(_runs.run(work, seed, name))
            took = time.perf_counter() - start
            seconds.append(took + self._prefix_s.get(f"{sched[1]}/{seed}", math.nan))
            stage, item = method_runs(work, seed, name)[-1]
            test.append(100.0 * read_json(stage.path("metrics", work, **item))["test_acc"])
        return {"val": val, "test": test, "seconds": seconds, "flops_saved": self.saved(work, name)}

    def saved(self, work: Config, name: str) -> float:
        ctx = Context(work, self.seeds[0], "baseline", method="normal")
        model = ctx.new_model()
        if self.normal_flops is None:
            self.normal_flops = method_costs(ctx, model, "normal", []).train_flops
        return 1.0 - method_costs(ctx, model, name, []).train_flops / self.normal_flops

    def normal(self) -> dict:
        work = self.work((self.cfg.points[0].block, self.cfg.points[0].epoch))
        test, seconds = [], []
        for seed in self.seeds:
            start = time.perf_counter()
            _runs.run(work, seed, "normal")
            seconds.append(time.perf_counter() - start)
            stage, item = method_runs(work, seed, "normal")[-1]
            test.append(100.0 * read_json(stage.path("metrics", work, **item))["test_acc"])
        return {"test": test, "seconds": seconds}


def run_search(cfg: Config, root: Path) -> dict:
    s = Search(cfg, root)
    measured = s.measure()
    hand = (cfg.points[0].block, cfg.points[0].epoch)
    fixed = sorted({hand, *((b, e) for b in FIXED_BLOCKS for e in FIXED_EPOCHS)})
    scores = {}
    for sched in fixed:
        log.info("fixed %s", sched)
        scores[sched] = s.score(sched)
    best = max((k for k in fixed if scores[k]["flops_saved"] >= scores[hand]["flops_saved"]),
               key=lambda k: _mean(scores[k]["val"]))  # fmt: skip
    floor = KEEP * scores[best]["flops_saved"]
    rules = {}
    for rule in RULES:
        grid = []
        for t in s.thresholds(measured[rule]):
            decided = s.decisions(rule, t, measured[rule])
            scheds = {seed: (d["block"], d["epoch"]) for seed, d in decided.items()}
            for sched in set(scheds.values()):
                if sched not in scores:
                    log.info("decided %s", sched)
                    scores[sched] = s.score(sched)
            per_seed = {k: [scores[scheds[seed]][k][i] for i, seed in enumerate(s.seeds)]
                        for k in ("val", "test", "seconds")}  # fmt: skip
            saved = _mean([scores[x]["flops_saved"] for x in scheds.values()])
            grid.append({"threshold": t, "schedules": scheds, "flops_saved": saved, **per_seed,
                         "why": {seed: d["why"] for seed, d in decided.items()}})  # fmt: skip
        ok = [g for g in grid if g["flops_saved"] >= floor]
        chosen = max(ok, key=lambda g: _mean(g["val"])) if ok else None
        rules[rule] = {"grid": grid, "chosen": chosen}
    fired = [r for r in RULES if rules[r]["chosen"] is not None]
    rule = max(fired, key=lambda r: _mean(rules[r]["chosen"]["val"])) if fired else None
    freezeout = {k: s.score(k, "freezeout") for k in {hand, best}}
    if rule is not None:
        for sched in set(rules[rule]["chosen"]["schedules"].values()):
            freezeout.setdefault(sched, s.score(sched, "freezeout"))
    check = _auto_check(s, rule, rules[rule]["chosen"], scores) if rule else None
    return {
        "profile": {
            "model": cfg.model.name,
            "seeds": s.seeds,
            "epochs": cfg.train.epochs,
            "epoch_max": s.cap,
            "train_size": cfg.data.train_size,
            "criterion": {"rule": cfg.criterion.rule, "threshold": cfg.criterion.threshold},
        },  # fmt: skip
        "hand": list(hand),
        "best_fixed": list(best),
        "keep": KEEP,
        "scores": {f"{b}@{e}": v for (b, e), v in sorted(scores.items())},
        "freezeout": {f"{b}@{e}": v for (b, e), v in sorted(freezeout.items())},
        "normal": s.normal(),
        "rules": {
            r: {
                "grid": [
                    {**g, "schedules": {str(k): f"{b}@{e}" for k, (b, e) in g["schedules"].items()}}
                    for g in v["grid"]
                ],
                "chosen": v["chosen"]["threshold"] if v["chosen"] else None,
            }
            for r, v in rules.items()
        },  # fmt: skip
        "rule": rule,
        "measured": {r: {str(k): v for k, v in m.items()} for r, m in measured.items()},
        "auto_check": check,
    }


def _auto_check(s: Search, rule: str, chosen: dict, scores: dict) -> dict:
    """A true auto chain for the first seed: its decision and validation accuracy against the
    replay's."""
    seed = s.seeds[0]
    crit = {**s.cfg.freeze.criterion.model_dump(), "rule": rule, "threshold": chosen["threshold"],
            "epoch_max": s.cap}  # fmt: skip
    work = _runs.scratch(s.cfg, s.root / "auto-check",
                         freeze={"points": "auto", "criterion": crit})  # fmt: skip
    s._allowed_file(work)
    val = _runs.run(work, seed, "discard_aug")
    decision = read_json(STAGES["train_prefix"].path("decision", work, seed=seed))
    want = chosen["schedules"][seed]
    return {"seed": seed, "decided": [decision["block"], decision["epoch"]],
            "replayed": list(want), "val": val, "replayed_val": scores[want]["val"][0],
            "equal": [decision["block"], decision["epoch"]] == list(want)
            and abs(val - scores[want]["val"][0]) < 1e-9}  # fmt: skip


# -- the page ------------------------------------------------------------------------------------
def _ms(v: list[float]) -> str:
    return f"{_mean(v):.2f} ± {_std(v):.2f}"


def render_markdown(res: dict) -> str:
    p = res["profile"]
    hand, best = (f"{b}@{e}" for b, e in (res["hand"], res["best_fixed"]))
    scores, rules = res["scores"], res["rules"]
    lines = [
        f"{p['model']}, {p['train_size']} training images, {p['epochs']} epochs, seeds "
        f"{p['seeds']}; schedules as block@epoch; an auto run freezes by epoch {p['epoch_max']} "
        "at the latest. Every choice on validation; test shown after.",
        "",
        "Validation (Discard & Aug.), fixed single-point schedules:",
        "",
        "| schedule | val. acc. | FLOPs saved |",
        "|---|---|---|",
    ]
    for k, v in scores.items():
        mark = " (hand-written)" if k == hand else ""
        mark += " (best fixed)" if k == best else ""
        lines.append(f"| {k}{mark} | {_ms(v['val'])} | {100 * v['flops_saved']:.1f}% |")
    floor = 100 * res["keep"] * scores[best]["flops_saved"]
    lines += ["", f"Each criterion's threshold: the best validation accuracy among thresholds "
              f"that save at least {floor:.1f}% ({res['keep']:.0%} of the best fixed):", "",
              "| rule | threshold | decisions per seed | same point | val. acc. | FLOPs saved |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for rule, r in rules.items():
        g = next((g for g in r["grid"] if g["threshold"] == r["chosen"]), None)
        if g is None:  # what came closest: the threshold that saves the most
            c = max(r["grid"], key=lambda g: g["flops_saved"])
            scheds = ", ".join(c["schedules"].values())
            lines.append(f"| {rule} (none keeps the savings; the most saving:) | "
                         f"{c['threshold']:.3g} | {scheds} | | {_ms(c['val'])} | "
                         f"{100 * c['flops_saved']:.1f}% |")  # fmt: skip
            continue
        scheds = list(g["schedules"].values())
        same = max(scheds.count(x) for x in scheds)
        mark = " (chosen)" if rule == res["rule"] else ""
        lines.append(
            f"| {rule}{mark} | {g['threshold']:.3g} | {', '.join(scheds)} | "
            f"{same}/{len(scheds)} | {_ms(g['val'])} | {100 * g['flops_saved']:.1f}% |"
        )
    lines += ["", f"Test ({len(p['seeds'])} seeds; FreezeOut follows each schedule; wall s: "
              "the prefix run, cache and suffix of Discard & Aug., in-process, on a machine "
              "shared with other work):", "",
              "| schedule | Discard & Aug. test acc. | FreezeOut test acc. | FLOPs saved "
              "(D&A) | D&A wall s |", "|---|---|---|---|---|"]  # fmt: skip
    fo = res["freezeout"]
    rows = [("hand-written " + hand, [hand] * len(p["seeds"])), ("best fixed " + best,
            [best] * len(p["seeds"]))]  # fmt: skip
    if res["rule"]:
        g = next(g for g in rules[res["rule"]]["grid"]
                 if g["threshold"] == rules[res["rule"]]["chosen"])  # fmt: skip
        rows.append((f"adaptive ({res['rule']})", list(g["schedules"].values())))
    summary = {}
    for name, scheds in rows:
        test = [scores[x]["test"][i] for i, x in enumerate(scheds)]
        fot = [fo[x]["test"][i] for i, x in enumerate(scheds)]
        secs = [scores[x]["seconds"][i] for i, x in enumerate(scheds)]
        saved = _mean([scores[x]["flops_saved"] for x in scheds])
        summary[name.split(" ")[0]] = (test, saved)
        lines.append(
            f"| {name} | {_ms(test)} | {_ms(fot)} | {100 * saved:.1f}% | {_mean(secs):.0f} |"
        )
    lines += ["", f"Normal: {_ms(res['normal']['test'])} (test)."]
    if res["rule"]:
        (a, sa), (b, sb) = summary["adaptive"], summary["best"]
        gap = _mean(a) - _mean(b)
        lines += [
            "",
            f"Adaptive against the best fixed schedule on test: {gap:+.2f} points "
            f"(goal: no more than 0.2 below), {sa / sb:.0%} of its FLOPs savings (goal: at "
            "least 90%).",
        ]
    check = res.get("auto_check")
    if check:
        lines += ["", f"A true auto run (seed {check['seed']}) decided "
                  f"{check['decided'][0]}@{check['decided'][1]} (the replay: "
                  f"{check['replayed'][0]}@{check['replayed'][1]}), validation {check['val']:.2f} "
                  f"(the replay's schedule: {check['replayed_val']:.2f})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_spec(res: dict) -> dict:
    """The chosen rule's statistic per block over steps (seed 0), threshold and firing step."""
    rule = res["rule"]
    seed = str(res["profile"]["seeds"][0])
    if rule is None:  # none chosen: the configured rule and threshold, nothing fired
        rule, chosen = res["profile"]["criterion"]["rule"], res["profile"]["criterion"]["threshold"]
        block = epoch = None
    else:
        chosen = res["rules"][rule]["chosen"]
        g = next(g for g in res["rules"][rule]["grid"] if g["threshold"] == chosen)
        block, epoch = (int(x) for x in g["schedules"][seed].split("@"))
    rows = res["measured"][rule][seed]
    fired = max((r["step"] for r in rows if epoch and r["epoch"] <= epoch), default=None)
    data = [
        {"step": r["step"], "block": f"block {b + 1}", "value": v}
        for r in rows
        for b, v in enumerate(r["values"])
        if v is not None and v > 0
    ]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": f"{rule} per block (seed {seed}); threshold {chosen:.3g}, "
                 + (f"decided block {block} at the end of epoch {epoch}" if block
                    else "no threshold kept the savings (the configured one shown)"),
        "width": 560, "height": 300,
        "layer": [
            {"data": {"values": data}, "mark": {"type": "line", "point": True},
             "encoding": {"x": {"field": "step", "type": "quantitative", "title": "step"},
                          "y": {"field": "value", "type": "quantitative",
                                "scale": {"type": "log"}, "title": rule},
                          "color": {"field": "block", "type": "nominal",
                                    "sort": [f"block {b}" for b in range(1, 40)]}}},
            {"data": {"values": [{"y": chosen}]}, "mark": {"type": "rule", "strokeDash": [4, 4]},
             "encoding": {"y": {"field": "y", "type": "quantitative"}}},
        ] + ([{"data": {"values": [{"x": fired}]}, "mark": {"type": "rule", "color": "black"},
               "encoding": {"x": {"field": "x", "type": "quantitative"}}}] if fired else []),
    }  # fmt: skip


def main(
    params: Path = typer.Option(Path("params.yaml"), help="the profile to search"),
    out: Path = typer.Option(Path("results/adaptive"), help="writes .json, .md, _criterion.svg"),
    work: Path = typer.Option(None, help="scratch folder kept for reruns (default: a temp one)"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(params)
    with _runs.workdir(work, "freezecache-adaptive-") as root:
        res = run_search(cfg, root)
    res = json.loads(json.dumps(res))
    atomic_write_json(out.with_suffix(".json"), res)
    atomic_write_text(out.with_suffix(".md"), render_markdown(res))
    import vl_convert

    svg = out.parent / f"{out.name}_criterion.svg"
    atomic_write_text(svg, vl_convert.vegalite_to_svg(plot_spec(res)))
    stamp(__file__, [out.with_suffix(".md"), out.with_suffix(".json"), svg], params)
    print(render_markdown(res))


if __name__ == "__main__":
    typer.run(main)
