"""The README's commands, as printed, run by the tests.

Sybil (the documentation-testing tool) finds every ```bash block of README.md; each command
line in it is looked up in HOW, the one place that says how the tests treat it:

- EXP: a ``dvc exp run -S ...`` line is applied with DVC's own override code (the grouping
  and sweeps of ``dvc exp run``, then ``apply_overrides``, which rewrites the whole file as the
  experiment does) to the profile it is written for, and must pass the check stage;
- RUN: run here, as printed (in a project copy where it writes files);
- SMOKE: needs a finished run: tests/test_dvc_day.py runs it on a finished smoke run;
- NOT_RUN: not run by any test here, for the reason given (slow, GPU-only, changes the
  environment).

A command no pattern matches fails the test: a new README command must say how it is tested.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser

from conftest import ROOT, env_with_venv, project_copy, run
from freezecache.config import load_config
from freezecache.core.yamlio import load_yaml

README = ROOT / "README.md"
EXP, RUN, SMOKE, NOT_RUN = "exp", "run", "smoke", "not run"

# (pattern on one command, how, why); the first match decides.
HOW: tuple[tuple[str, str, str], ...] = (
    (r"^dvc exp run .*(-S|--set-param)", EXP, "DVC's override code on the profile, then check "
     "(test_model_kwargs.py runs the ViT line for real on the smoke profile: make test-all)"),
    (r"^freezecache profile ", RUN, "in a project copy"),
    (r"^python -c .*make_messy_folder", RUN, "in a project copy: the folder appears"),
    (r"^freezecache blocks ", RUN, "builds the model (a comment's block count is compared)"),
    (r"^source \.venv/bin/activate$", RUN, "in bash, in the checkout (needs its .venv)"),
    (r"^(grep -v -E|pip freeze \|)", RUN, "writes a constraints file in a temporary folder"),
    (r"^dvc exp show\b", SMOKE, "lists experiments of a finished run"),
    (r"^dvc metrics show$", SMOKE, "reads a finished run's metrics"),
    (r"^make repro$", NOT_RUN, "slow: the default's pipeline, ~15 min on 2 cores (set-up "
     "included); test_pipeline.py runs the smoke profile's the same way (`dvc repro`)"),
    (r"^cat results/report\.md$", NOT_RUN, "prints the report a run wrote; "
     "test_own_images_pipeline.py asserts the class names and per-class accuracy in it"),
    (r"^make test$", NOT_RUN, "slow: the suite CI runs (all but the extended tests)"),
    (r"^pip install ", NOT_RUN, "changes the environment it runs in (and needs the network)"),
    (r"^pip check$", NOT_RUN, "what it lists (and its exit status) is the environment's: it "
     "says what an environment lacks after the install without dependencies"),
    (r"^freezecache doctor$", NOT_RUN, "slow: a 20 s measurement; test_doctor.py runs the "
     "command on tiny profiles"),
    (r"^dvc queue start$", NOT_RUN, "runs the queued experiments: on the default, minutes "
     "each; test_dvc_day.py runs a queue (`freezecache sweep`) on the smoke profile"),
    (r"^make plots$", NOT_RUN, "needs a finished run and the venv of `make setup`; "
     "test_pipeline.py runs `freezecache plots` (what it runs) on the smoke profile"),
    (r"^bash benchmarks/plots_screenshot\.sh$", NOT_RUN, "GPU-free but needs Chromium "
     "(Debian's chromium) and a finished run; test_plots.py draws the lead charts in it"),
)  # fmt: skip


@dataclass(frozen=True)
class Command:
    text: str  # one command as printed, its comment dropped
    comment: str  # what the README says about it
    profile: str  # the profile it is written for
    line: int  # in README.md

    @property
    def how(self) -> tuple[str, str]:
        for pattern, how, why in HOW:
            if re.search(pattern, self.text):
                return how, why
        raise AssertionError(
            f"README.md:{self.line}: no entry in HOW says how `{self.text}` is tested — add one "
            "(run it, or give the reason it is not run)"
        )


def commands(example: Example) -> list[Command]:
    """The commands of one bash block: a line split at ``&&``, each with the line's comment;
    a ``freezecache profile NAME`` makes the lines after it written for that profile."""
    out, profile, logical = [], "default", []  # a line ending in a backslash goes on
    for k, physical in enumerate(example.parsed.splitlines()):
        if not logical:
            first = k
        logical.append(physical.rstrip().removesuffix("\\").strip())
        if physical.rstrip().endswith("\\"):
            continue
        line, logical = " ".join(logical), []
        text, _, comment = line.partition("  #")
        for part in filter(None, (p.strip() for p in text.split("&&"))):
            out.append(Command(part, comment.strip(), profile, example.line + 1 + first))
            if m := re.match(r"freezecache profile (\w+)$", part):
                profile = m.group(1)
    return out


def _collect(example: Example) -> None:
    """Sybil's evaluator: nothing at parse time, the tests below evaluate each command."""


