"""Every schedule starts from a copy of the post-setup machine; restoring it must keep each model
object's compact attribute layout (kernel_model/snapshot.py), else CPython's specialised
attribute loads stop applying and the whole run slows by a third. The layout is observed the
way the garbage collector sees it: a compact instance lists its attribute values among its
referents, a materialised one lists only its __dict__. The copy is made by the copier that
snapshot.py compiles, and must be what pickle.loads of the snapshot would give."""

from __future__ import annotations

import gc
import pickle
import platform
from collections import deque

import pytest

from ptsim.engine import Engine
from ptsim.kernel_model.locks import SpinLock
from ptsim.kernel_model.snapshot import Snapshotted, compile_copier
from ptsim.scenario import load_scenario

from conftest import SCENARIOS

pytestmark = pytest.mark.skipif(platform.python_implementation() != "CPython",
                                reason="inline attribute values are a CPython layout")


def _model_objects(m):
    """Every instance of a class from the model reachable from the machine (one level of
    containers at a time, as gc sees them)."""
    seen: dict[int, object] = {}
    todo = [m]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        for ref in gc.get_referents(obj):
            if (isinstance(ref, (list, dict, tuple, set))
                    or type(ref).__module__.startswith("ptsim.")):
                todo.append(ref)
    return [o for o in seen.values() if type(o).__module__.startswith("ptsim.kernel_model")
            and type(o).__dictoffset__ != 0]


@pytest.mark.parametrize("scenario", ["d04_retract_vs_reclaim", "d11_lazy_tlb_speculative_walk"])
def test_restored_machine_keeps_compact_attribute_layout(scenario):
    scn = load_scenario(SCENARIOS / f"{scenario}.toml").resolve(None)
    m = Engine(scn).fresh()
    objects = _model_objects(m)
    kinds = {type(o).__name__ for o in objects}
    assert {"Machine", "Cpu", "Memory", "Mm", "Rcu"} <= kinds
    if scenario.startswith("d04"):
        assert "AddressSpace" in kinds  # setup faulted the file in
    for obj in objects:
        assert isinstance(obj, Snapshotted), f"{type(obj).__name__} is pickled without Snapshotted"
        referents = gc.get_referents(obj)  # before anything reads obj.__dict__
        values = list(vars(obj).values())
        missing = [v for v in values if not any(r is v for r in referents)]
        assert not missing, f"{type(obj).__name__} was restored into a materialised __dict__"



# -- the copier: what pickle.loads would give, cheaper ------------------------------------------

def _catalogue_variants():
    cases = []
    for path in sorted(SCENARIOS.glob("d*.toml")):
        sf = load_scenario(path)
        for name in sf.variant_names() if sf.variants else [None]:
            cases.append(pytest.param(path, name, id=f"{path.stem}-{name}"))
    return cases


@pytest.mark.parametrize("path,variant", _catalogue_variants())
def test_every_catalogue_machine_is_copied_as_pickle_would_restore_it(path, variant):
    workload = Engine(load_scenario(path).resolve(variant)).workload
    assert workload._copy is not None, "the copier declined a catalogue machine"
    as_loaded = pickle.dumps(pickle.loads(workload.snapshot), protocol=5)
    first, second = workload.fresh(), workload.fresh()
    assert pickle.dumps(first, protocol=5) == as_loaded == pickle.dumps(second, protocol=5)


def test_copies_share_nothing_mutable_and_keep_their_own_cycles():
    workload = Engine(load_scenario(SCENARIOS / "d01_semi_rcu_single_free.toml")
                      .resolve("semi-rcu")).workload
    a, b = workload.fresh(), workload.fresh()
    assert a is not b and a.mem is not b.mem and a.cpus[0] is not b.cpus[0]
    assert all(cpu.m is a for cpu in a.cpus) and a.gp_end.m is a
    assert [e.cpu for e in a.ipi_events] == a.cpus
    table = next(iter(a.mem.entries))
    a.mem.entries[table][3] = 0x1234
    a.mem.kind.append(2)
    a.cpus[1].tlb("mm0").pte[0x99] = 1
    a.mms["mm0"].cpumask.add(7)
    a.rcu.qs.add(5)
    a.step = 99
    for m in (b, workload.fresh()):
        assert m.mem.entries[table][3] != 0x1234 and len(m.mem.kind) == len(a.mem.kind) - 1
        assert 0x99 not in m.cpus[1].tlb("mm0").pte and 7 not in m.mms["mm0"].cpumask
        assert 5 not in m.rcu.qs and m.step == 0


class _Plain:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


class _OwnReduce:
    def __reduce__(self):
        return (_OwnReduce, ())


class _Dict(dict):
    pass


@pytest.mark.parametrize("value", [
    {_Plain()},  # a set of objects: its order would follow the copies' ids
    {_Plain(): 1},  # a dict keyed by objects
    _Dict(a=1),  # a container subclass
    _OwnReduce(),  # its own pickling
], ids=["set of objects", "dict keyed by objects", "dict subclass", "own __reduce__"])
def test_the_copier_declines_what_it_does_not_copy(value):
    assert compile_copier(_Plain(x=[1, 2], y=value)) is None


def test_the_copier_declines_a_cycle_through_containers_alone():
    loop: list = []
    loop.append(loop)
    assert compile_copier(_Plain(loop=loop)) is None


def test_the_copier_keeps_sharing_order_and_slots():
    shared = [1, 2, 3]
    table = {i: [i] * 4 for i in range(20)}  # a dict of plain lists: one comprehension
    root = _Plain(a=shared, b=(shared, "x"), c=table, lock=SpinLock("l", 5), q=deque([1], 4))
    root.me = root
    copy = compile_copier(root)()
    assert copy is not root and copy.me is copy and copy.b[0] is copy.a and copy.a is not shared
    assert copy.a == shared and copy.c == table and copy.c[3] is not table[3]
    assert list(vars(copy)) == list(vars(root))
    assert (copy.lock.name, copy.lock.pfn, copy.lock.dep) == ("l", 5, ("l", "l"))
    assert copy.q == root.q and copy.q.maxlen == 4 and copy.q is not root.q


def test_engine_falls_back_to_pickle_when_the_copier_declines(monkeypatch):
    import ptsim.build

    scn = load_scenario(SCENARIOS / "d01_semi_rcu_single_free.toml").resolve("semi-rcu")
    expected = [(r.steps, r.choices, r.bug and r.bug.kind) for r in
                Engine(scn).run_seeds(range(20), "pct")]
    monkeypatch.setattr(ptsim.build, "compile_copier", lambda template: None)
    engine = Engine(scn)
    assert engine.workload._copy is None
    assert [(r.steps, r.choices, r.bug and r.bug.kind) for r in
            engine.run_seeds(range(20), "pct")] == expected
