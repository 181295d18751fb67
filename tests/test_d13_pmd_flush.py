"""pmd_flush_freed_tables and catalogue D13: x86 flush_tlb_range() passes freed_tables only since
3ef938c35035 ("x86/mm: Fix flush_tlb_range() when used for zapping normal PMDs", v6.15). Before
it, the flush in retract_page_tables' pmdp_collapse_flush skips lazy-TLB CPUs, whose
paging-structure caches keep the table pte_free_defer then frees."""

from __future__ import annotations

import json

from ptsim.cli import main
from ptsim.engine import Engine
from ptsim.explore import explore
from ptsim.scenario import load_scenario

from conftest import SCENARIOS

D13 = str(SCENARIOS / "d13_lazy_tlb_retract_pmd_flush.toml")
D8 = str(SCENARIOS / "d08_mremap_vs_retract.toml")


def engine(path: str, variant: str | None = None, *overrides: str) -> Engine:
    return Engine(load_scenario(path).resolve(variant, list(overrides)))


def _events(log, name: str, **fields):
    return [ev for ev in log if ev["event"] == name
            and all(ev.get(k) == v for k, v in fields.items())]


def _retract_flush(log):
    """The flush_tlb_mm_range event of retract's pmdp_collapse_flush (the one after the pmd
    write that unlinks the table: the 2 MB range, from CPU0)."""
    flushes = [ev for ev in log if ev["event"] == "flush_tlb_mm_range" and ev["cpu"] == 0
               and ev["end"] == hex(int(ev["start"], 16) + (2 << 20))]
    assert len(flushes) == 1, flushes
    return flushes[0]


def test_the_key_flips_the_verdict_on_the_same_seeds():
    """One scenario, the same 300 random seeds: only the key differs."""
    seeds = range(300)
    buggy = [r for r in engine(D13, None, "pmd_flush_freed_tables=false").run_seeds(seeds)
             if r.bug]
    assert buggy and {r.bug.kind for r in buggy} == {"tlb-use-after-free"}
    assert all(r.bug.cpu == 1 and "speculative" in r.bug.summary for r in buggy)
    fixed = engine(D13, None, "pmd_flush_freed_tables=true").run_seeds(seeds)
    assert not [r for r in fixed if r.bug or r.hazards]


def test_buggy_variant_is_found_within_a_small_budget_by_both_strategies():
    for strategy in ("random", "pct"):
        results = engine(D13, "before-fix").run_seeds(range(30), strategy)
        assert any(r.bug and r.bug.kind == "tlb-use-after-free" for r in results), strategy


def test_the_freed_table_is_the_one_retract_took_away_and_the_lazy_cpu_was_skipped():
    eng = engine(D13, "before-fix")
    result = next(r for r in eng.run_seeds(range(50)) if r.bug)
    log = eng.replay(result.choices).log
    retracted = _events(log, "retract_table")
    assert len(retracted) == 1
    table = retracted[0]["pfn"]
    assert f"pfn {table}" in result.bug.summary
    flush = _retract_flush(log)
    assert flush["freed_tables"] is False
    # CPU1 was lazy when the flush ran, and no flush handler ran on it after that
    assert _events(log, "enter_lazy_tlb")[0]["step"] < flush["step"]
    assert not [ev for ev in _events(log, "flush_tlb_func") if ev["cpu"] == 1
                and ev["step"] > flush["step"]]
    freed = _events(log, "free_table", pfn=table)
    assert freed and freed[0]["step"] <= result.bug.step


def test_fixed_variant_interrupts_the_lazy_cpu_and_the_free_happens_while_it_is_lazy():
    """Clean because the fix runs: the retract flush carries freed_tables, reaches lazy CPU1,
    and in some schedules the table is freed while CPU1 is still walking speculatively."""
    eng = engine(D13, "freed-tables")
    overlapping = 0
    for seed in range(100):
        result = eng.run_seed(seed, log=True)
        assert result.bug is None and not result.hazards
        log = result.log
        flush = _retract_flush(log)
        assert flush["freed_tables"] is True
        handled = [ev for ev in _events(log, "flush_tlb_func") if ev["cpu"] == 1
                   and ev["step"] >= flush["step"]]
        assert handled, seed  # the IPI reached the lazy CPU
        freed = _events(log, "free_table")
        leave = _events(log, "leave_lazy_tlb")
        if freed and leave and freed[0]["step"] < leave[0]["step"]:
            overlapping += 1
    assert overlapping > 0


def test_fixed_variant_is_clean_under_a_complete_explore():
    eng = engine(D13, "freed-tables")
    kinds = set()

    def on_result(index, result):
        if result.bug:
            kinds.add(result.bug.kind)
        kinds.update(h.kind for h in result.hazards)

    found = explore(eng, 1, None, on_result)  # 323 schedules, about 0.5 s
    assert found.complete and found.schedules > 100 and kinds == set()
    # and the buggy variant's bug is inside the same bound
    found = explore(engine(D13, "before-fix"), 1, None, on_result)
    assert found.complete and kinds == {"tlb-use-after-free"}


def test_found_bug_replays_from_its_token(capsys):
    assert main(["stress", D13, "--variant", "before-fix", "--runs", "20", "--strategy",
                 "random", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    (bug,) = data["bugs"]
    assert bug["kind"] == "tlb-use-after-free"
    assert main(["replay", D13, bug["token"], "--format", "json"]) == 1
    replayed = capsys.readouterr().out
    assert "tlb-use-after-free" in replayed and bug["summary"] in replayed


def test_move_normal_pmd_flush_follows_the_key():
    """mremap's move_normal_pmd calls the same flush_tlb_range (mm/mremap.c)."""
    for value, expect in (("true", True), ("false", False)):
        eng = engine(D8, "recheck", f"pmd_flush_freed_tables={value}")
        seen = set()
        for seed in range(40):
            log = eng.run_seed(seed, log=True).log
            moves = _events(log, "move_normal_pmd")
            if not moves:
                continue
            flushes = [ev for ev in log if ev["event"] == "flush_tlb_mm_range"
                       and ev["cpu"] == moves[0]["cpu"] and ev["step"] <= moves[0]["step"]]
            seen.add(flushes[-1]["freed_tables"])
        assert seen == {expect}
