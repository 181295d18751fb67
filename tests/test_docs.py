"""The documentation is part of the product: its examples run, its reference tables are the
registries, and it links only inside the repository."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from ptsim import docgen
from ptsim.cli import main

from conftest import ROOT

DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def test_reference_is_generated_from_the_registries():
    assert (DOCS / "reference.md").read_text() == docgen.reference(), \
        "docs/reference.md is stale: run python -m ptsim.docgen"


def test_docs_and_readme_link_only_inside_the_repository():
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, path
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_every_doc_is_linked_from_readme():
    readme = (ROOT / "README.md").read_text()
    for path in DOCS.glob("*.md"):
        assert f"docs/{path.name}" in readme, path.name


def test_api_examples_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "api_doc_examples"}
    registered = []
    try:
        for i, code in enumerate(blocks(DOCS / "api.md", "python")):
            exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)
            registered.append(i)
    finally:
        from ptsim.kernel_model.registry import forget_module
        forget_module("api_doc_examples")
    assert len(registered) >= 8


def _tutorial_files(tmp_path):
    text = (DOCS / "tutorial.md").read_text()
    files = dict(FILE_BLOCK.findall(text))
    assert set(files) == {"my_patch.py", "reclaim_vs_walker.toml"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    return text


def test_tutorial_commands_run_as_written(tmp_path, monkeypatch, capsys):
    text = _tutorial_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["stress", "reclaim_vs_walker.toml", "--import", "my_patch.py", "--variant",
                 "free-now", "--runs", "300", "--strategy", "pct", "--json"])
    assert code == 1
    token = json.loads(capsys.readouterr().out)["bugs"][0]["token"]
    ran = []
    for block in [b for kind, b in FENCE.findall(text) if kind == "sh"]:
        for line in block.splitlines():
            if not line.startswith("ptsim "):
                continue
            argv = shlex.split(line.replace("TOKEN", token))[1:]
            code = main(argv)
            out, err = capsys.readouterr()
            assert code in (0, 1), (line, err)
            ran.append((argv[0], argv[argv.index("--variant") + 1] if "--variant" in argv
                        else None, code, out))
    by = {(cmd, variant): (code, out) for cmd, variant, code, out in ran}
    assert by[("check", None)][0] == 0 and "all expectations hold" in by[("check", None)][1]
    assert by[("explore", "mainline")][0] == 0 and "no bug found" in by[("explore", "mainline")][1]
    assert by[("explore", "free-now")][0] == 1
    assert by[("replay", None)][0] == 1 and "--import my_patch.py" in by[("replay", None)][1]
    assert len(ran) == 7


def test_tutorial_python_and_pytest_run(tmp_path, monkeypatch):
    text = _tutorial_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    for code in [b for kind, b in FENCE.findall(text) if kind == "python"
                 and "ptsim.load(" in b]:
        exec(compile(code, "docs/tutorial.md", "exec"), {"__name__": "tutorial"})
    line = next(line for kind, b in FENCE.findall(text) if kind == "sh"
                for line in b.splitlines() if line.startswith("pytest "))
    proc = subprocess.run([sys.executable, "-m", *shlex.split(line), "-p", "no:cacheprovider",
                           "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


@pytest.mark.parametrize("name", ["scenario-format.md", "model.md", "catalogue.md"])
def test_doc_examples_are_valid_scenarios(name, tmp_path, capsys):
    """Every complete scenario shown in the docs passes validate."""
    path = DOCS / name
    if not path.exists():
        pytest.fail(f"docs/{name} is missing")
    for i, body in enumerate(blocks(path, "toml")):
        if not body.lstrip().startswith("[scenario]"):
            continue
        file = tmp_path / f"example{i}.toml"
        file.write_text(body)
        assert main(["validate", str(file)]) == 0, capsys.readouterr().err
