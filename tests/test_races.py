"""The shipped races, at the engine level: they reproduce, their fixes hold, and a clean
verdict comes from schedules that really exercised the free."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ptsim.engine import Engine
from ptsim.scenario import load_scenario

from conftest import D1, D10


def engine(path: str, variant: str | None = None, overrides=()) -> Engine:
    return Engine(load_scenario(path).resolve(variant, list(overrides)))


def test_semi_rcu_single_path_frees_the_table_at_once():
    """The fallback IPIs, then frees immediately: no grace period stands between."""
    e = engine(D1, "semi-rcu")
    result = e.run_seed(0, log=True)
    events = result.log
    frees = [ev for ev in events if ev["event"] == "free_table"]
    assert frees, "the reclaimed PTE table must be freed"
    free = frees[0]
    assert free["func"] == "tlb_remove_table_one" and free["cpu"] == 0
    sync = [ev for ev in events if ev["event"] == "smp_call_function"
            and ev["ipi"] == "tlb_remove_table_smp_sync"]
    assert sync and sync[0]["step"] < free["step"]
    assert not [ev for ev in events if ev["event"] == "gp_end" and ev["step"] < free["step"]]


def test_full_rcu_frees_after_a_grace_period():
    e = engine(D1, "full-rcu")
    events = e.run_seed(0, log=True).log
    frees = [ev for ev in events if ev["event"] == "free_table"]
    ends = [ev for ev in events if ev["event"] == "gp_end"]
    assert frees and ends and ends[0]["step"] <= frees[0]["step"]
    assert frees[0]["cpu"] is None  # run by the RCU callback, not by the zapping CPU


def test_d1_buggy_variant_finds_the_use_after_free():
    e = engine(D1, "semi-rcu")
    bugs = [r for r in e.run_seeds(range(300), "pct") if r.bug]
    assert bugs and {r.bug.kind for r in bugs} == {"pt-use-after-free"}
    assert all(r.bug.cpu == 1 for r in bugs)  # the walker makes the bad access


def test_d1_fixed_variant_frees_the_table_while_the_walker_still_runs():
    """Clean means safe, not untested: in some schedules the table is freed (a grace period
    ended, callbacks ran) before the walker CPU finished."""
    e = engine(D1, "full-rcu")
    overlapping = 0
    for seed in range(150):
        result = e.run_seed(seed, log=True)
        assert result.bug is None
        events = result.log
        free_steps = [ev["step"] for ev in events if ev["event"] == "free_table"]
        walker_last = max(ev["step"] for ev in events if ev["cpu"] == 1)
        if free_steps and free_steps[0] < walker_last:
            overlapping += 1
    assert overlapping > 0


def test_d10_broadcast_flush_lets_gup_fast_read_a_freed_table():
    e = engine(D10, "page-broadcast")
    bugs = [r.bug for r in e.run_seeds(range(300), "pct") if r.bug]
    assert bugs and {b.kind for b in bugs} == {"pt-use-after-free"}
    assert all(b.cpu == 1 and "gup_fast" in b.backtrace for b in bugs)


def test_d10_ipi_flush_holds_off_the_free():
    for variant in ("page-ipi", "rcu-broadcast"):
        e = engine(D10, variant)
        for strategy in ("random", "pct"):
            assert not [r for r in e.run_seeds(range(200), strategy) if r.bug], (variant, strategy)


def test_every_schedule_starts_from_the_same_state():
    """Nothing carries over: a run gives the same choices alone and after other runs."""
    e = engine(D1, "semi-rcu")
    batch = e.run_seeds(range(20))
    for seed in (3, 11, 19):
        alone = engine(D1, "semi-rcu").run_seed(seed)
        assert alone.choices == batch[seed].choices
        assert alone.steps == batch[seed].steps


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), strategy=st.sampled_from(["random", "pct"]))
def test_replaying_the_choices_reproduces_the_run(seed, strategy):
    e = engine(D1, "semi-rcu")
    first = e.run_seed(seed, strategy, log=True)
    again = e.replay(first.choices)
    assert again.log == first.log
    assert (again.bug is None) == (first.bug is None)
    if first.bug:
        assert again.bug.summary == first.bug.summary


def test_stats_count_page_tables_as_vmpte():
    e = engine(D1, "full-rcu")
    machine = e.fresh()
    stats = machine.stats()["mm0"]
    # After setup: one PUD, one PMD and one PTE table hold the four touched pages.
    assert (stats["nr_puds"], stats["nr_pmds"], stats["nr_ptes"]) == (1, 1, 1)
    assert stats["vm_pte_kb"] == 12 and stats["rss_kb"] == 16
    after = e.run_seed(0).stats["mm0"]
    assert after["nr_ptes"] == 0 and after["vm_pte_kb"] == 8 and after["rss_kb"] == 0
