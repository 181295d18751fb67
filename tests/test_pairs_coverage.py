"""The ``pairs`` strategy and the coverage figure (ptsim/coverage.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ptsim
from ptsim.cli import main
from ptsim.coverage import (
    CoverageTracker,
    Pair,
    Profile,
    _stale_windows,
    conflicting_pairs,
    excludes,
    profile_pairs,
)
from ptsim.kernel_model.footprint import Footprints
from ptsim.strategies.pairs import Plan

D1 = "scenarios/d01_semi_rcu_single_free.toml"
D2 = "scenarios/d02_nonempty_reclaim_after_break.toml"
D4 = "scenarios/d04_retract_vs_reclaim.toml"
D2_ = "scenarios/d02_nonempty_reclaim_after_break.toml"
D3 = "scenarios/d03_ptlock_free_vs_uffd_move.toml"
D6 = "scenarios/d06_collapse_vs_reclaim_vma_lock.toml"
D7 = "scenarios/d07_gup_fast_vs_collapse.toml"
D8 = "scenarios/d08_mremap_vs_retract.toml"
D12 = "scenarios/d12_collapse_pte_mapped_thp_ptl_eq_pml.toml"


def first_bug(variant, runs: int) -> int | None:
    for seed in range(runs):
        r = variant.run(seed=seed, strategy="pairs")
        if r.bug is not None and r.bug.kind in variant.expect:
            return seed
    return None


def test_pairs_finds_d1_and_d4_in_a_small_budget():
    engine = ptsim.load(D1).variant("semi-rcu")._engine()
    assert engine._factory("pairs", 3).profiling_runs == 2
    assert first_bug(ptsim.load(D1).variant("semi-rcu"), 60) is not None
    assert first_bug(ptsim.load(D4).variant("no-recheck"), 60) is not None


def test_pairs_is_deterministic():
    v = ptsim.load(D1).variant("semi-rcu")
    a = [v.run(seed=s, strategy="pairs").token for s in range(8)]
    b = [ptsim.load(D1).variant("semi-rcu").run(seed=s, strategy="pairs").token
         for s in range(8)]
    assert a == b
    assert len(set(a)) > 1


class Watching:
    """A pairs schedule, with every choice noted: (options' keys, the chosen key, the
    function the target CPU was in)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.parks = inner.parks
        self.seen = []

    def attach(self, sched) -> None:
        self.inner.attach(sched)

    def pick(self, options, current, step):
        cpu = self.inner.target.cpu
        funcs = [o.func() for o in options if o.key == cpu and not o.is_event]
        i = self.inner.pick(options, current, step)
        self.seen.append(([o.key for o in options], options[i].key, funcs[0] if funcs else None))
        return i

    def fault(self, p, current, step):
        return self.inner.fault(p, current, step)


def test_directed_schedule_preempts_just_before_its_target():
    v = ptsim.load(D7).variant("broadcast-no-sync")
    engine = v._engine()
    factory = engine._factory("pairs", 3)
    strategy = factory(0)
    target = strategy.target
    # Schedule 0 aims at the rarest class-0 window: GUP-fast (CPU1) just after it read the pmd
    # that khugepaged's collapse rewrites and its zap frees.
    assert target == factory.profile.targets[0]
    assert (target.klass, target.cpu, target.func, target.occ) == (0, 1, "___pte_offset_map", 0)
    watch = Watching(strategy)
    result = engine.run_schedule_sync(watch, 0)
    # CPU1 ran whenever it could, up to the target; the first choice that passed it over was
    # at the target: in its function, after exactly ``occ`` earlier steps there.
    chosen_there = 0
    for keys, chosen, func in watch.seen:
        if target.cpu in keys and chosen != target.cpu:
            assert func == target.func and chosen_there == target.occ
            break
        if chosen == target.cpu and func == target.func:
            chosen_there += 1
    else:
        raise AssertionError("the target CPU was never preempted")
    assert result.bug is not None and result.bug.kind == "pt-use-after-free"
    again = engine.replay(result.choices, log=False)
    assert again.bug is not None and again.bug.kind == result.bug.kind
    assert again.steps == result.steps


