"""Race reports a kernel developer accepts: checked on D4, D10, D12 and a GUP-fast scenario of
our own (the issue's yardstick)."""

from __future__ import annotations

import json

import pytest

import ptsim
from ptsim.cli import main
from ptsim.report import race_rows

from conftest import ROOT, SCENARIOS

# The GUP-fast scenario "of our own" is the exploration yardstick the benchmarks use.
USER_GUP_PATH = ROOT / "benchmarks" / "scenarios" / "user_gup_2m.toml"
USER_GUP = USER_GUP_PATH.read_text()

# (scenario, variant, pct seed that shows the bug)
CASES = {
    "d04": (str(SCENARIOS / "d04_retract_vs_reclaim.toml"), "no-recheck", 41),
    "d10": (str(SCENARIOS / "d10_gup_fast_vs_page_free.toml"), "page-broadcast", 28),
    "d12": (str(SCENARIOS / "d12_collapse_pte_mapped_thp_ptl_eq_pml.toml"), "no-split-ptlocks",
            4),
    "user-gup": (str(USER_GUP_PATH), "page-broadcast", None),
}


def variant_of(case: str):
    path, name, _seed = CASES[case]
    return ptsim.load(path).variant(name)


def buggy_run(case: str):
    v = variant_of(case)
    seed = CASES[case][2]
    if seed is None:
        seed = v.stress(runs=300, strategy="pct").bugs[0].seed
    r = v.run(seed=seed, strategy="pct")
    assert r.bug is not None
    return v, r


@pytest.mark.parametrize("case", list(CASES))
def test_the_diagram_shows_how_the_object_was_obtained_changed_and_misused(case):
    v, r = buggy_run(case)
    events = r.events()
    rows = race_rows(v._engine().replay(r._choices).bug, events)
    bug = rows[-1]
    assert bug["event"] == "bug" and bug["kind"] == r.bug.kind  # the BUG row, never blank
    changers = [row for row in rows[:-1]
                if row["event"] in ("pmd_clear", "free_table", "pmdp_collapse_flush")]
    assert changers, "no step that cleared or freed the object"
    racer = r.bug.cpu if r.bug.cpu is not None else next(
        row["cpu"] for row in reversed(rows) if row["event"] == "pte_free_defer")
    obtained = [row for row in rows if row["cpu"] == racer and row["step"] < changers[0]["step"]
                and row["event"] in ("pmdp_get_lockless", "pmdp_get", "spin_lock", "spin_wait")]
    assert obtained, "no step where the racing CPU obtained the object"
    assert any(row["cpu"] != racer for row in changers), "the clearing CPU has no column"
    text = r.bug.report
    assert "Race diagram:" in text and f"CPU{racer}" in text


@pytest.mark.parametrize("case", list(CASES))
def test_the_report_names_configuration_fix_and_lifetime(case):
    v, r = buggy_run(case)
    text = r.bug.report
    assert text.startswith(f"BUG: {r.bug.kind} in ")
    assert "CONFIG_PT_RECLAIM=y" in text
    assert ("CONFIG_SPLIT_PTE_PTLOCKS=n" in text) == (case == "d12")
    fixed_by = v.resolved.fixed_by
    assert (f"Fixed upstream by: {fixed_by}" in text) == bool(fixed_by)
    assert bool(fixed_by) == (case != "d12")  # D12 has no upstream fix
    if case in ("d10", "user-gup"):
        assert "Freed by CPU0 at step" in text and "Call trace:" in text
        assert "(mm/" in text  # trace lines name their kernel files
    if case == "d12":
        assert "Queued for freeing by CPU0" in text and "pte_free_defer" in text
    if case == "d04":
        assert "value changed: 0x4[0]: pfn" in text and "-> none" in text
        assert "fix reverted: retract_recheck_pmd = false" in text


@pytest.mark.parametrize("case", list(CASES))
def test_every_log_ends_with_the_finding_and_its_token(case, tmp_path, capsys):
    v, r = buggy_run(case)
    path = CASES[case][0]
    last = r.events()[-1]
    assert last["event"] == "bug" and last["kind"] == r.bug.kind and last["token"] == r.token
    log = tmp_path / "log.jsonl"
    assert main(["replay", path, r.token, "--log", str(log), "--format", "json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["token"] == r.token  # stdout: the trace alone
    assert "BUG:" in err  # the report goes to stderr
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "bug"


def test_run_and_stress_shrink_by_default_within_a_budget(capsys):
    d2 = str(SCENARIOS / "d02_nonempty_reclaim_after_break.toml")
    argv = ["run", d2, "--variant", "before-fix", "--seed", "13", "--strategy", "random",
            "--json"]
    assert main(argv) == 1
    shrunk = json.loads(capsys.readouterr().out)["bugs"][0]["shrunk"]
    assert shrunk["preemptions"] < 25 and shrunk["steps"] < 90
    assert main(argv + ["--shrink-budget", "5"]) == 1
    small = json.loads(capsys.readouterr().out)["bugs"][0]["shrunk"]
    assert small["steps"] >= shrunk["steps"]  # five schedules do less than two thousand
    assert main(argv + ["--no-shrink"]) == 1
    assert "shrunk" not in json.loads(capsys.readouterr().out)["bugs"][0]
    assert main(argv[:-1]) == 1
    text = capsys.readouterr().out
    assert "shrunk: preemptions 25 -> " in text and "schedules tried" in text
    assert "original token: pts2." in text and text.count("replay: ptsim replay") == 2


def test_a_livelock_report_shows_the_loop(tmp_path, capsys):
    path = tmp_path / "loop.toml"
    path.write_text(USER_GUP.split("[[variant]]")[0]
                    .replace("max_steps = 20000", "max_steps = 300")
                    .replace('op = "madvise_dontneed"', 'op = "pte_walker"\nrepeat = 1000')
                    .replace('len = "2M"', "")
                    .replace('op = "gup_fast"', 'op = "touch"').replace("nr_pages = 16", ""))
    assert main(["run", str(path), "--no-shrink"]) == 1
    text = capsys.readouterr().out
    assert "BUG: livelock" in text and "max_steps reached" in text
    assert "Last steps of each CPU:" in text and "The loop that repeated on CPU0 (" in text
