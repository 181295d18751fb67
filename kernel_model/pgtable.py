"""Page-table accessors (include/linux/pgtable.h) and mm/pgtable-generic.c, modelled ~6.14.

Every read or write of an entry is a scheduling point and a checked access: the sanitizer
rejects a software access to a table page that is no longer a live page table. The kernel's
named accessors (pmdp_get_lockless, set_pte_at, ...) are plain functions that return the
primitive's coroutine: callers still write ``await pmdp_get_lockless(cpu, pmdp)``, and the
seed-002 measurement saves a coroutine per access.
"""

from __future__ import annotations

__kernel_file__ = "mm/pgtable-generic.c"  # where the kernel functions below live (reports cite it)

from .locks import SpinLock, spin_lock, spin_lock_nested, spin_unlock
from .memory import LEVEL_NAMES, PAGETABLE
from .pagetable import (
    _PAGE_PRESENT,
    _PAGE_PSE,
    LEVEL_ENTRY,
    PAGE_SHIFT,
    entry_pfn,
    fmt_entry,
    index,
    leaf,
    mk_table_entry,
    present,
)
from .rcu import rcu_read_lock, rcu_read_unlock
from .registry import bug_kind, config_key, kfunc
from .tlb import flush_tlb_range

SPLIT_PTLOCKS = config_key(
    "split_ptlocks", (True, False),
    "CONFIG_SPLIT_PTE_PTLOCKS: a spinlock per PTE (and PMD) table page, living with the page; "
    "false: one mm->page_table_lock serves as pmd lock and every PTE lock (ptl == pml), as on "
    "!SMP, NR_CPUS < 4 and some ARM, PARISC, SPARC32 and UML configurations",
    "a configuration, not a fix: both exist in every release", kconfig="CONFIG_SPLIT_PTE_PTLOCKS")

BAD_PMD = bug_kind(
    "bad-pmd",
    "a pmd made to point at something that is not a live page table of this mm (pfn 0, a freed "
    "table, another table)")


async def read_entry(cpu, ptr, op: str) -> int:
    m = cpu.m
    if cpu is m.lean:  # lean_step(), inlined: the hottest scheduling point
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)
    else:
        await m.point(cpu)
    pfn, idx = ptr
    if m.fp is not None:
        m.fp.begin(m.step, cpu.id)
        m.fp.touch(m.step, ("e", pfn, idx), False)
        m.fp.touch(m.step, ("f", pfn), False)
    if m.mem.kind[pfn] != PAGETABLE:
        m.check_table(cpu, pfn, op)
    val = m.mem.entries[pfn][idx]
    if m.log is not None:
        m.ev(cpu, op, table=hex(pfn), idx=idx, val=fmt_entry(val))
    return val


async def write_entry(cpu, ptr, val: int, op: str) -> int:
    """Write an entry; returns the old value (ptep_get_and_clear and friends need it)."""
    m = cpu.m
    if cpu is m.lean:  # lean_step(), inlined: the hottest scheduling point
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)
    else:
        await m.point(cpu)
    pfn, idx = ptr
    if m.fp is not None:
        m.fp.begin(m.step, cpu.id)
        m.fp.touch(m.step, ("e", pfn, idx), True)
        m.fp.touch(m.step, ("t", pfn), True)
    if m.mem.kind[pfn] != PAGETABLE:
        m.check_table(cpu, pfn, op)
    entries = m.mem.entries[pfn]
    old = entries[idx]
    level = m.mem.level[pfn]
    if level != 1 and (old | val) & _PAGE_PRESENT:
        _relink(cpu, ptr, level, old, val, op)
    entries[idx] = val
    if m.log is not None:
        m.ev(cpu, op, table=hex(pfn), idx=idx, old=fmt_entry(old), val=fmt_entry(val))
    return old


def _links_table(level: int, val: int) -> bool:
    return bool(val & _PAGE_PRESENT) and not (level == 2 and val & _PAGE_PSE)


