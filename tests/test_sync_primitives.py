"""The synchronisation the race catalogue rests on: IPIs, grace periods, spinlocks."""

from __future__ import annotations

import pytest

from ptsim.agents.gup import local_irq_restore, local_irq_save
from ptsim.kernel_model.ipi import smp_call_function_many
from ptsim.kernel_model.locks import SpinLock, spin_lock, spin_unlock
from ptsim.kernel_model.rcu import call_rcu, rcu_read_lock, rcu_read_unlock

from conftest import bare_machine, run_threads

SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
async def test_ipi_waits_for_a_cpu_with_irqs_off(seed):
    m = bare_machine()
    order = []

    def handler(target):
        order.append(("handled", target.id, target.irqs_on))

    async def irq_off_walker(cpu):
        flags = await local_irq_save(cpu)
        for _ in range(5):
            await m.point(cpu)
        order.append(("irqs back on", cpu.id))
        await local_irq_restore(cpu, flags)
        for _ in range(3):
            await m.point(cpu)

    async def sender(cpu):
        await m.point(cpu)
        await smp_call_function_many(cpu, [m.cpus[1]], handler, (), "test_ipi")
        order.append(("sender done", cpu.id))

    sched = await run_threads(m, {0: sender, 1: irq_off_walker}, seed)
    assert sched.bug is None
    handled = order.index(("handled", 1, True))
    assert order.index(("sender done", 0)) > handled
    # The handler never runs inside CPU1's IRQ-off window.
    assert all(entry[2] for entry in order if entry[0] == "handled")


@pytest.mark.parametrize("reader", ["rcu_read_lock", "local_irq_save", "spin_lock"])
async def test_grace_period_waits_for_every_reader_kind(reader):
    """A callback queued while a reader (rcu_read_lock, IRQs off, or a held spinlock, i.e.
    preemption off) is inside its critical section runs only after the reader has left it."""
    exercised = 0
    for seed in range(40):
        m = bare_machine()
        lock = SpinLock("test lock")
        state = {"reader": "before", "at_call": None, "at_cb": None}

        def callback(m_, queued_by):
            state["at_cb"] = state["reader"]

        async def reader_cpu(cpu):
            if reader == "rcu_read_lock":
                await rcu_read_lock(cpu)
            elif reader == "local_irq_save":
                flags = await local_irq_save(cpu)
            else:
                await spin_lock(cpu, lock)
            state["reader"] = "inside"
            for _ in range(6):
                await m.point(cpu)
            if reader == "rcu_read_lock":
                await rcu_read_unlock(cpu)
            elif reader == "local_irq_save":
                await local_irq_restore(cpu, flags)
            else:
                await spin_unlock(cpu, lock)
            state["reader"] = "after"
            for _ in range(8):
                await m.point(cpu)

        async def updater(cpu):
            for _ in range(3):
                await m.point(cpu)
            call_rcu(cpu, callback, name="test_cb")
            state["at_call"] = state["reader"]
            for _ in range(12):
                await m.point(cpu)

        sched = await run_threads(m, {0: updater, 1: reader_cpu}, seed)
        assert sched.bug is None
        if state["at_call"] == "inside":
            assert state["at_cb"] in (None, "after"), f"seed {seed}: callback ran inside the reader"
            exercised += state["at_cb"] == "after"
    assert exercised > 0, "no schedule queued the callback inside the reader and then ran it"


async def test_grace_periods_end_during_the_concurrent_phase():
    """Not only in the end-of-run drain: some schedule runs a callback while both CPUs work."""
    ran_early = 0
    for seed in range(30):
        m = bare_machine()
        state = {"cb": False, "early": False}

        def callback(m_, queued_by):
            state["cb"] = True

        async def updater(cpu):
            await m.point(cpu)
            call_rcu(cpu, callback, name="test_cb")
            for _ in range(10):
                await m.point(cpu)
            state["early"] = state["cb"]

        async def other(cpu):
            for _ in range(10):
                await m.point(cpu)

        await run_threads(m, {0: updater, 1: other}, seed)
        ran_early += state["early"]
    assert ran_early > 0


@pytest.mark.parametrize("seed", range(30))
async def test_spinlock_excludes_and_spinners_take_ipis(seed):
    m = bare_machine()
    lock = SpinLock("L")
    inside = []

    async def worker(cpu):
        for _ in range(3):
            await spin_lock(cpu, lock)
            inside.append(cpu.id)
            assert lock.owner == cpu.id
            await m.point(cpu)
            assert lock.owner == cpu.id
            inside.remove(cpu.id)
            await spin_unlock(cpu, lock)

    sched = await run_threads(m, {0: worker, 1: worker}, seed)
    assert sched.bug is None and inside == []


async def test_ipi_to_an_irq_off_spinner_is_a_deadlock():
    """CPU1 spins with IRQs off on a lock that CPU0 holds while CPU0 waits for CPU1 to take
    its IPI: the cycle passes through an IRQ-off CPU, so it is a deadlock (kernel-notes F11)."""
    found = []
    for seed in range(40):
        m = bare_machine()
        lock = SpinLock("pml")

        async def holder(cpu):
            await spin_lock(cpu, lock)
            await smp_call_function_many(cpu, [m.cpus[1]], lambda t: None, (), "flush_tlb_func")
            await spin_unlock(cpu, lock)

        async def irq_off_spinner(cpu):
            flags = await local_irq_save(cpu)
            await spin_lock(cpu, lock)
            await spin_unlock(cpu, lock)
            await local_irq_restore(cpu, flags)

        sched = await run_threads(m, {0: holder, 1: irq_off_spinner}, seed)
        if sched.bug is not None:
            found.append(sched.bug)
    assert found, "some schedule must deadlock"
    assert {f.kind for f in found} == {"deadlock"}
    chain = " ".join(found[0].detail)
    assert "IRQs off" in chain and "spins on pml held by CPU0" in chain


async def test_max_steps_is_a_livelock():
    m = bare_machine(max_steps=50)

    async def spinner(cpu):
        while True:
            await m.point(cpu)

    sched = await run_threads(m, {0: spinner}, 0)
    assert sched.bug is not None and sched.bug.kind == "livelock"
