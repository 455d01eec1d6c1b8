"""benchmarks/adaptive_search.py's page and plot from a synthetic search result (the search
itself runs the stages: `make`-sized, not a test)."""

import copy

import adaptive_search as search


def _result() -> dict:
    """Two seeds; grad_change chosen (it decided 3@1 and 4@1), weight_change kept no savings."""

    def score(val, test, saved):
        return {"val": val, "test": test, "seconds": [30.0, 31.0], "flops_saved": saved}

    rows = [{"step": 20 * k, "epoch": 1 + k // 4, "values": [0.5 / k, 0.8 / k, None]}
            for k in range(1, 9)]  # fmt: skip
    grid = [
        {
            "threshold": 0.2,
            "schedules": {"0": "3@1", "1": "4@1"},
            "flops_saved": 0.28,
            "val": [94.0, 93.0],
            "test": [95.0, 94.0],
            "seconds": [30.0, 31.0],
            "why": {},
        },
        {
            "threshold": 0.05,
            "schedules": {"0": "2@2", "1": "2@2"},
            "flops_saved": 0.10,
            "val": [95.0, 95.0],
            "test": [95.5, 95.5],
            "seconds": [40.0, 41.0],
            "why": {},
        },
    ]
    return {
        "profile": {"model": "resnet20", "seeds": [0, 1], "epochs": 8, "epoch_max": 4,
                    "train_size": 4000, "criterion": {"rule": "grad_change", "threshold": 0.1}},
        "hand": [3, 1], "best_fixed": [3, 1], "keep": 0.9,
        "scores": {"3@1": score([93.5, 93.5], [94.8, 94.6], 0.28),
                   "4@1": score([93.0, 93.0], [94.0, 94.0], 0.31),
                   "2@2": score([95.0, 95.0], [95.5, 95.5], 0.10)},
        "freezeout": {"3@1": score([0, 0], [94.9, 94.9], 0.2),
                      "4@1": score([0, 0], [94.0, 94.0], 0.2)},
        "normal": {"test": [95.6, 95.4], "seconds": [60.0, 61.0]},
        "rules": {"grad_change": {"grid": grid, "chosen": 0.2},
                  "weight_change": {"grid": grid[1:], "chosen": None}},
        "rule": "grad_change",
        "measured": {"grad_change": {"0": rows, "1": rows}, "weight_change": {"0": rows}},
        "auto_check": {"seed": 0, "decided": [3, 1], "replayed": [3, 1], "val": 94.0,
                       "replayed_val": 94.0, "equal": True},
    }  # fmt: skip


def test_the_page_shows_the_chosen_rule_against_the_best_fixed_schedule():
    text = search.render_markdown(_result())
    assert "| 3@1 (hand-written) (best fixed) | 93.50 ± 0.00 | 28.0% |" in text
    assert "| grad_change (chosen) | 0.2 | 3@1, 4@1 | 1/2 | 93.50 ± 0.71 | 28.0% |" in text
    assert "weight_change (none keeps the savings" in text and "| 2@2 |" in text
    # per seed its own decision: seed 0 from 3@1 (94.8), seed 1 from 4@1 (94.0); FreezeOut alike
    assert "| adaptive (grad_change) | 94.40 ± 0.57 | 94.45 ± 0.64 | 29.5% | 30 |" in text
    # against the best fixed (94.8 and 94.6: 94.70): -0.30, at 29.5/28.0 of its savings
    assert "-0.30 points (goal: no more than 0.2 below), 105% of its FLOPs savings" in text
    assert "Test (2 seeds;" in text and "decided 3@1 (the replay: 3@1)" in text


def test_the_criterion_plot_marks_the_threshold_and_the_firing_step():
    spec = search.plot_spec(_result())
    line, threshold, fired = spec["layer"]
    assert threshold["data"]["values"] == [{"y": 0.2}]
    assert fired["data"]["values"] == [{"x": 60}]  # the last measurement of epoch 1 (seed 0)
    assert {d["block"] for d in line["data"]["values"]} == {"block 1", "block 2"}  # None: dropped


def test_without_a_chosen_rule_the_configured_one_is_plotted_and_nothing_fired():
    res = copy.deepcopy(_result())
    res["rule"] = None
    spec = search.plot_spec(res)
    assert len(spec["layer"]) == 2 and spec["layer"][1]["data"]["values"] == [{"y": 0.1}]
    assert "no threshold kept the savings" in spec["title"]
    assert "Adaptive against" not in search.render_markdown(res)
