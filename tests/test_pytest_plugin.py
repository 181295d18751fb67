"""The pytest plugin, run the way a user runs it (pytester)."""

from __future__ import annotations

import shutil

import pytest

from ptsim.scenario import load_scenario

from conftest import SCENARIOS

D1_TEXT = (SCENARIOS / "d01_semi_rcu_single_free.toml").read_text()


@pytest.fixture
def run(pytester):
    def run_pytest(*args):
        return pytester.runpytest_inprocess(*args, "-p", "no:cacheprovider")
    return run_pytest


def test_the_catalogue_collects_one_item_per_variant_and_passes(pytester, run):
    shutil.copytree(SCENARIOS, pytester.path / "scenarios")
    collected = run("scenarios", "--collect-only", "-q")
    ids = [line for line in collected.outlines if "::" in line]
    assert "scenarios/d01_semi_rcu_single_free.toml::semi-rcu" in ids
    assert "scenarios/d12_collapse_pte_mapped_thp_ptl_eq_pml.toml::split-ptlocks" in ids
    assert "scenarios/d13_lazy_tlb_retract_pmd_flush.toml::before-fix" in ids
    assert not any("measure" in line for line in ids)  # measure/ only when named
    # one item per variant of every catalogue file (34 with D12's five and D13's two)
    variants = sum(len(load_scenario(p).variants) for p in SCENARIOS.glob("*.toml"))
    assert len(ids) == variants >= 34
    result = run("scenarios")
    result.assert_outcomes(passed=variants)
    measured = run("scenarios/measure", "--collect-only", "-q")
    assert any("seed002_vmpte.toml::after" in line for line in measured.outlines)


def test_other_toml_files_are_ignored_and_the_plugin_can_be_turned_off(pytester, run):
    pytester.makefile(".toml", pyproject='[tool.x]\nname = "not a scenario"\n')
    pytester.makefile(".toml", d01=D1_TEXT)
    result = run("--collect-only", "-q")
    ids = [line for line in result.outlines if "::" in line]
    assert ids == ["d01.toml::semi-rcu", "d01.toml::full-rcu", "d01.toml::semi-rcu-batch"]
    off = run("--collect-only", "-q", "-p", "no:ptsim")
    assert not [line for line in off.outlines if "::" in line]


def test_a_wrong_expectation_fails_with_the_report_token_and_replay_command(pytester, run):
    wrong = D1_TEXT.replace('expect = ["pt-use-after-free"]', "expect = []", 1)
    wrong = wrong.replace('name = "full-rcu"\nconfig = { table_free = "rcu" }\nexpect = []',
                          'name = "full-rcu"\nconfig = { table_free = "rcu" }\n'
                          'expect = ["pt-use-after-free"]')
    assert wrong.count('expect = ["pt-use-after-free"]') == 1
    pytester.makefile(".toml", wrong=wrong)
    result = run("--ptsim-runs", "300")
    result.assert_outcomes(passed=1, failed=2)
    text = result.stdout.str()
    assert "wrong.toml::semi-rcu" in text and "expected no bug, found pt-use-after-free" in text
    assert "BUG: pt-use-after-free" in text and "Race diagram" in text
    assert "token: pts2." in text and "replay: ptsim replay" in text
    assert "full-rcu]: expected pt-use-after-free, not found in 300 pct schedules" in text


MODULE = '''
import ptsim


@ptsim.op("walk_twice")
async def walk_twice(cpu, *, addr: ptsim.Addr, len: ptsim.Size = 4096):
    """pte_walker, twice."""
    for _ in range(2):
        await ptsim.run_op(cpu, "pte_walker", addr=addr, len=len)
'''


def test_user_modules_from_the_option_or_the_ini(pytester, run):
    pytester.makepyfile(walkers=MODULE)
    text = D1_TEXT.replace('op = "pte_walker"', 'op = "walk_twice"')
    assert text != D1_TEXT
    pytester.makefile(".toml", mine=text)
    without = run()
    assert "unknown op" in without.stdout.str() and "--import" in without.stdout.str()
    run("--ptsim-import", "walkers.py", "--ptsim-runs", "200").assert_outcomes(passed=3)
    pytester.makeini("[pytest]\nptsim_imports = walkers.py\n")
    run("--ptsim-runs", "200").assert_outcomes(passed=3)


def test_testing_helpers_fail_with_the_report(pytester, run):
    pytester.makepyfile(test_mine=f'''
import ptsim, ptsim.testing

D10 = {str(SCENARIOS / "d10_gup_fast_vs_page_free.toml")!r}

def test_clean():
    ptsim.testing.assert_clean(ptsim.load(D10).variant("page-ipi"), runs=100, strategy="pct")

def test_finds():
    v = ptsim.load(D10).variant("page-broadcast")
    ptsim.testing.assert_finds(v, "pt-use-after-free", runs=100, strategy="pct")

def test_wrongly_clean():
    ptsim.testing.assert_clean(ptsim.load(D10).variant("page-broadcast"), runs=100,
                               strategy="pct")
''')
    result = run("-p", "no:ptsim")
    result.assert_outcomes(passed=2, failed=1)
    text = result.stdout.str()
    assert "expected no bug, found pt-use-after-free" in text and "token: pts2." in text
