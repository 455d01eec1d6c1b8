"""dvc.yaml rendering, and the smoke pipeline under real DVC in a fresh git repository."""

import json
import re
import time

import pytest
import yaml

from conftest import ROOT, load_profile, needs_fashion, project_copy, run
from freezecache import pipeline
from freezecache.config import parse_config
from freezecache.errors import FreezecacheError

PROFILES = ROOT / "configs"


def _stages(profile: str, **changes) -> dict:
    raw = load_profile(profile)
    raw.update(changes)
    return pipeline.render(parse_config(raw))["stages"]


def test_stage_per_seed_method_and_point():
    stages = _stages("smoke", seeds=[0, 1])
    for s in (0, 1):
        assert f"train_prefix_s{s}" in stages
        assert f"baseline_freezeout_s{s}" in stages
        for k in (1, 2):
            assert f"cache_discard_s{s}_p{k}" in stages
            assert f"rank_discard_aug_s{s}_p{k}" in stages
            assert f"rank_discard_s{s}_p{k}" not in stages  # standard flips need no ranking
    # the second point's cache is made from the first point's cache, not from raw images
    deps = stages["cache_discard_aug_s0_p2"]["deps"]
    assert "${paths.cache}/s0/discard_aug/p1.h5" in deps
    assert "${paths.runs}/s0/discard_aug/p1/suffix/state.pt" in deps
    assert "${paths.data}" not in deps


def test_params_listed_per_stage_keep_edits_local():
    stages = _stages("smoke")
    tol = [n for n, s in stages.items() if "cache.tolerance" in s["params"]]
    assert all(n.startswith(("cache_", "report")) for n in tol)
    noise = [n for n, s in stages.items() if "augment.noise_std" in s["params"]]
    assert noise and all(n.startswith("train_suffix_") for n in noise)
    gamma = [n for n, s in stages.items() if "augment.gamma" in s["params"]]
    assert gamma and all(n.startswith("cache_discard_aug") for n in gamma)
    for n in ("prepare", "train_prefix_s0", "baseline_normal_s0", "rank_discard_aug_s0_p1"):
        assert not any(p.startswith(("cache", "augment")) for p in stages[n]["params"]), n


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES.glob("*.yaml")))
def test_every_param_a_stage_lists_is_in_the_profile(profile):
    # DVC refuses to run a stage whose listed param key is missing from params.yaml.
    raw = load_profile(profile)
    for name, stage in pipeline.render(parse_config(raw, check_model=False))["stages"].items():
        for key in stage["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{profile}: {name} lists {key}"
                node = node[part]


def test_check_detects_a_stale_dvc_yaml(tmp_path):
    cfg = parse_config(load_profile("smoke"))
    target = tmp_path / "dvc.yaml"
    assert pipeline.write(cfg, target) and not pipeline.write(cfg, target)
    pipeline.check(cfg, target)
    raw = load_profile("smoke")
    raw["seeds"] = [0, 1]
    with pytest.raises(FreezecacheError, match="run `freezecache pipeline`"):
        pipeline.check(parse_config(raw), target)


def _status_stages(repo) -> set[str]:
    out = run(["dvc", "status", "--json"], repo).stdout
    return set(json.loads(out or "{}"))


def _set(repo, key: str, value) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _experiment_ratios(shown) -> dict[float, float]:
    """cache.tolerance -> the first point's compression ratio, per experiment in `dvc exp show`."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            params = node.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = node.get("metrics", {})
            tol = params.get("cache", {}).get("tolerance") if isinstance(params, dict) else None
            stats = metrics.get("runs/s0/discard/p1/cache.json", {}).get("data", {})
            if tol is not None and "compression_ratio" in stats:
                found[tol] = stats["compression_ratio"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return found


@pytest.mark.slow
@needs_fashion
def test_smoke_pipeline_in_a_fresh_git_repo(tmp_path):
    repo = project_copy(tmp_path / "repo")
    run("git init -q && git config user.email ci@example.com && git config user.name ci", repo)
    run(["freezecache", "profile", "smoke"], repo)
    run("git add -A && git commit -qm smoke", repo)

    out = run(["dvc", "repro"], repo).stdout
    report = json.loads((repo / "results/report.json").read_text())
    assert set(report["methods"]) == {"normal", "freezeout", "discard", "discard_aug"}
    for r in report["methods"].values():
        assert 0.0 <= r["accuracy_mean"] <= 100.0 and r["train_flops"] > 0
    m = report["methods"]
    assert (
        m["discard_aug"]["min_memory_mb"]
        < m["freezeout"]["min_memory_mb"]
        < m["normal"]["min_memory_mb"]
    )
    assert m["discard"]["train_flops"] < m["freezeout"]["train_flops"] < m["normal"]["train_flops"]
    for c in report["cache"]:
        assert c["max_abs_error"] <= c["tolerance"] and 0 < c["compression_ratio"] < 1
    assert (repo / "data/cache/s0/discard_aug/p2.h5").is_file()
    assert "Running stage 'train_prefix_s0'" in out

    again = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in again
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots/index.html").is_file()

    _set(repo, "cache.tolerance", 0.05)
    stale = _status_stages(repo)
    assert stale and all(re.match(r"(cache_|train_suffix_|report)", s) for s in stale), stale
    run("git checkout -q params.yaml", repo)

    _set(repo, "augment.noise_std", 0.1)
    stale = _status_stages(repo)
    assert stale and all(s.startswith("train_suffix_") for s in stale), stale
    assert any("discard_aug" in s for s in stale) and any("discard_s0" in s for s in stale)
    run("git checkout -q params.yaml", repo)

    _set(repo, "augment.gamma", 0.5)
    stale = _status_stages(repo)
    assert stale == {"cache_discard_aug_s0_p1", "cache_discard_aug_s0_p2"}, stale
    run("git checkout -q params.yaml", repo)

    run(["dvc", "exp", "run", "-S", "cache.tolerance=0.05"], repo)
    run(["dvc", "exp", "run", "--queue", "-S", "cache.tolerance=0.02,0.1"], repo)
    run(["dvc", "queue", "start"], repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)
    assert "Failed" not in status, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    ratios = _experiment_ratios(shown)
    assert {0.05, 0.02, 0.1} <= set(ratios), ratios
    assert ratios[0.1] < ratios[0.02]  # a looser tolerance compresses better (lower ratio)
