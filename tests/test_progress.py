"""The stress progress bar: shown on a terminal, never in piped output or with --json."""

from __future__ import annotations

import json

import pytest

from ptsim.cli import main

from conftest import D1


@pytest.mark.parametrize("where", [[], ["--jobs", "2"]], ids=["in-process", "jobs-2"])
def test_a_terminal_shows_the_bar_on_stderr(capsys, terminal, where):
    code = main(["stress", D1, "--variant", "semi-rcu", "--runs", "300", *where])
    out, err = capsys.readouterr()
    assert code == 1
    # The last frame drawn: every schedule done, the rate, the one distinct bug.
    assert "300/300" in err and "schedules/s" in err and "1 distinct bug(s)" in err
    assert "300/300" not in out and "distinct findings" in out


def test_json_on_a_terminal_has_no_bar(capsys, terminal):
    code = main(["stress", D1, "--variant", "semi-rcu", "--runs", "300", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["runs"] == 300
    assert "schedules/s" not in err and err == ""


@pytest.mark.parametrize("where", [[], ["--jobs", "2"]], ids=["in-process", "jobs-2"])
def test_piped_output_has_no_bar(capsys, monkeypatch, where):
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    code = main(["stress", D1, "--variant", "full-rcu", "--runs", "300", *where])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith("300 schedules, ") and "no bug found" in out


def test_explore_check_and_shrink_show_progress_on_a_terminal_only(capsys, terminal):
    code = main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "explore" in err and "schedules/s" in err and "schedules/s" not in out
    assert main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1", "--json"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["check", D1]) == 0
    assert "check d01_semi_rcu_single_free.toml semi-rcu" in capsys.readouterr().err
    assert main(["stress", D1, "--variant", "semi-rcu", "--runs", "50", "--strategy", "pct",
                 "--json", "--no-shrink"]) == 1
    token = json.loads(capsys.readouterr().out)["bugs"][0]["token"]
    assert main(["shrink", D1, token]) == 1
    assert "shrink" in capsys.readouterr().err
