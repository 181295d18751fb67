"""shrink: a smaller schedule with the same kind of bug, as a token that replays on its own."""

from __future__ import annotations

import json

from ptsim.cli import main
from ptsim.engine import Engine
from ptsim.scenario import load_scenario
from ptsim.shrink import shrink

from conftest import D1, SCENARIOS

D2 = str(SCENARIOS / "d02_nonempty_reclaim_after_break.toml")


def stress_token(capsys, path: str, variant: str, runs: int, strategy: str) -> str:
    main(["stress", path, "--variant", variant, "--runs", str(runs), "--strategy", strategy,
          "--json", "--stop-on-first"])
    return json.loads(capsys.readouterr().out)["bugs"][0]["token"]


def test_shrunk_token_replays_on_its_own_with_the_same_kind(capsys):
    token = stress_token(capsys, D2, "before-fix", 40, "random")
    assert main(["shrink", D2, token, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"kind", "token", "steps_before", "steps_after", "preemptions_before",
                         "preemptions_after"}
    assert data["kind"] == "nonempty-table-freed"
    assert data["preemptions_after"] < data["preemptions_before"]
    assert data["steps_after"] <= data["steps_before"]
    assert main(["replay", D2, data["token"], "--format", "json"]) == 1
    assert '"nonempty-table-freed"' not in capsys.readouterr().err


def test_shrink_reaches_the_fewest_preemptions_explore_needs(capsys):
    """D1's race needs one preemption (explore finds it at K = 1, not at K = 0): shrink gets a
    schedule found with more down to one."""
    eng = Engine(load_scenario(D1).resolve("semi-rcu"))
    result = next(r for r in (eng.run_seed(s, "pct") for s in range(100))
                  if r.bug and len(r.choices) > 0)
    shrunk = shrink(eng, result.choices)
    assert shrunk.kind == "pt-use-after-free"
    assert shrunk.after.preemptions == 1 <= shrunk.before.preemptions
    replayed = eng.replay(shrunk.after.result.choices)
    assert replayed.bug.kind == "pt-use-after-free"


def test_shrink_text_output_has_the_report(capsys):
    token = stress_token(capsys, D1, "semi-rcu", 100, "pct")
    assert main(["shrink", D1, token]) == 1
    out = capsys.readouterr().out
    assert out.startswith("shrunk pt-use-after-free:") and "Race diagram:" in out
    assert "ptsim replay" in out


def test_shrinking_a_clean_schedule_exits_2(capsys):
    eng = Engine(load_scenario(D1).resolve("full-rcu"))
    token = eng.token(eng.run_seed(0).choices)
    assert main(["shrink", D1, token]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to shrink" in err
