"""Allocating and freeing page tables and data folios, with the sanitizer's checks at the free.

A table page carries its split ptlock (pagetable_ctor creates it, pagetable_dtor destroys it).
"""

from __future__ import annotations

from .footprint import begin, opaque, touch
from .lean import lean_step
from .locks import SpinLock
from .memory import DATA, FREE, LEVEL_NAMES, PAGETABLE, QUARANTINE, ZERO
from .pagetable import _PAGE_PRESENT
from .registry import bug_kind, config_key

INVALID_FREE = bug_kind(
    "invalid-free",
    "a page or table freed twice, or freed as a page table when it is not a live one (KASAN's "
    "double-free or invalid-free)")
NONEMPTY_TABLE_FREED = bug_kind(
    "nonempty-table-freed",
    "a page table freed or unlinked for freeing while it still held present entries")


PTLOCK_KIND = config_key(
    "ptlock_kind", ("embedded", "allocated"),
    "Where a split ptlock lives; it changes what a use of a freed ptlock does in the kernel, not "
    "the schedules. embedded: spinlock_t fits in a long (a production build), so the lock is "
    "the ptl field of the table page's struct ptdesc, ptlock_alloc and ptlock_free do "
    "nothing, and a use after the free touches struct page memory of a page the allocator may "
    "already have handed out again (KASAN does not watch struct page). allocated: "
    "ALLOC_SPLIT_PTLOCKS (include/linux/mm_types_task.h: SPINLOCK_SIZE > BITS_PER_LONG/8, "
    "true with lockdep or DEBUG_SPINLOCK, as on syzbot's kernels): ptlock_alloc takes the lock "
    "from the page->ptl kmem_cache, ptlock_free (from pagetable_dtor) kmem_cache_free()s it, "
    "and a use after that is a slab use-after-free KASAN reports. An environment key: every "
    "release builds both ways.",
    "include/linux/mm.h ptlock_init / ptlock_alloc / ptlock_ptr, mm/memory.c ptlock_alloc / "
    "ptlock_free (kmem_cache_free(page_ptl_cachep, ptdesc->ptl), as read in the 6.14-era tree "
    "after 'mm: move pagetable_*_dtor() to __tlb_remove_table()' dropped the short-lived RCU "
    "freeing of struct pt_lock)")


def _new_table(cpu, mm, level: int) -> int:
    m = cpu.m
    if m.fp is not None:  # the allocator; the new table is no one else's yet
        begin(m, cpu)
        touch(m, ("alloc",), True)
    who = m.who(cpu, "alloc")
    pfn = m.mem.alloc_table(level, mm.name, who)
    m.history.pop(("pt", pfn), None)  # a new table: the old one's story is over
    if level <= 2:
        # pagetable_pte_ctor / pagetable_pmd_ctor -> ptlock_init: the split lock lives with
        # the page, in its struct ptdesc or (ptlock_kind = "allocated") in a page->ptl slab
        # object ptlock_alloc takes; either way it dies with the table (pagetable_dtor).
        name = f"ptl({'PTE' if level == 1 else 'PMD'} {pfn:#x})"
        m.ptlocks[pfn] = SpinLock(name, pfn=pfn, lock_class="ptl" if level == 1 else "pml")
        m.history.pop(("ptl", name), None)
    if m.log is not None:
        m.ev(cpu, "alloc_table", level=level, pfn=hex(pfn))
    return pfn


async def pte_alloc_one(cpu, mm) -> int:
    if not lean_step(cpu.m, cpu):
        await cpu.m.point(cpu)
    return _new_table(cpu, mm, 1)


async def pmd_alloc_one(cpu, mm) -> int:
    if not lean_step(cpu.m, cpu):
        await cpu.m.point(cpu)
    return _new_table(cpu, mm, 2)


async def pud_alloc_one(cpu, mm) -> int:
    if not lean_step(cpu.m, cpu):
        await cpu.m.point(cpu)
    return _new_table(cpu, mm, 3)


def pagetable_dtor(m, pfn: int, who: tuple) -> None:
    lock = m.ptlocks.get(pfn)
    if lock is not None and lock.destroyed_by is None:
        lock.destroyed_by = who
        m.history.setdefault(("ptl", lock.name), []).append(
            {"cpu": who[0], "func": who[1], "step": who[2],
             "what": "pagetable_dtor destroyed the ptlock" + (
                 " (ptlock_free: kmem_cache_free of its page->ptl object)"
                 if m.cfg.ptlock_kind == "allocated" else "")})


