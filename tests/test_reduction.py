"""Partial-order reduction loses no outcome: with and without it, explore reaches the same final
states (the machine after every agent finished, and the bug a schedule ended on).

Run on every catalogue variant and the exploration yardstick, at one preemption and one
injected fault (D9, three CPUs and their IPIs: none), where both searches finish within the
cap; and at two preemptions on two variants whose IPIs and grace periods exercise every kind
of option cost (guided.cost())."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptsim.engine import Engine
from ptsim.explore import explore
from ptsim.kernel_model.footprint import Footprints, conflict
from ptsim.scenario import load_scenario
from ptsim.statehash import terminal_hash

from conftest import ROOT, SCENARIOS

YARDSTICK = ROOT / "benchmarks" / "scenarios" / "user_gup_2m.toml"
CAP = 1500


def _targets():
    out = []
    for path in sorted(SCENARIOS.glob("d*.toml")) + [YARDSTICK]:
        for v in load_scenario(path).variants:
            # D9's three CPUs and their IPIs: K = 1 is too large for the cap, K = 0 is not
            bound = 0 if path.name.startswith("d09") else 1
            out.append(pytest.param(path, v.name, bound, id=f"{Path(path).stem}:{v.name}"))
    for name, variant in (("d01_semi_rcu_single_free", "semi-rcu"),
                          ("d07_gup_fast_vs_collapse", "ipi-no-sync")):
        out.append(pytest.param(SCENARIOS / f"{name}.toml", variant, 2, id=f"{name}:{variant}:K2"))
    return out


def _finals(path, variant, reduce, bound=1):
    eng = Engine(load_scenario(path).resolve(variant))
    finals = set()
    found = explore(eng, bound, CAP, None, None, 1, reduce,
                    lambda m, r: finals.add(terminal_hash(m, r.bug and r.bug.kind)))
    return found, finals


@pytest.mark.parametrize("path,variant,bound", _targets())
def test_reduction_reaches_the_same_final_states(path, variant, bound):
    plain, plain_finals = _finals(path, variant, False, bound)
    reduced, reduced_finals = _finals(path, variant, True, bound)
    assert plain.complete and reduced.complete
    assert reduced_finals == plain_finals
    assert reduced.schedules <= plain.schedules


def test_reduction_pays_on_the_yardstick():
    plain, _ = _finals(YARDSTICK, "rcu-broadcast", False)
    reduced, _ = _finals(YARDSTICK, "rcu-broadcast", True)
    assert reduced.reduced > 0 and reduced.schedules * 3 < plain.schedules


def test_footprints_conflict_only_on_a_write():
    entry_read = {("e", 5, 3): False}
    entry_write = {("e", 5, 3): True, ("t", 5): True}
    other_write = {("e", 5, 4): True, ("t", 5): True}
    scan = {("t", 5): False}
    assert not conflict(entry_read, {("e", 5, 3): False})
    assert conflict(entry_read, entry_write) and conflict(scan, other_write)
    assert not conflict(entry_read, other_write)
    assert conflict(None, {}) and conflict({}, None)  # an opaque step conflicts with all


def test_a_step_is_opaque_unless_its_primitive_began_it():
    fps = Footprints()
    fps.touch(3, ("e", 1, 1), True)  # no begin: not recorded
    assert fps.of(3) is None
    fps.begin(4, 0)
    fps.touch(4, ("e", 1, 1), False)
    fps.touch(4, ("e", 1, 1), True)
    assert fps.of(4) == {("e", 1, 1): True} and fps.sleepable(4)
    fps.pin(4)
    assert not fps.sleepable(4)
    fps.begin(5, 1)
    fps.opaque(5)
    assert fps.of(5) is None and not fps.sleepable(5)
