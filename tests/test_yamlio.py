"""One YAML dialect for params: the stages read params.yaml and the profiles as DVC does."""

import shutil

import pytest
from dvc.utils.hydra import apply_overrides
from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

from conftest import ROOT, run
from freezecache.config import dump_config, load_config, parse_config
from freezecache.core.errors import FreezecacheError
from freezecache.core.yamlio import dump_yaml, load_yaml, parse_value, parse_yaml

PROFILES = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))

# Where YAML 1.1 (PyYAML) and 1.2 (DVC) part ways, and the quoted forms that never differ.
DIALECT = """\
off_plain: off
on_plain: on
yes_plain: yes
no_plain: No
true_plain: true
exp: 1e-3
exp_signed: 2.5E+2
leading_zero: 010
octal: 0o10
hex: 0x1F
underscore: 1_000
sexagesimal: 1:20
null_word: null
null_tilde: ~
null_empty:
off_double: "off"
off_single: 'off'
exp_quoted: "1e-3"
zero_quoted: '010'
date: 2026-12-07
flow: {block: 3, epoch: 1}
"""


def test_values_are_read_as_dvc_reads_them():
    ours = parse_yaml(DIALECT, "params.yaml")
    assert ours == dvc_parse_yaml(DIALECT, "params.yaml")
    # the cases the issue measured, spelled out: PyYAML would give False, True, '1e-3', 8
    assert (ours["off_plain"], ours["yes_plain"], ours["exp"], ours["leading_zero"]) == (
        "off",
        "yes",
        0.001,
        10,
    )
    assert ours["null_word"] is ours["null_tilde"] is ours["null_empty"] is None
    assert ours["off_double"] == ours["off_single"] == "off" and ours["zero_quoted"] == "010"


@pytest.mark.parametrize(
    ("text", "value"),
    [("off", "off"), ("4", 4), ("1e-3", 0.001), ("[1, 2]", [1, 2]), ("", None), ("'4'", "4")],
)
def test_a_command_line_value_reads_as_in_a_file(text, value):
    assert parse_value(text, "--kwarg x") == value


def test_a_key_written_twice_is_one_line_naming_it_and_both_lines(tmp_path):
    text = (ROOT / "configs/default.yaml").read_text() + "train:\n  epochs: 5\n"
    first = 1 + text.splitlines().index("train:")
    second = len(text.splitlines()) - 1
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(FreezecacheError) as err:
        load_config(tmp_path / "params.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert f"train is written twice (lines {first} and {second})" in message
    with pytest.raises(Exception, match="corrupted"):  # DVC refuses the same file
        dvc_parse_yaml(text, "params.yaml")


def test_a_nested_key_written_twice_is_named_with_its_section():
    with pytest.raises(FreezecacheError, match=r"train\.lr is written twice \(lines 2 and 4\)"):
        parse_yaml("train:\n  lr: 0.05\n  epochs: 3\n  lr: 0.01\n", "params.yaml")


def test_the_check_command_refuses_a_key_written_twice_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "configs/smoke.yaml").read_text() + "train:\n  epochs: 5\n")
    done = run(["freezecache", "check", "--params", str(params)], tmp_path, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "train is written twice" in done.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_dvcs_rewrite_leaves_every_profile_meaning_the_same(tmp_path, profile):
    """`dvc exp run -S` rewrites the whole file through DVC's YAML library (quotes dropped,
    flow lists unrolled, null written empty): the validated config must not move."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "configs" / f"{profile}.yaml", params)
    before = dump_config(parse_config(load_yaml(params), profile))
    device = load_yaml(params)["runtime"]["device"]
    apply_overrides(str(params), [f"runtime.device={device}"])  # the same value: harmless
    rewritten = params.read_text()
    assert rewritten != (ROOT / "configs" / f"{profile}.yaml").read_text()  # it did rewrite
    assert load_yaml(params) == dvc_parse_yaml(rewritten, "params.yaml")
    assert dump_config(parse_config(load_yaml(params), profile)) == before


def test_what_we_write_reads_back_the_same_in_both():
    raw = load_yaml(ROOT / "configs/default.yaml")
    text = dump_yaml(raw)
    assert parse_yaml(text, "x") == dvc_parse_yaml(text, "x") == raw


def test_reading_params_imports_no_dvc():
    """The stages read params as DVC does without importing DVC (their start-up pays for it)."""
    code = (
        "import sys; from freezecache.config import load_config; "
        f"load_config({str(ROOT / 'params.yaml')!r}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'dvc', 'hydra', 'yaml'}))"
    )
    done = run(["python", "-c", code], ROOT)
    assert done.stdout.strip() == "[]", done.stdout