def readme_commands(kind: str | None = None) -> list[Command]:
    """Every command of the README's bash blocks (of one kind of HOW), in order."""
    sybil = Sybil(parsers=[CodeBlockParser(language="bash", evaluator=_collect)])
    found = [c for example in sybil.parse(README) for c in commands(example)]
    return [c for c in found if kind is None or c.how[0] == kind]


def _ids(cmds: list[Command]) -> list[str]:
    return [f"line{c.line}" for c in cmds]


def test_every_readme_command_says_how_it_is_tested():
    found = readme_commands()
    assert len(found) >= 20 and all(c.how for c in found)
    assert all(why for _, _, why in HOW)
    kinds = {c.how[0] for c in found}
    assert kinds == {EXP, RUN, SMOKE, NOT_RUN}, kinds


# -- EXP: `dvc exp run -S ...` on its profile ----------------------------------------------------
def overrides_of(command: str) -> list[dict[str, list[str]]]:
    """What ``dvc exp run`` applies for ``command``: per experiment (one, or one per point of a
    sweep), the overrides of each params file (dvc.repo.experiments.run)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    args = shlex.split(command)
    values = [args[i + 1] for i, a in enumerate(args) if a in ("-S", "--set-param")]
    by_path = to_path_overrides(values)
    sweep = any(o.is_sweep_override() for v in by_path.values() for o in to_hydra_overrides(v))
    return get_hydra_sweeps(by_path) if sweep else [by_path]


def apply_and_check(command: Command, folder: Path) -> list[object]:
    """Each experiment of ``command`` applied to its profile by DVC's own code, then checked as
    the check stage checks (validation, the rendered point count, the model). Returns the
    configs."""
    from dvc.utils.hydra import apply_overrides

    from freezecache.steps.check import check
    from freezecache.tooling import render

    profile = ROOT / "configs" / f"{command.profile}.yaml"
    if command.profile == "default":  # params.yaml, which the committed dvc.yaml is rendered for
        shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    else:  # the stages check compares the point count with, for the profile's points
        slots = render.slots(render.points_of(profile))
        (folder / "dvc.yaml").write_text(
            yaml.safe_dump({"stages": {"cache": {"matrix": {"p": slots}}}})
        )
    configs = []
    for k, experiment in enumerate(overrides_of(command.text)):
        params = folder / f"exp{k}" / "params.yaml"
        params.parent.mkdir()
        shutil.copy(profile, params)
        apply_overrides(str(params), experiment["params.yaml"])
        cfg = load_config(params)
        check(cfg, str(params), folder / "dvc.yaml")
        configs.append(cfg)
    return configs


@pytest.mark.parametrize("command", readme_commands(EXP), ids=_ids(readme_commands(EXP)))
def test_readme_exp_run_lines_pass_check_on_their_profile(command, tmp_path):
    configs = apply_and_check(command, tmp_path)
    assert configs
    if "--queue" in command.text and "," in command.text:  # a sweep queues one per value
        assert len(configs) > 1


def test_an_exp_run_line_that_cannot_run_fails_here(tmp_path):
    """The check has teeth: a block past the model's last, or a point count dvc.yaml has no
    stages for, fails as the check stage would."""
    from freezecache.core.errors import FreezecacheError

    for text, said in [
        ("dvc exp run -S 'freeze.points=[{block:12,epoch:1}]'", "past the last block"),
        ("dvc exp run -S 'freeze.points=[{block:2,epoch:1},{block:4,epoch:2}]'", "freezecache"),
    ]:
        with pytest.raises(FreezecacheError, match=said):
            folder = tmp_path / str(len(said))
            folder.mkdir()
            apply_and_check(Command(text, "", "default", 0), folder)


# -- RUN: as printed -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return project_copy(tmp_path_factory.mktemp("clone"))


@pytest.mark.parametrize("command", readme_commands(RUN), ids=_ids(readme_commands(RUN)))
def test_readme_commands_run_as_printed(command, clone, tmp_path):
    text = command.text.replace("/tmp/", f"{tmp_path}/")
    cwd = clone if text.startswith(("freezecache profile", "python -c")) else ROOT
    if text.startswith("source ") and not (ROOT / ".venv/bin/activate").is_file():
        pytest.skip("no .venv in the checkout (make setup makes it)")
    if text.startswith("source "):
        text += " && command -v freezecache"  # the activated venv's command
    done = run(["bash", "-c", text], cwd, check=False)
    assert done.returncode == 0, f"README.md:{command.line}: `{command.text}`\n{done.stderr}"
    blocks = re.search(r"(\d+) blocks", command.comment)
    if blocks:  # the README says how many blocks it lists
        assert f": {blocks.group(1)} blocks" in done.stdout, done.stdout
    if "make_messy_folder" in text:
        assert len(list((clone / "data/shapes").glob("*/*"))) > 20
    if text.startswith("freezecache profile"):
        name = text.split()[-1]
        assert load_yaml(clone / "params.yaml") == load_yaml(ROOT / "configs" / f"{name}.yaml")


def test_the_pinned_constraints_keep_the_environments_torch(tmp_path):
    """The README's two lines that build /tmp/no-torch.txt: no torch stack from
    constraints.txt, the environment's own torch instead."""
    lines = [c.text for c in readme_commands(RUN) if c.text.startswith(("grep -v", "pip freeze"))]
    assert len(lines) == 2
    for line in lines:
        run(["bash", "-c", line.replace("/tmp/", f"{tmp_path}/")], ROOT)
    pins = (tmp_path / "no-torch.txt").read_text().splitlines()
    assert not [p for p in pins if re.match(r"(nvidia-|triton|cuda-)", p)]
    assert [p for p in pins if p.startswith("torch==")] == [
        p for p in subprocess.run(
            ["bash", "-c", "pip freeze"], capture_output=True, text=True, env=env_with_venv()
        ).stdout.splitlines() if p.startswith("torch==")
    ]  # fmt: skip


