"""Issue 13, "Locks" and "Hazards that mean something": down_read_trylock and the per-VMA lock's
trylock with its mmap_lock fallback, the two ptlock kinds in the freed-ptlock report, and the
line tlb-divergence draws between the mmu_gather window and a real stale translation."""

from __future__ import annotations

import ptsim
from ptsim.kernel_model.pagetable import index, mk_pte
from ptsim.kernel_model.pgalloc import folio_put
from ptsim.kernel_model.tlb import hw_access

from conftest import SCENARIOS, run_threads
from test_sanitizers import ADDR, machine_with_page

D2 = SCENARIOS / "d02_nonempty_reclaim_after_break.toml"
D3 = SCENARIOS / "d03_ptlock_free_vs_uffd_move.toml"


# -- tlb-divergence: where the line is --------------------------------------------------------

def test_d2_fixed_variant_no_longer_reports_the_mmu_gather_window():
    """The ordinary MADV_DONTNEED window: CPU0's TLB keeps the zapped page, which the gather
    still holds until its flush, while CPU1 faults a new page in. 21 of these 400 runs reported
    tlb-divergence before the hazard was redefined."""
    summary = ptsim.load(D2).variant("rescan-after-break").stress(runs=400, strategy="random")
    assert not summary.bugs and not summary.hazards


async def _remap_and_fill(*, free_old: bool, pending: int, lazy: bool = False):
    """CPU0's TLB maps ADDR to the old page; the pte is cleared (the old page freed or not) and
    a new page mapped there with mm->tlb_flush_pending = ``pending``; CPU1 then fills its TLB
    with the new translation. Returns the machine's hazards."""
    m, mm, (pgd, pud, pmd, pte), old = machine_with_page()
    m.cpus[0].tlb("mm0").pte[ADDR >> 12] = m.mem.entries[pte][index(1, ADDR)]
    m.cpus[0].lazy = lazy

    async def remap(cpu):
        m.mem.entries[pte][index(1, ADDR)] = 0
        if free_old:
            folio_put(m, old, (1, "buggy_zap", m.step), cpu)  # freed before any flush
        new = m.mem.alloc_data((1, "do_anonymous_page", m.step))
        m.mem.entries[pte][index(1, ADDR)] = mk_pte(new, True)
        mm.tlb_flush_pending = pending
        assert await hw_access(cpu, mm, ADDR, write=True)

    sched = await run_threads(m, {1: remap}, 0)
    assert sched.bug is None
    return m.hazards


async def test_stale_entry_to_a_page_the_gather_still_holds_is_no_hazard():
    assert await _remap_and_fill(free_old=False, pending=1) == []


async def test_stale_entry_to_a_freed_frame_is_a_hazard_even_with_a_flush_pending():
    hazards = await _remap_and_fill(free_old=True, pending=1)
    assert [h.kind for h in hazards] == ["tlb-divergence"]
    assert "freed" in hazards[0].summary and "CPU0's TLB still maps" in hazards[0].summary


async def test_stale_entry_with_no_flush_pending_is_a_hazard():
    """The page is live, but no flush is pending: the entry outlived the flush meant for it."""
    hazards = await _remap_and_fill(free_old=False, pending=0)
    assert [h.kind for h in hazards] == ["tlb-divergence"]
    assert "no TLB flush pending" in hazards[0].summary


async def test_a_lazy_cpus_stale_leaf_entry_is_no_divergence():
    assert await _remap_and_fill(free_old=True, pending=0, lazy=True) == []


# -- the two ptlock kinds ----------------------------------------------------------------------

def _d3_bug(**overrides):
    v = ptsim.load(D3).variant("ptlock-immediate", **overrides)
    summary = v.stress(runs=60, strategy="pct")
    bugs = {b.kind: b for b in summary.bugs}
    assert set(bugs) == {"pt-use-after-free"}
    return bugs["pt-use-after-free"].summary


def test_freed_ptlock_report_names_the_embedded_kind_by_default():
    text = _d3_bug()
    assert "ptlock_kind = embedded" in text and "struct ptdesc" in text
    assert "slab" not in text


def test_freed_ptlock_report_for_allocated_ptlocks_is_a_slab_use_after_free():
    text = _d3_bug(ptlock_kind="allocated")
    assert "ptlock_kind = allocated" in text and "slab use-after-free" in text
    assert "KASAN" in text


def test_ptlock_kind_is_an_environment_key_in_every_profile():
    from ptsim.kernel_model.kernels import ENVIRONMENT, KERNELS
    from ptsim.kernel_model.registry import CONFIG

    assert CONFIG["ptlock_kind"].values == ("embedded", "allocated")
    assert "ptlock_kind" in ENVIRONMENT
    assert {p.value("ptlock_kind") for p in KERNELS.values()} == {"embedded"}
    # an environment key never makes a variant counterfactual
    v = ptsim.load(D2).variant("rescan-after-break", ptlock_kind="allocated")
    assert v.counterfactual == []


# -- rwsem trylock, and the per-VMA lock's trylock with its mmap_lock fallback ----------------