def test_plan_cycles_through_every_target_and_pct():
    engine = ptsim.load(D1).variant("semi-rcu")._engine()
    profile = profile_pairs(engine)
    plan = Plan(profile.targets)
    period = len(plan.pattern)
    # D1 has no class-1 window (no CPU empties a table another fills): its turns go
    assert plan.weights[1] == 0 and not plan.classes[1]
    assert period == sum(plan.weights) == sum(Plan.WEIGHTS) - Plan.WEIGHTS[1] + Plan.PCT_WEIGHT
    longest = max(len(c) for c in plan.classes)
    aimed = [plan.target(n) for n in range(period * longest)]
    assert set(t for t in aimed if t is not None) == set(profile.targets)
    assert aimed.count(None) == longest * Plan.PCT_WEIGHT  # the PCT slot, once a period
    assert aimed[0] == profile.targets[0]  # seed 0 aims at the rarest class-0 window
    # A target never comes back before every other target of its class had its turn.
    for c, targets in enumerate(plan.classes):
        turns = [t for t in aimed if t is not None and t.klass == c]
        assert turns[:len(targets)] == targets


def test_targets_are_sorted_and_name_the_stale_pmd_window():
    engine = ptsim.load(D1).variant("semi-rcu")._engine()
    targets = profile_pairs(engine).targets
    assert targets == sorted(targets, key=lambda t: (t.klass, t.rank, t.cpu, t.func, t.occ))
    # The walker (CPU1) just after it read the pmd that the zap clears: D1's race window.
    assert any((t.klass, t.cpu, t.func, t.occ) == (0, 1, "pte_offset_map_lock", 0)
               for t in targets)
    assert all(t.klass in (0, 1, 2, 3) for t in targets)


def test_pairs_bugs_replay_from_their_tokens():
    v = ptsim.load(D4).variant("no-recheck")
    found = 0
    for seed in range(12):
        r = v.run(seed=seed, strategy="pairs")
        if r.bug is not None:
            found += 1
            again = v.replay(r.token)
            assert again.bug is not None and again.bug.kind == r.bug.kind
    assert found


def test_profile_is_sorted_rare_first():
    engine = ptsim.load(D1).variant("semi-rcu")._engine()
    pairs = profile_pairs(engine).pairs
    assert pairs and [p.rarity for p in pairs] == sorted(p.rarity for p in pairs)
    for p in pairs:
        assert p.ident[0] < p.ident[2]  # cross-CPU, lower CPU first


def _fps(steps):
    """Footprints by hand: steps is [(cpu, func, {key: written})], one per step from 1."""
    fps = Footprints()
    funcs = {}
    for n, (cpu, func, fp) in enumerate(steps, 1):
        fps.steps[n] = dict(fp)
        fps.cpus[n] = cpu
        funcs[n] = func
    return fps, funcs


def test_coverage_counts_on_hand_made_footprints():
    e, t = ("e", 5, 0), ("t", 5)
    # CPU0 writes the entry (and so its table) in f, CPU1 reads the entry in g and the whole
    # table in h: two pairs; and both take the same ptlock: a third, its pfn blanked.
    one = [(0, "f", {e: True, t: True}), (1, "g", {e: False}), (1, "h", {t: False}),
           (0, "lk", {("l", "ptl@pfn0x5"): True}), (1, "lk", {("l", "ptl@pfn0x5"): True})]
    fps, funcs = _fps(one)
    found = {(p, first) for p, first, *_ in conflicting_pairs(fps, funcs)}
    assert found == {((0, "f", 1, "g", "e"), 0), ((0, "f", 1, "h", "t"), 0),
                     ((0, "lk", 1, "lk", "l:ptl@#"), 0)}
    profile = Profile([Pair(p, 1) for p, _ in sorted(found)], 2)
    tracker = CoverageTracker(profile)
    tracker.add(fps, funcs)
    assert tracker.figure() == {"pairs": 3, "both_orders": 0, "one_order": 3}
    # The other order of the entry pair: CPU1 reads before CPU0 writes.
    fps, funcs = _fps([(1, "g", {e: False}), (0, "f", {e: True, t: True})])
    tracker.add(fps, funcs)
    assert tracker.figure() == {"pairs": 3, "both_orders": 1, "one_order": 2}
    # Two reads never conflict; an unknown pair is not counted.
    fps, funcs = _fps([(1, "g", {e: False}), (0, "x", {e: False}), (0, "y", {e: True})])
    tracker.add(fps, funcs)
    assert tracker.figure() == {"pairs": 3, "both_orders": 1, "one_order": 2}


