"""explore's state cache: what a state is made of, and what it leaves out."""

from __future__ import annotations

import types

import pytest

from ptsim.engine import Engine
from ptsim.scenario import load_scenario
from ptsim.statehash import Unreadable, _Canon, machine_state, task_state

from conftest import D1


@pytest.fixture
def machine():
    return Engine(load_scenario(D1).resolve("semi-rcu")).fresh()


def state(m):
    return machine_state(m, _Canon(), _Canon(refs=True))


def test_every_piece_of_kernel_state_counts(machine):
    m = machine
    before = state(m)
    table = next(iter(m.mem.entries))
    m.mem.entries[table][7] ^= 1
    assert state(m) != before
    m.mem.entries[table][7] ^= 1
    assert state(m) == before
    m.cpus[1].tlb("mm0").pte[0x123] = 0x5007
    assert state(m) != before
    del m.cpus[1].tlbs["mm0"].pte[0x123]
    m.cpus[0].rcu_depth += 1
    assert state(m) != before
    m.cpus[0].rcu_depth -= 1
    m.step += 1  # max_steps counts steps: the same machine later is another state
    assert state(m) != before


def test_report_only_fields_do_not(machine):
    m = machine
    before = state(m)
    m.mem.alloc_by[2] = (1, "somewhere_else", 99)
    m.history[("pt", 5)] = [{"cpu": 1, "func": "x", "step": 3, "what": "y"}]
    m.hazards.append("a hazard noted earlier")
    assert state(m) == before


def _parked(coro_fn, *args):
    @types.coroutine
    def park():
        yield

    async def main():
        await coro_fn(park, *args)

    coro = main()
    coro.send(None)
    return types.SimpleNamespace(coro=coro)


async def _loop(park, n):
    for i in range(n):
        await park()


async def _loop_over_list(park, items):
    for item in items:
        await park()


def test_where_a_cpu_is_in_its_code_counts_value_stack_included():
    """The loop variable alone would not tell the second visit of a repeated item from the first:
    the iterator on the value stack does."""
    first = _parked(_loop_over_list, ["a", "a"])
    second = _parked(_loop_over_list, ["a", "a"])
    second.coro.send(None)
    assert task_state(first, _Canon(refs=True)) != task_state(second, _Canon(refs=True))
    again = _parked(_loop_over_list, ["a", "a"])
    assert task_state(first, _Canon(refs=True)) == task_state(again, _Canon(refs=True))


def test_a_value_it_cannot_read_makes_the_state_unreadable():
    class Opaque:
        __slots__ = ()

    with pytest.raises(Unreadable):
        _Canon()(Opaque())
