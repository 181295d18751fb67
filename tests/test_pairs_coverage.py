"""The ``pairs`` strategy and the coverage figure (ptsim/coverage.py)."""

from __future__ import annotations

import json

import ptsim
from ptsim.cli import main
from ptsim.coverage import CoverageTracker, Pair, Profile, conflicting_pairs, profile_pairs
from ptsim.kernel_model.footprint import Footprints

D1 = "scenarios/d01_semi_rcu_single_free.toml"
D4 = "scenarios/d04_retract_vs_reclaim.toml"


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
    assert few["pairs"] == many["pairs"] == 7
    assert many["both_orders"] > few["both_orders"]
    assert v.stress(runs=5).coverage is None
    assert "coverage" in v.stress(runs=5, coverage=True).as_json()


def test_explore_json_has_coverage(capsys):
    code = main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    cov = doc["coverage"]
    assert cov["pairs"] == 7 and 0 < cov["both_orders"] <= 7
    assert ptsim.load(D1).variant("full-rcu").explore(preemptions=1).coverage == cov


def test_stress_text_coverage_line(capsys):
    main(["stress", D1, "--variant", "full-rcu", "--runs", "20", "--coverage"])
    assert "conflicting cross-CPU pairs seen in both orders" in capsys.readouterr().out
