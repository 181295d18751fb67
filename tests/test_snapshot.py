"""Every schedule starts from the pickled post-setup machine; restoring it must keep each model
object's compact attribute layout (kernel_model/snapshot.py), else CPython's specialised
attribute loads stop applying and the whole run slows by a third. The layout is observed the
way the garbage collector sees it: a compact instance lists its attribute values among its
referents, a materialised one lists only its __dict__."""

from __future__ import annotations

import gc
import platform

import pytest

from ptsim.engine import Engine
from ptsim.kernel_model.snapshot import Snapshotted
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

