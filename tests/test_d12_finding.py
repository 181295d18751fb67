"""D12, ptsim's own finding (docs/findings/d12-collapse-pte-mapped-thp-ptl-eq-pml.md): the config
key pte_mapped_thp_recheck_always decides the verdict under both shapes of PT_RECLAIM's code
(pt_reclaim_code), and the token the findings page gives still replays to the bug it describes."""

from __future__ import annotations

import re

import pytest

import ptsim

from conftest import ROOT, SCENARIOS

D12 = str(SCENARIOS / "d12_collapse_pte_mapped_thp_ptl_eq_pml.toml")
PAGE = ROOT / "docs" / "findings" / "d12-collapse-pte-mapped-thp-ptl-eq-pml.md"

# (buggy variant, fixed variant, the function whose pmd_clear falls in the window)
SHAPES = [
    ("no-split-ptlocks", "recheck-always", "try_to_free_pte"),
    ("no-split-ptlocks-zap-empty-pte-table", "recheck-always-zap-empty-pte-table",
     "zap_empty_pte_table"),
]


@pytest.fixture(scope="module")
def sc():
    return ptsim.load(D12)


@pytest.mark.parametrize("buggy, fixed, clearer", SHAPES)
def test_the_key_decides_the_verdict_for_each_reclaim_code(sc, buggy, fixed, clearer):
    """Without the recheck: invalid-free of pfn 0 within 300 seeded PCT schedules, the pmd
    cleared by the shape's own function between step 2's unlock and step 4's unchecked
    pmd_lock. With it: the same budget is clean, and the step-4 recheck sees the changed pmd
    in some schedules (the window is exercised, the fix is what closes it)."""
    s = sc.variant(buggy).stress(runs=300, seed=0, strategy="pct")
    assert [b.kind for b in s.bugs] == ["invalid-free"]
    r = sc.variant(buggy).replay(s.bugs[0].token)
    assert "pfn 0x0" in r.bug.summary
    log = r.events()
    cleared = [e["step"] for e in log if e["event"] == "pte_mapped_thp_cleared"][0]
    no_recheck = [e["step"] for e in log if e["event"] == "pte_mapped_thp_no_recheck"][0]
    clears = [e for e in log if e["event"] == "pmd_clear" and e["cpu"] == 1]
    assert clears and clears[0]["func"] == clearer
    assert cleared < clears[0]["step"] < no_recheck

    v = sc.variant(fixed)
    assert not v.stress(runs=300, seed=0, strategy="pct").bugs
    seen = 0
    for seed in range(300):
        run = v.run(seed=seed, strategy="pct")
        assert run.bug is None
        seen += any(e["event"] == "pte_mapped_thp_pmd_changed" and e.get("step") == 4
                    for e in run.events())
    assert seen > 0


@pytest.mark.parametrize("buggy, fixed, _", SHAPES)
def test_bounded_explore_buggy_finds_fixed_is_complete_and_clean(sc, buggy, fixed, _):
    """One preemption is enough for the bug (the shrunk schedule has one); the fix is clean
    over every schedule with at most two (three: the findings page, 15-25 s each)."""
    assert [b.kind for b in sc.variant(buggy).explore(preemptions=1).bugs] == ["invalid-free"]
    e = sc.variant(fixed).explore(preemptions=2)
    assert e.complete and not e.bugs


def test_the_findings_page_token_replays_to_its_bug(sc):
    text = PAGE.read_text()
    token = re.search(r"^Token: `(pts2\.[A-Za-z0-9_-]+)`", text, re.MULTILINE).group(1)
    assert "BUG: invalid-free" in text and "pfn 0x0" in text
    r = sc.variant("no-split-ptlocks").replay(token)
    assert r.bug is not None and r.bug.kind == "invalid-free" and "pfn 0x0" in r.bug.summary
    assert token in text.split("## Reproducing with ptsim")[1]  # the replay command uses it
