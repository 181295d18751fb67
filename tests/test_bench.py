"""ptsim.bench: the figures of `ptsim bench` are there and consistent. No speed is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptsim.bench import bench, catalogue, render

from conftest import D1, D10


@pytest.fixture(scope="module")
def result() -> dict:
    return bench(scenarios=[D1, D10], schedules=20, handoffs=2000)


def test_keys_and_positive_figures(result):
    assert set(result) == {"step_us", "handoff_us", "ratio", "schedule_us"}
    for key in ("step_us", "handoff_us", "ratio"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["step_us"] / result["handoff_us"])


def test_schedule_us_names_the_files_asked_for(result):
    assert list(result["schedule_us"]) == [Path(D1).name, Path(D10).name]
    for name, us in result["schedule_us"].items():
        assert isinstance(us, float) and us > 0, name


def test_render_names_every_figure(result):
    text = render(result)
    assert "step" in text and "hand-off" in text and "ratio" in text
    assert all(name in text for name in result["schedule_us"])


def test_catalogue_is_the_d_files():
    names = [Path(p).name for p in catalogue()]
    assert names == sorted(names) and Path(D1).name in names and Path(D10).name in names
    assert all(n.startswith("d") and n.endswith(".toml") for n in names)


def test_bad_arguments():
    with pytest.raises(ValueError):
        bench(scenarios=[D1], schedules=0)
    with pytest.raises(ValueError):
        bench(scenarios=[D1, D1], schedules=1, handoffs=1, rounds=1)


def test_cli_bench_json_has_the_spec_keys(capsys, monkeypatch):
    import json

    import ptsim.bench
    from ptsim.cli import main

    real = ptsim.bench.bench
    monkeypatch.setattr(ptsim.bench, "bench",
                        lambda: real(scenarios=[D1],
                                     schedules=10, handoffs=500))
    assert main(["bench", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"step_us", "handoff_us", "ratio", "schedule_us"}