def test_coverage_rises_with_more_runs():
    v = ptsim.load(D1).variant("full-rcu")
    few = v.stress(runs=1, coverage=True).coverage
    many = v.stress(runs=200, coverage=True).coverage
    # the ptlock, entry and table pairs, and CPU0's flush IPI against CPU1 going idle (the
    # handler then runs at once, in the sender's step)
    assert few["pairs"] == many["pairs"] == 8
    assert many["both_orders"] > few["both_orders"]
    assert v.stress(runs=5).coverage is None
    assert "coverage" in v.stress(runs=5, coverage=True).as_json()


def test_explore_json_has_coverage(capsys):
    code = main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    cov = doc["coverage"]
    assert cov["pairs"] == 8 and 0 < cov["both_orders"] <= 8
    assert ptsim.load(D1).variant("full-rcu").explore(preemptions=1).coverage == cov


def test_stress_text_coverage_line(capsys):
    main(["stress", D1, "--variant", "full-rcu", "--runs", "20", "--coverage"])
    assert "conflicting cross-CPU pairs seen in both orders" in capsys.readouterr().out


def test_explore_coverage_reads_only_each_runs_own_steps_without_changing_the_figure(
        monkeypatch):
    """A run under explore re-plays its parent's steps up to its branch point: it takes their
    footprints and accesses from the parent (Accesses) instead of recording them and walking
    the stack again, and counts only the orders whose later access comes after its branch
    point (unless the parent was never counted: it ended asleep). The figure must be the one
    that recording, walking and reading every step of every schedule gives."""
    from ptsim import coverage
    from ptsim.strategies.guided import GuidedStrategy

    v = ptsim.load(D8).variant("recheck")
    walked, bases = [], []
    real_record = coverage.CoverageTracker.record

    def counting_record(self, fps, funcs, base=None, upto=0):
        walked.append(len(funcs))
        bases.append(None if base is None else base.added)
        return real_record(self, fps, funcs, base, upto)

    monkeypatch.setattr(coverage.CoverageTracker, "record", counting_record)
    inherited = v.explore(preemptions=2, faults=1, coverage=True)
    inherited_walks = sum(walked)
    assert bases.count(True) * 2 > len(bases)  # most runs had a counted parent
    assert False in bases  # and some a parent that ended asleep, never counted
    walked.clear()
    monkeypatch.setattr(GuidedStrategy, "_inherit", lambda self: None)
    monkeypatch.setattr(coverage._CoveredEngine, "_base", staticmethod(lambda strategy: (None, 0)))
    every = v.explore(preemptions=2, faults=1, coverage=True)
    assert inherited.runs == every.runs > 100
    assert inherited.coverage == every.coverage
    assert inherited_walks * 3 < sum(walked) * 2  # many steps were the parent's


def test_a_branch_of_an_uncounted_run_counts_its_parents_orders_too():
    """A run that ended asleep is never counted, but its branches re-play its steps: the
    first of them to be counted counts the orders of those steps too, and a branch of a
    counted run does not count its parent's again."""
    e = ("e", 5, 0)
    profile = Profile([Pair((0, "f", 1, "g", "e"), 1)], 2)
    parent_steps = [(0, "f", {e: True}), (1, "g", {e: False}), (1, "x", {("e", 6, 0): True})]
    for counted in (False, True):
        tracker = CoverageTracker(profile)
        fps, funcs = _fps(parent_steps)
        parent = tracker.record(fps, funcs)
        if counted:
            tracker.check(parent)
            assert tracker.figure()["one_order"] == 1
            tracker.orders.clear()  # forget it: a counted parent's orders are not read again
            tracker._open()
        # the branch shares steps 1 and 2, then runs its own step 3 (no access of the pair)
        fps, funcs = _fps(parent_steps[:2] + [(0, "y", {("e", 7, 0): True})])
        child = tracker.record(fps, {3: funcs[3]}, parent, 2)
        tracker.check(child)
        assert tracker.figure()["one_order"] == (0 if counted else 1)