async def test_down_read_trylock_fails_while_a_writer_waits_and_down_read_steals():
    """__down_read_trylock fails on RWSEM_WRITER_MASK | RWSEM_FLAG_WAITERS | HANDOFF: with a
    reader holding the lock and a writer queued, a trylock fails; down_read (reader optimistic
    lock stealing, modelled without handoff) gets in."""
    from ptsim.kernel_model.locks import (
        RwSem,
        down_read,
        down_read_trylock,
        down_write,
        up_read,
        up_write,
    )

    from conftest import bare_machine

    seen = {"try_failed_on_waiter": 0, "try_ok": 0, "stole": 0}
    for seed in range(60):
        m = bare_machine(ncpus=3)
        sem = RwSem("mm0.mmap_lock", "mmap_lock")

        async def holder(cpu):
            await down_read(cpu, sem)
            for _ in range(6):
                await m.point(cpu)
            await up_read(cpu, sem)

        async def writer(cpu):
            await down_write(cpu, sem)
            await up_write(cpu, sem)

        async def reader(cpu):
            for try_first in (True, False):
                if try_first:
                    ok = await down_read_trylock(cpu, sem)
                    waiting = m.sched.waits[1] is not None  # same step as the trylock's test
                    assert ok == (sem.writer is None and not waiting)
                    if ok:
                        seen["try_ok"] += 1
                        await up_read(cpu, sem)
                    elif waiting and sem.writer is None:
                        seen["try_failed_on_waiter"] += 1
                else:
                    await down_read(cpu, sem)
                    seen["stole"] += m.sched.waits[1] is not None and sem.writer is None
                    await up_read(cpu, sem)

        sched = await run_threads(m, {0: holder, 1: writer, 2: reader}, seed)
        assert sched.bug is None
    assert seen["try_failed_on_waiter"] and seen["try_ok"] and seen["stole"]


FALLBACK = '''
[scenario]
name = "the per-VMA lock's trylock and its mmap_lock fallback"
cpus = 2
[[vma]]
start = 0x7f0000000000
size = "2M"
type = "anon"
[[vma]]
start = 0x7f0000200000
size = "2M"
type = "anon"
[[setup]]
cpu = 0
op = "touch"
addr = 0x7f0000000000
write = true
[[agent]]
cpu = 0
op = "mremap_move_pmd"
addr = 0x7f0000000000
dst = 0x7f0000200000
[[agent]]
cpu = 1
op = "%s"
%s
'''


def _locking(op: str, args: str, seeds=range(60)) -> dict:
    """CPU1's rwsem events per schedule, against mremap (vma_start_write on both vmas under
    mmap_lock held for writing) on CPU0."""
    eng = ptsim.loads(FALLBACK % (op, args)).variant()._engine()
    out = {}
    for seed in seeds:
        r = eng.run_seed(seed, "random", log=True)
        assert r.bug is None
        out[seed] = [(e["event"], e["lock"], e.get("ok")) for e in r.log
                     if e.get("cpu") == 1 and e["event"] in ("down_read_trylock", "down_read",
                                                              "up_read")]
    return out


def test_fault_trylocks_the_vma_and_falls_back_to_mmap_lock():
    shapes = set(map(tuple, _locking("fault", "addr = 0x7f0000001000\nwrite = true").values()))
    vma_path = (("down_read_trylock", "vma[0].vm_lock", True), ("up_read", "vma[0].vm_lock", None))
    fallback = (("down_read_trylock", "vma[0].vm_lock", False),
                ("down_read_trylock", "mm0.mmap_lock", False),  # mremap still holds it
                ("down_read", "mm0.mmap_lock", None), ("up_read", "mm0.mmap_lock", None))
    assert shapes == {vma_path, fallback}  # never a sleep on the vma lock


def test_madvise_dontneed_takes_the_vma_lock_for_one_vma_and_mmap_lock_across_two():
    one = _locking("madvise_dontneed", 'addr = 0x7f0000000000\nlen = "64K"')
    assert {s[0] for s in one.values()} == {("down_read_trylock", "vma[0].vm_lock", True),
                                            ("down_read_trylock", "vma[0].vm_lock", False)}
    for shape in one.values():  # the fallback sleeps on mmap_lock, never on the vma lock
        assert ("down_read", "vma[0].vm_lock", None) not in shape
        if shape[0][2] is False:
            assert ("down_read", "mm0.mmap_lock", None) in shape
    two = _locking("madvise_dontneed", 'addr = 0x7f0000000000\nlen = "4M"')
    for shape in two.values():  # the range spans two vmas: vma_end_read, mmap_read_lock
        assert shape[-1] == ("up_read", "mm0.mmap_lock", None)
        assert ("down_read", "mm0.mmap_lock", None) in shape


def test_madvise_dontneed_under_mmap_lock_in_6_14_takes_no_vma_lock():
    eng = ptsim.loads(FALLBACK % ("madvise_dontneed", 'addr = 0x7f0000000000\nlen = "64K"')
                      ).variant(madv_dontneed_lock="mmap")._engine()
    for seed in range(20):
        log = eng.run_seed(seed, "random", log=True).log
        assert not [e for e in log if e.get("cpu") == 1 and "vm_lock" in str(e.get("lock"))]