def free_table_page(m, pfn: int, who: tuple, cpu=None) -> None:
    """__tlb_remove_table / pte_free: pagetable_dtor, then pagetable_free.

    The sanitizer checks the free like KASAN's invalid-free and nonempty-table-freed checks."""
    mem = m.mem
    fp = m.fp
    if fp is not None:
        # The table's life (every access to it reads it), its entries and its split ptlock,
        # which dies with it. Precise only where its step is (a grace period's end: rcu.py);
        # a CPU's step that frees a table has no primitive naming the rest of what it does.
        fp.touch(m.step, ("f", pfn), True)
        fp.touch(m.step, ("t", pfn), True)
        lock = m.ptlocks.get(pfn)
        if lock is not None:
            fp.touch(m.step, ("l", lock.name), True)
        feeds = len(mem.quarantine) >= QUARANTINE  # the release hands a frame back for reuse
    kind = mem.kind[pfn]
    if kind != PAGETABLE:
        what = "double free of" if kind == FREE else "free as a page table of"
        raise m.bug(INVALID_FREE, cpu, f"{who[1]}: {what} {mem.describe(pfn)}",
                    obj=mem.describe(pfn), keys=(("pt", pfn),), pfns=(pfn,))
    check_table_empty(m, pfn, who, cpu)
    # With ptlock_free="immediate" pte_free_tlb already ran the dtor; otherwise it runs here,
    # whenever and however the page itself is freed.
    pagetable_dtor(m, pfn, who)
    mem.release(pfn, who)
    if fp is not None and feeds:  # which frame the next allocation takes
        fp.touch(m.step, ("alloc",), True)
    m.history.setdefault(("pt", pfn), []).append(
        {"cpu": who[0], "func": who[1], "step": who[2], "what": "freed the table page"})
    if m.log is not None:
        m.ev(cpu, "free_table", pfn=hex(pfn), by=who[1])


def check_table_empty(m, pfn: int, who: tuple, cpu=None) -> None:
    entries = m.mem.entries[pfn]
    if entries.count(0) == len(entries):  # any(entries), 5 times cheaper: 0 is one object
        return
    live = [i for i, val in enumerate(entries) if val & _PAGE_PRESENT]
    if live:
        level = LEVEL_NAMES[m.mem.level[pfn]]
        raise m.bug(NONEMPTY_TABLE_FREED, cpu,
                    f"{who[1]}: {level} table pfn {pfn:#x} freed with {len(live)} present "
                    f"entries (first at index {live[0]})",
                    obj=f"{level} table pfn {pfn:#x}", keys=(("pt", pfn),), pfns=(pfn,))


def folio_put(m, pfn: int, who: tuple, cpu=None) -> None:
    """Drop one reference on the folio pfn belongs to; it is freed when the count reaches zero."""
    mem = m.mem
    pfn = mem.folio(pfn)
    if m.fp is not None:
        m.fp.touch(m.step, ("k", pfn), True)
    if mem.kind[pfn] == ZERO:
        return
    if mem.kind[pfn] != DATA:
        raise m.bug(INVALID_FREE, cpu, f"{who[1]}: put_page on {mem.describe(pfn)}",
                    obj=mem.describe(pfn), keys=(("page", pfn),), pfns=(pfn,))
    mem.refcount[pfn] -= 1
    if mem.refcount[pfn] == 0:
        if m.fp is not None:  # the allocator: no footprint names it
            opaque(m)
        mem.release(pfn, who)  # reports read who freed it from the frame's free_by
        if m.log is not None:
            m.ev(cpu, "free_folio", pfn=hex(pfn), by=who[1])


async def pte_free(cpu, pfn: int) -> None:
    """Free a table page now (pte_free / pmd_free / pud_free, or semi-RCU's free after the IPI)."""
    if not lean_step(cpu.m, cpu):
        await cpu.m.point(cpu)
    free_table_page(cpu.m, pfn, cpu.m.who(cpu), cpu)


def _pte_free_now(m, pfn: int, queued_by: tuple) -> None:
    cpu_id, func, step = queued_by
    free_table_page(m, pfn, (None, f"pte_free_now (RCU callback queued by CPU{cpu_id} in {func} "
                                   f"at step {step})", m.step))


def pte_free_defer(cpu, pfn: int) -> None:
    """mm/pgtable-generic.c: call_rcu(&page->rcu_head, pte_free_now): khugepaged's way of
    freeing a retracted table (M4); the ptlock goes with the page, after the grace period."""
    from .rcu import call_rcu
    cpu.m.remember(("pt", pfn), cpu, "pte_free_defer queued it for freeing after a grace period")
    if cpu.m.log is not None:
        cpu.m.ev(cpu, "pte_free_defer", pfn=hex(pfn))
    call_rcu(cpu, _pte_free_now, pfn, name="pte_free_now")