def test_lock_sets_exclude_unless_both_read():
    pmd, mmap = ("ptl(PMD 0x4)", "w"), ("mm0.mmap_lock", "r")
    assert excludes(frozenset({pmd}), frozenset({pmd, mmap}))
    assert not excludes(frozenset({mmap}), frozenset({mmap}))  # two readers
    assert excludes(frozenset({mmap}), frozenset({("mm0.mmap_lock", "w")}))
    assert excludes(frozenset({("mm0.mmap_lock", "w")}), frozenset({mmap}))
    assert not excludes(frozenset({pmd}), frozenset({("ptl(PTE 0x5)", "w")}))
    assert not excludes(frozenset(), frozenset({pmd}))


class _Solo:
    """A profiling schedule by hand: CPU ``first``'s steps 1.. as [(footprint, locks held as
    the step began)]; table 3 is a pud table, 4 a pmd table, 5 a PTE table."""

    def __init__(self, first, steps):
        class Mem:
            level = {3: 3, 4: 2, 5: 1}

        class M:
            mem = Mem()

        self.first = first
        self.m = M()
        self.fps = SimpleNamespace(steps={}, cpus={}, locks={})
        self.mine = []
        for n, (fp, locks) in enumerate(steps, 1):
            self.fps.steps[n] = dict(fp)
            self.fps.cpus[n] = first
            self.fps.locks[n] = frozenset(locks)
            self.mine.append((first, "f", n - 1, n))

    def windows(self, i, upper_writes):
        return _stale_windows(self, self.mine, i, upper_writes, frozenset({5}))


PMD_E = ("e", 4, 0)
PMD_L, PTE_L = ("ptl(PMD 0x4)", "w"), ("ptl(PTE 0x5)", "w")
# CPU0 clears the pmd under the pmd and pte locks and so unlinks table 5
RECLAIM = {PMD_E: {(0, frozenset({PMD_L, PTE_L}), frozenset({5}), frozenset())}}


def test_stale_window_after_a_read_the_walker_uses_unchecked():
    # CPU1 reads the pmd, locks the PTE table's split ptlock (a use of the table), rechecks
    # under it: the window after the first read is open (tier 0: the writer unlinks table 5),
    # the one after the recheck is closed by the pte lock the writer needs too.
    walker = _Solo(1, [({PMD_E: False}, ()), ({("l", "ptl(PTE 0x5)"): True}, ()),
                       ({PMD_E: False, ("t", 5): False}, (PTE_L,)),
                       ({("e", 5, 0): False}, (PTE_L,))])
    assert walker.windows(0, RECLAIM) == {0: 0}
    assert walker.windows(2, RECLAIM) == {}
    # a writer that only links a table in after CPU1's own write does not race with its read
    answer = {PMD_E: {(0, frozenset(), frozenset({7}), frozenset({1}))}}
    assert walker.windows(0, answer) == {}
    # a write that unlinks no table CPU1 touched: tier 1
    other = {PMD_E: {(0, frozenset(), frozenset({7}), frozenset())}}
    assert walker.windows(0, other) == {0: 1}


def test_stale_window_skips_a_read_the_cpu_repeats_before_using_it():
    # reads the pmd twice before touching the table: only the second read's window counts
    walk = _Solo(1, [({PMD_E: False}, ()), ({("e", 3, 0): False}, ()), ({PMD_E: False}, ()),
                     ({("e", 5, 0): False}, ())])
    assert walk.windows(0, RECLAIM) == {}
    assert walk.windows(2, RECLAIM) == {2: 0}


