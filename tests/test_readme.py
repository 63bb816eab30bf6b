"""The README's tables say what the code says: each fact has one source, the code, and the README is
checked against it (exit codes, what a resume may change, presets, knobs and their defaults, modules)."""
import dataclasses
import re
from pathlib import Path

import pytest

from hw7qa.__main__ import EXIT_CODES, build_parser
from hw7qa.config import FREE_ON_RESUME, Config, preset_names

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def table_rows(header: str) -> list[list[str]]:
    """The cells of the rows of the README table whose header line starts with ``header``."""
    lines = README[README.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_the_exit_code_table_is_exit_codes():
    assert {int(code): text for code, text in table_rows("| code | meaning |")} == EXIT_CODES
    help_text = build_parser().format_help()
    assert all(f"  {code:<5}" in help_text for code in EXIT_CODES)


def test_what_a_resume_may_change_is_free_on_resume():
    sentence = README[README.index("These may change:"):]
    sentence = sentence[:sentence.index(". ")]
    assert re.findall(r"`(\w+)`", sentence) == list(FREE_ON_RESUME)
    resume_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert ", ".join(FREE_ON_RESUME) in " ".join(resume_help.split())


def test_the_preset_table_lists_every_preset():
    assert sorted(row[0].strip("`") for row in table_rows("| preset | model | for |")) == preset_names()


def default_text(value) -> str:
    return {True: "true", False: "false", "": '""'}.get(value, str(value)) if not isinstance(value, float) \
        else f"{value:g}"


@pytest.mark.parametrize("header", ["| knob | default |", "| knob | off |"])
def test_every_knob_in_the_tables_is_a_setting_with_that_default(header):
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for row in table_rows(header):
        names = re.findall(r"`(\w+)`", row[0])
        values = [v.strip().strip("`") for v in row[1].split(",")]
        assert names and all(name in defaults for name in names), row[0]
        if len(values) == 1 and len(names) > 1:       # one value for all of them
            values *= len(names)
        for name, value in zip(names, values):
            expected = default_text(defaults[name])
            assert value == expected or (re.fullmatch(r"[\d.e+-]+", value) and float(value) == defaults[name]), \
                f"README says {name}={value}, the code {expected}"


def test_the_map_of_the_code_lists_every_module():
    listed = set(re.findall(r"^hw7qa/(\w+)\.py", README, flags=re.M))
    modules = {p.stem for p in (ROOT / "hw7qa").glob("*.py")} - {"__init__"}
    assert listed == modules