def _relink(cpu, ptr, level: int, old: int, val: int, op: str) -> None:
    """The bad-pmd sanitizer: an upper-level entry may only point at a live table of the level
    below, of the same mm, linked nowhere else (pfn 0 from pmd_pgtable(none), a freed table or
    a table still linked at another entry are the D4/D6/D8 failures)."""
    m = cpu.m
    mem = m.mem
    parent = m.pt_parent
    if m.fp is not None:  # which entry links a table: read and written by other entry writes
        if _links_table(level, old):
            m.fp.touch(m.step, ("p", old >> PAGE_SHIFT), True)
        if _links_table(level, val):
            m.fp.touch(m.step, ("p", val >> PAGE_SHIFT), True)
            m.fp.touch(m.step, ("f", val >> PAGE_SHIFT), False)  # the sanitizer reads its life
    if _links_table(level, old) and parent.get(old >> PAGE_SHIFT) == ptr:
        del parent[old >> PAGE_SHIFT]
    if not _links_table(level, val):
        return
    child = val >> PAGE_SHIFT
    problem = None
    if mem.kind[child] != PAGETABLE:
        problem = mem.describe(child)
    elif mem.level[child] != level - 1:
        problem = f"{mem.describe(child)}, not a {LEVEL_NAMES[level - 1]} table"
    elif mem.table_mm[child] != mem.table_mm[ptr[0]]:
        problem = f"{mem.describe(child)} of {mem.table_mm[child]}"
    elif parent.get(child, ptr) != ptr:
        other = parent[child]
        problem = f"{mem.describe(child)}, still linked at {other[0]:#x}[{other[1]}]"
    if problem is not None:
        entry = LEVEL_ENTRY[level]
        raise m.bug(BAD_PMD, cpu, f"CPU{cpu.id} {op} makes {entry} {ptr[0]:#x}[{ptr[1]}] point at "
                    f"{problem} in {cpu.func()}", obj=f"{entry} {ptr[0]:#x}[{ptr[1]}]",
                    keys=(("pt", child),), pfns=(child, ptr[0]),
                    access=f"{op} {entry} -> pfn {child:#x}")
    parent[child] = ptr


def pmdp_get_lockless(cpu, pmdp):
    return read_entry(cpu, pmdp, "pmdp_get_lockless")


def pmdp_get(cpu, pmdp):
    return read_entry(cpu, pmdp, "pmdp_get")


def ptep_get_lockless(cpu, ptep):
    return read_entry(cpu, ptep, "ptep_get_lockless")


def ptep_get(cpu, ptep):
    return read_entry(cpu, ptep, "ptep_get")


def ptep_get_locked(cpu, ptep) -> int:
    """ptep_get() of an entry whose PTE table lock this CPU holds. Every writer of the entry
    holds that lock, so no other CPU's step can change what this read returns: it is merged
    into the step that took the lock (SPEC: "Steps"), and is still a checked access."""
    m = cpu.m
    pfn, idx = ptep
    if m.fp is not None:
        m.fp.touch(m.step, ("e", pfn, idx), False)
        m.fp.touch(m.step, ("f", pfn), False)
    if m.mem.kind[pfn] != PAGETABLE:
        m.check_table(cpu, pfn, "ptep_get")
    val = m.mem.entries[pfn][idx]
    if m.log is not None:
        m.ev(cpu, "ptep_get", table=hex(pfn), idx=idx, val=fmt_entry(val))
    return val


def set_pte_at(cpu, ptep, val: int):
    return write_entry(cpu, ptep, val, "set_pte_at")


def ptep_get_and_clear(cpu, ptep):
    return write_entry(cpu, ptep, 0, "ptep_get_and_clear")


async def pmd_clear(cpu, pmdp) -> None:
    pfn, idx = pmdp
    old = await write_entry(cpu, pmdp, 0, "pmd_clear")
    if present(old) and not leaf(old):
        cpu.m.remember(("pt", entry_pfn(old)), cpu,
                       f"pmd_clear unlinked it from pmd {pfn:#x}:{idx}")


async def pmd_populate(cpu, pmdp, table: int) -> None:
    await write_entry(cpu, pmdp, mk_table_entry(table), "pmd_populate")


def scan_entries_locked(cpu, table: int) -> list[int]:
    """Read a whole PTE table while holding its ptlock. Every writer of these entries holds that
    lock, so no other step can interleave: one scheduling point covers the 512 reads (SPEC).
    The caller has made the scheduling point (the lock acquisition)."""
    m = cpu.m
    if m.fp is not None:
        m.fp.touch(m.step, ("t", table), False)
    if m.mem.kind[table] != PAGETABLE:
        m.check_table(cpu, table, "ptep_get")
    return m.mem.entries[table]


# -- locks ---------------------------------------------------------------------------------

def pmd_lockptr(m, mm, pmdp) -> SpinLock:
    """The PMD split lock lives in the PMD table page's ptdesc (USE_SPLIT_PMD_PTLOCKS)."""
    if not m.cfg.split_ptlocks:
        return mm.page_table_lock
    return ptlock_of(m, pmdp[0])


