"""Import boundaries that match the work: a stage's code deps are derived from its imports, so an
import is a promise about what reruns. These pin the promises; each is shown to fail on a copy
of the library with one import added where it must not be."""

import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from freezecache import config
from freezecache.codecs import CODECS, CODINGS
from freezecache.core.methods import METHODS
from freezecache.core.yamlio import load_yaml
from freezecache.pipeline import STAGES
from freezecache.reporting.labels import LABELS
from freezecache.tooling.render import code_deps

LIB = "src/freezecache"
TRAINING = ("pretrain", "train_prefix", "baseline", "tradeoffs")  # never touch a cache
NOT_FOR_TRAINING = ("labels.py", "render.py", "plots.py", "report.py", "sweep.py", "cli.py")


def violations(root: Path) -> list[str]:
    """Every broken boundary of the library under ``root``, one line each."""
    deps = {n: code_deps(root / s.script, root) for n, s in STAGES.items()}
    found = []
    for name in TRAINING:
        for d in deps[name]:
            if d.startswith((f"{LIB}/cache", f"{LIB}/codecs")):
                found.append(f"{name} depends on {d}")
    for name, d in ((n, d) for n, ds in deps.items() for d in ds):
        if d == f"{LIB}/api.py":  # the public names are for users' loops, loaded on first use
            found.append(f"{name} depends on {d}")
    # check builds the model (without weights) to refuse what only the model can tell before
    # any stage runs; preparing the data never needs a model
    found += [f"prepare depends on {d}" for d in deps["prepare"] if d.startswith(f"{LIB}/models")]
    for name in ("check", "prepare"):  # neither trains nor reads a cache
        found += [f"{name} depends on {d}" for d in deps[name] if d.startswith(f"{LIB}/training")]
    for name in (*TRAINING, "train_suffix", "cache"):
        found += [
            f"{name} depends on {d}" for d in deps[name] if d.rsplit("/", 1)[-1] in NOT_FOR_TRAINING
        ]
    return found


def test_stages_depend_only_on_the_code_of_their_work():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("training/train.py", "from freezecache.cache import open_cache"),
        ("training/train.py", "from freezecache.codecs.registry import make_codec"),
        ("config/__init__.py", "from freezecache.codecs import CODECS"),
        ("steps/context.py", "from freezecache.api import split"),
        ("config/__init__.py", "from freezecache.models import create_model"),
        ("accounting/costs.py", "from freezecache.reporting.labels import label"),
    ],
)
def test_the_boundary_check_fails_when_an_import_crosses_a_boundary(tmp_path, module, line):
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    target = tmp_path / LIB / module
    target.write_text(target.read_text() + f"\n{line}  # crossing a boundary\n")
    assert violations(tmp_path), f"adding `{line}` to {module} went unnoticed"


def _covers(deps: list[str], path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in deps)


def test_the_cache_stage_and_the_suffix_depend_on_the_cache_package():
    for name in ("cache", "train_suffix", "plan"):
        deps = code_deps(ROOT / STAGES[name].script)
        assert _covers(deps, f"{LIB}/cache/writer.py") and _covers(deps, f"{LIB}/codecs"), name
    # the training feed (decode + augment) reruns training from the cache, never the build
    assert _covers(code_deps(ROOT / STAGES["train_suffix"].script), f"{LIB}/cache/fused.py")
    assert not _covers(code_deps(ROOT / STAGES["cache"].script), f"{LIB}/cache/fused.py")


def test_config_defaults_are_the_default_profile():
    """Each fact once: a section's defaults are the default profile's values (data's subsets
    excepted: None means all of them)."""
    profile = load_yaml(ROOT / "configs/default.yaml")
    defaults = config.Config().model_dump(mode="json")
    for section in profile:
        if section in ("data", "pretrain", "paths"):
            continue
        assert defaults[section] == profile[section], section
    assert defaults["paths"] == profile["paths"]


def test_names_are_declared_once():
    from freezecache.codecs import registry

    assert tuple(registry._CODECS) == CODECS
    assert set(config.Cache.model_fields["codec"].annotation.__args__) == set(CODECS)
    assert set(config.Cache.model_fields["coding"].annotation.__args__) == set(CODINGS)
    assert set(LABELS) == set(METHODS)


def test_long_modules_say_why():
    """No module over about 400 lines without a reason in its docstring."""
    for path in sorted((ROOT / LIB).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 420:
            assert "Why it is long:" in text.split('"""')[1], path.relative_to(ROOT)


# The library's layers, lowest first: a module imports only from its own layer or those before it
# (the README's Layout lists them in this order).
LAYERS = ("core", "codecs", "data", "models", "config", "pipeline", "training", "cache",
          "accounting", "reporting", "planning", "steps", "tooling")  # fmt: skip
# Imports that cross the layers: none (the planning modules used to import steps/; what they
# needed now lives in the layer it belongs to: cache.features, config.model, tooling.doctor).
KNOWN_CROSSINGS: set[tuple[str, str]] = set()


def layer_crossings(root: Path) -> set[tuple[str, str]]:
    """(module, layer it imports) for each import of a later layer, lazy imports included."""
    import ast

    lib = root / LIB
    found = set()
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).as_posix()
        own = rel.split("/")[0]
        if own not in LAYERS:
            continue  # the top level: the public API and `python -m freezecache`
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "freezecache" and len(parts) > 1 and parts[1] in LAYERS:
                    if LAYERS.index(parts[1]) > LAYERS.index(own):
                        found.add((rel, parts[1]))
    return found


def test_each_layer_imports_only_the_layers_before_it():
    assert sorted(LAYERS) == sorted(
        p.name for p in (ROOT / LIB).iterdir() if p.is_dir() and not p.name.startswith("__")
    ), "a new folder belongs in LAYERS"
    assert layer_crossings(ROOT) <= KNOWN_CROSSINGS


def test_the_layer_check_fails_when_a_lower_layer_imports_a_higher_one(tmp_path):
    shutil.copytree(ROOT / "src", tmp_path / "src")
    target = tmp_path / LIB / "training/train.py"
    target.write_text(target.read_text() + "\nfrom freezecache.reporting.labels import label\n")
    assert ("training/train.py", "reporting") in layer_crossings(tmp_path)