# -- commands that leave DVC's state as they found it ---------------------------------------------
def test_readme_refuses_another_profiles_results_in_one_line(tmp_path):
    """The smoke profile writes results/ where the default does: `freezecache readme` must not
    put its figures in the default's section."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(README, tmp_path / "README.md")
    record = json.loads((ROOT / "results/report.json").read_text())
    (tmp_path / "results").mkdir()
    (tmp_path / "results/report.json").write_text(json.dumps({**record, "seeds": [0]}))
    done = run(["freezecache", "readme"], tmp_path, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "results/report.json is not the default profile's run (seeds [0] against [0, 1, 2])" in (
        done.stderr
    )
    assert (tmp_path / "README.md").read_text() == README.read_text()  # nothing written
    (tmp_path / "results/report.json").write_text(json.dumps(record))
    run(["freezecache", "readme"], tmp_path)  # the default's own: accepted


def test_the_plan_command_prints_without_writing_dvcs_outputs(monkeypatch):
    """`freezecache plan` shows the table; results/plan.* are the plan stage's, which DVC
    tracks (`make plan` runs that stage)."""
    from typer.testing import CliRunner

    from freezecache.steps import plan as steps_plan
    from freezecache.tooling.cli import app

    asked = {}
    monkeypatch.setattr(steps_plan, "plan", lambda cfg, write=True: asked.setdefault("w", write))
    done = CliRunner().invoke(app, ["plan", "--params", str(ROOT / "params.yaml")])
    assert done.exit_code == 0, done.output
    assert asked == {"w": False}