def pte_lockptr(m, mm, pmdval: int) -> SpinLock:
    """Derived from a pmd *value*: for a none pmd that is the 'lock' of pfn 0 (D4, D6)."""
    if not m.cfg.split_ptlocks:
        return mm.page_table_lock
    return ptlock_of(m, entry_pfn(pmdval))


def ptlock_of(m, pfn: int) -> SpinLock:
    lock = m.ptlocks.get(pfn)
    if lock is None:
        # Not a table with a constructed ptlock (pfn 0, a data page): garbage memory.
        lock = SpinLock(f"ptl@pfn{pfn:#x}", pfn=pfn, lock_class="ptl")
    return lock


async def pmd_lock(cpu, mm, pmdp) -> SpinLock:
    ptl = pmd_lockptr(cpu.m, mm, pmdp)
    await spin_lock(cpu, ptl)
    return ptl


# -- pte_offset_map family (mm/pgtable-generic.c) ---------------------------------------------

def _pmd_maps_table(pmdval: int) -> bool:
    return present(pmdval) and not leaf(pmdval)


@kfunc
async def ___pte_offset_map(cpu, pmdp, addr: int, pmdval_copy: int | None = None):
    """rcu_read_lock(), read the pmd, and return (pte table pfn, pmdval) or None (rcu dropped).

    GUP-fast passes its on-stack pmd copy (pmdval_copy): no shared read then."""
    await rcu_read_lock(cpu)
    if pmdval_copy is None:
        pmdval = await pmdp_get_lockless(cpu, pmdp)
    else:
        pmdval = pmdval_copy
    if not _pmd_maps_table(pmdval):
        await rcu_read_unlock(cpu)
        return None
    # Still inside RCU: 'even when page table is racily removed, it remains a valid though
    # empty and disconnected table. Until pte_unmap()' -- if it is RCU-freed.
    return entry_pfn(pmdval), pmdval


@kfunc
async def pte_offset_map_lock(cpu, mm, pmdp, addr: int):
    """__pte_offset_map_lock: map, lock the ptl derived from the pmd value, recheck pmd_same.

    Returns (pte table pfn, ptl) holding rcu + ptl, or None."""
    m = cpu.m
    while True:
        mapped = await ___pte_offset_map(cpu, pmdp, addr)
        if mapped is None:
            return None
        table, pmdval = mapped
        ptl = pte_lockptr(m, mm, pmdval)
        await spin_lock_nested(cpu, ptl)
        if await pmdp_get_lockless(cpu, pmdp) == pmdval:
            return table, ptl
        await pte_unmap_unlock(cpu, ptl)


@kfunc
async def pte_offset_map_rw_nolock(cpu, mm, pmdp, addr: int):
    """Returns (pte table pfn, pmdval, ptl) inside rcu_read_lock, ptl not taken, or None."""
    mapped = await ___pte_offset_map(cpu, pmdp, addr)
    if mapped is None:
        return None
    table, pmdval = mapped
    return table, pmdval, pte_lockptr(cpu.m, mm, pmdval)


def pte_unmap(cpu):
    return rcu_read_unlock(cpu)


async def pte_unmap_unlock(cpu, ptl: SpinLock) -> None:
    await spin_unlock(cpu, ptl)
    await rcu_read_unlock(cpu)


async def pmd_off(cpu, mm, addr: int):
    """pgd_offset -> pud_offset -> pmd_offset with a read of each upper entry.

    Returns the pmd pointer (PMD table pfn, index), or None if an upper level is not populated.
    Upper tables of a live mm are freed only by free_pgtables on a detached range."""
    table = mm.pgd
    for level in (4, 3):
        val = await read_entry(cpu, (table, index(level, addr)),
                               "pgd_offset" if level == 4 else "pud_offset")
        if not present(val):
            return None
        table = entry_pfn(val)
    return (table, index(2, addr))


async def pmdp_collapse_flush(cpu, mm, pmdp, addr: int) -> int:
    """mm/pgtable-generic.c (x86): pmdp_huge_get_and_clear, then "collapse entails shooting down
    ptes not pmd": flush_tlb_range of the 2 MB, which on x86 passes freed_tables = true since
    3ef938c35035 (v6.15), so lazy CPUs are interrupted too; before it false
    (pmd_flush_freed_tables, tlb.flush_tlb_range). Returns the old pmd value."""
    haddr = addr & ~((1 << 21) - 1)
    old = await write_entry(cpu, pmdp, 0, "pmdp_collapse_flush")
    if present(old) and not leaf(old):
        cpu.m.remember(("pt", entry_pfn(old)), cpu, "pmdp_collapse_flush unlinked it")
    await flush_tlb_range(cpu, mm, haddr, haddr + (1 << 21))
    return old
