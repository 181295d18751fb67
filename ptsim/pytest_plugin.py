"""The pytest plugin (entry point ``ptsim``; ``pytest -p no:ptsim`` turns it off).

``pytest PATH`` collects every ``*.toml`` under PATH whose top table is ``[scenario]``: one item
per variant, ``file.toml::variant``, checked against its expectation with the file's
``[expect]`` budget (``--ptsim-runs N`` overrides it). A ``measure/`` folder is skipped unless
it is named. User modules: ``--ptsim-import MODULE_OR_FILE.py`` or the ini key
``ptsim_imports``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

_SCENARIO_HEADER = re.compile(r"^\s*\[scenario\]\s*(#.*)?$", re.MULTILINE)


def pytest_addoption(parser) -> None:
    group = parser.getgroup("ptsim", "ptsim scenario files")
    group.addoption("--ptsim-runs", type=int, metavar="N",
                    help="schedules per variant instead of the file's [expect] runs")
    group.addoption("--ptsim-import", action="append", default=[], metavar="MODULE_OR_FILE.py",
                    help="load a user module (ops, patched kernel functions) first; repeatable")
    parser.addini("ptsim_imports", "user modules ptsim loads before collecting scenarios",
                  type="linelist", default=[])


def _imports(config) -> list[str]:
    root = Path(str(config.rootpath))
    from_ini = [str(root / spec) if spec.endswith(".py") else spec
                for spec in config.getini("ptsim_imports")]
    return from_ini + list(config.getoption("ptsim_import"))


def pytest_configure(config) -> None:
    from ptsim import usermods

    try:
        usermods.load_all(_imports(config))
    except usermods.ImportFailed as exc:
        raise pytest.UsageError(f"ptsim: {exc}") from None


def _named_measure(config) -> bool:
    return any("measure" in Path(str(arg).split("::")[0]).parts for arg in config.args)


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".toml":
        return None
    if "measure" in file_path.parts and not _named_measure(parent.config):
        return None
    try:
        text = file_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not _SCENARIO_HEADER.search(text):
        return None  # not a scenario: other TOML files are ignored
    return ScenarioFile.from_parent(parent, path=file_path)


class ScenarioFile(pytest.File):
    def collect(self):
        import ptsim

        try:
            scenario = ptsim.load(self.path, imports=_imports(self.config))
        except ptsim.ScenarioError as exc:
            raise self.CollectError(str(exc)) from None
        for name in scenario.variants:
            yield VariantItem.from_parent(self, name=name, scenario=scenario)


class VariantItem(pytest.Item):
    # Plugins that mark items by their test function (pytest-trio's trio_mode) read item.obj.
    obj = None

    def __init__(self, *, scenario, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scenario = scenario

    def runtest(self) -> None:
        import ptsim
        from ptsim.testing import check_expectation

        variant_name = None if self.name == "base" and not self.scenario.file.variants \
            else self.name
        try:
            variant = self.scenario.variant(variant_name)
        except ptsim.ScenarioError as exc:
            raise VariantFailed(str(exc)) from None
        try:
            check_expectation(variant, self.config.getoption("ptsim_runs"))
        except AssertionError as exc:
            raise VariantFailed(str(exc)) from None

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, VariantFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"


class VariantFailed(Exception):
    """A variant's expectation failed: the message is the whole report."""
