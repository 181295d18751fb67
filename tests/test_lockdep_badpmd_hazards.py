"""lockdep's inversion report, the bad-pmd check at the pmd write, and the TLB hazards."""

from __future__ import annotations

import collections

import pytest

from ptsim.engine import Engine
from ptsim.kernel_model.locks import (
    RwSem,
    SpinLock,
    down_read,
    spin_lock,
    spin_trylock,
    spin_unlock,
    up_read,
)
from ptsim.kernel_model.pagetable import index, mk_table_entry
from ptsim.kernel_model.pgtable import write_entry
from ptsim.scenario import load_scenario

from conftest import SCENARIOS, bare_machine, run_threads
from test_sanitizers import ADDR, machine_with_page


def locks():
    return SpinLock("ptl(PMD 0x4)", lock_class="pml"), SpinLock("ptl(PTE 0x5)", lock_class="ptl")


async def test_pml_then_ptl_against_ptl_then_pml_is_a_lock_order_bug():
    found = collections.Counter()
    for seed in range(20):
        m = bare_machine()
        pml, ptl = locks()

        async def legal(cpu):
            await spin_lock(cpu, pml)
            await spin_lock(cpu, ptl)
            await spin_unlock(cpu, ptl)
            await spin_unlock(cpu, pml)

        async def inverted(cpu):
            await spin_lock(cpu, ptl)
            await spin_lock(cpu, pml)
            await spin_unlock(cpu, pml)
            await spin_unlock(cpu, ptl)

        sched = await run_threads(m, {0: legal, 1: inverted}, seed)
        found[sched.bug.kind if sched.bug else None] += 1
    # Every schedule either deadlocks for real or completes one order first: lockdep reports
    # the inversion either way, as the kernel's lockdep does without needing the deadlock.
    assert set(found) <= {"lock-order", "deadlock"} and found["lock-order"] > 0


async def test_trylock_under_ptl_adds_no_dependency():
    """Reclaim's fast path holds ptl and only trylocks pml (kernel-notes F2)."""
    for seed in range(20):
        m = bare_machine()
        pml, ptl = locks()

        async def reclaim_fast_path(cpu):
            await spin_lock(cpu, ptl)
            if await spin_trylock(cpu, pml):
                await spin_unlock(cpu, pml)
            await spin_unlock(cpu, ptl)

        async def slow_path(cpu):
            await spin_lock(cpu, pml)
            await spin_lock(cpu, ptl)
            await spin_unlock(cpu, ptl)
            await spin_unlock(cpu, pml)

        sched = await run_threads(m, {0: reclaim_fast_path, 1: slow_path}, seed)
        assert sched.bug is None
        assert ("ptl", "pml") not in m.lock_deps and ("pml", "ptl") in m.lock_deps


async def test_sleeping_locks_take_part():
    m = bare_machine()
    sem = RwSem("mm0.mmap_lock", "mmap_lock")
    lock = SpinLock("mm0.page_table_lock", lock_class="page_table_lock")

    async def one(cpu):
        await down_read(cpu, sem)
        await spin_lock(cpu, lock)
        await spin_unlock(cpu, lock)
        await up_read(cpu, sem)

    async def other(cpu):
        await spin_lock(cpu, lock)
        await down_read(cpu, sem)
        await up_read(cpu, sem)
        await spin_unlock(cpu, lock)

    sched = await run_threads(m, {0: one, 1: other}, 3)
    assert sched.bug is not None and sched.bug.kind == "lock-order"


@pytest.mark.parametrize("target", ["pfn 0", "freed table", "linked elsewhere", "pmd table"])
async def test_pmd_pointing_at_anything_but_a_free_standing_pte_table_is_bad(target):
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    m.pt_parent[pte] = (pmd, index(2, ADDR))
    other_pmd = (pmd, index(2, ADDR) + 1)
    if target == "pfn 0":
        child = 0
    elif target == "freed table":
        from ptsim.kernel_model.pgalloc import free_table_page
        m.mem.entries[pte][index(1, ADDR)] = 0
        free_table_page(m, pte, (0, "x", 0))
        child = pte
    elif target == "linked elsewhere":
        child = pte
    else:
        child = pmd

    async def populate(cpu):
        await write_entry(cpu, other_pmd, mk_table_entry(child), "pmd_populate")

    sched = await run_threads(m, {0: populate}, 0)
    assert sched.bug is not None and sched.bug.kind == "bad-pmd"


async def test_relinking_an_unlinked_table_is_fine():
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    pmdp = (pmd, index(2, ADDR))
    m.pt_parent[pte] = pmdp

    async def collapse_failure_path(cpu):
        old = await write_entry(cpu, pmdp, 0, "pmdp_collapse_flush")
        await write_entry(cpu, pmdp, old, "pmd_populate")

    sched = await run_threads(m, {0: collapse_failure_path}, 0)
    assert sched.bug is None


def test_d9_hazard_without_the_rfc_flush_and_none_with_it(monkeypatch):
    import ptsim.build
    monkeypatch.setattr(ptsim.build, "not_modelled", lambda scn: None)
    sf = load_scenario(SCENARIOS / "d09_mixed_tlb_sizes_after_reclaim.toml")
    buggy = Engine(sf.resolve("no-flush-before-set-pmd")).run_seeds(range(200), "pct")
    assert not [r for r in buggy if r.bug]
    assert [r for r in buggy if any(h.kind == "mixed-tlb-sizes" for h in r.hazards)]
    fixed = Engine(sf.resolve("rfc-flush-before-set-pmd"))
    results = fixed.run_seeds(range(200), "pct")
    assert not [r for r in results if r.bug]
    assert not [r for r in results if any(h.kind == "mixed-tlb-sizes" for h in r.hazards)]
    # ... and the RFC's flush really ran in those schedules: a flush was pending at set_pmd_at.
    flushed = 0
    for seed in range(40):
        log = fixed.run_seed(seed, "pct", log=True).log
        flushed += any(ev["event"] == "flush_tlb_mm_range"
                       and ev["func"] == "arch_flush_tlb_before_set_pmd"
                       for ev in log)
    assert flushed > 0