def test_check_then_act_windows_open_where_the_lock_is_dropped():
    # CPU1 checks the pmd under the pmd lock, drops it, takes it again and clears the pmd
    # without reading it again: the window opens just after the unlock (index 1), tier 0.
    writer = {PMD_E: {(0, frozenset({PMD_L}), frozenset({5}), frozenset())}}
    act = _Solo(1, [({PMD_E: False, ("t", 5): False}, (PMD_L,)),
                    ({("l", "ptl(PMD 0x4)"): True}, (PMD_L,)),
                    ({("l", "ptl(PMD 0x4)"): True}, ()), ({PMD_E: True}, (PMD_L,))])
    assert act.windows(0, writer) == {1: 0}
    # the same with a read of the pmd under the retaken lock (a recheck, or the read of what
    # to clear): the earlier check's window comes after those nothing reads again (tier 2)
    recheck = _Solo(1, [({PMD_E: False, ("t", 5): False}, ()), ({("l", "ptl(PMD 0x4)"): True}, ()),
                        ({PMD_E: False}, (PMD_L,)), ({PMD_E: True}, (PMD_L,))])
    assert recheck.windows(0, writer) == {0: 2}
    assert recheck.windows(2, writer) == {}  # held under the writers' lock up to the write
    # an earlier read the CPU checks again with the lock dropped opens nothing
    twice = _Solo(1, [({PMD_E: False}, ()), ({("t", 5): False}, ()), ({PMD_E: False}, ()),
                      ({PMD_E: True}, ())])
    assert twice.windows(0, writer) == {}
    assert twice.windows(2, writer) == {2: 0}


def _first_schedule(path, variant):
    v = ptsim.load(path).variant(variant)
    engine = v._engine()
    factory = engine._factory("pairs", 3)
    strategy = factory(0)
    result = engine.run_schedule_sync(strategy, 0)
    return factory.profile.targets, strategy.target, result


def test_first_window_is_the_race_on_d3_d6_and_d12():
    # Schedule 0 aims at the first class-0 window; on these races it is the one that fails.
    for path, variant, kind, where in [
            (D3, "ptlock-immediate", "pt-use-after-free", (1, "move_pages_pte", 1)),
            (D6, "check-before-vma-lock", "bad-pmd", (0, "collapse_huge_page", 5)),
            (D12, "no-split-ptlocks", "invalid-free", (0, "try_collapse_pte_mapped_thp", 6)),
            (D12, "madvise-collapse-no-split-ptlocks", "invalid-free",
             (0, "try_collapse_pte_mapped_thp", 6))]:
        targets, target, result = _first_schedule(path, variant)
        assert (target.klass, target.cpu, target.func, target.occ) == (0, *where), variant
        assert result.bug is not None and result.bug.kind == kind, variant


def test_reads_rechecked_or_under_the_writers_lock_are_not_class_0():
    targets = profile_pairs(ptsim.load(D3).variant("ptlock-immediate")._engine()).targets
    zero = {(t.cpu, t.func, t.occ) for t in targets if t.klass == 0}
    # UFFDIO_MOVE's pmd recheck under both pte locks (is_pte_pages_stable), and its earlier
    # pmd reads that it repeats before use
    assert (1, "ptep_clear_flush", 0) not in zero
    assert (1, "___pte_offset_map", 2) not in zero
    targets = profile_pairs(ptsim.load(D6).variant("check-before-vma-lock")._engine()).targets
    zero = {(t.cpu, t.func, t.occ) for t in targets if t.klass == 0}
    # khugepaged's scan and first revalidation: it checks the pmd again before the collapse
    assert zero == {(0, "collapse_huge_page", 5)}


def test_emptied_table_windows_are_class_1():
    targets = profile_pairs(ptsim.load(D2_).variant("before-fix")._engine()).targets
    one = [(t.cpu, t.func) for t in targets if t.klass == 1]
    # the zap's windows between clearing the PTEs and reclaiming their table
    assert one and all(w == (0, "do_zap_pte_range") for w in one)

