"""`pte_walker`: a software page-table walker as in the fault and madvise paths.

mmap_lock read, then pte_offset_map_lock (rcu_read_lock, ptl, pmd_same recheck), read the
entries under ptl, pte_unmap_unlock. IRQs stay on, so this reader is protected by RCU alone:
the reader kind (R2) that semi-RCU's IPI-then-free fallback does not wait for.
"""

from __future__ import annotations

__kernel_file__ = "mm/pagewalk.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.locks import down_read, up_read
from ptsim.kernel_model.pagetable import PAGE_SIZE, pmd_addr_end
from ptsim.kernel_model.pgtable import (
    pmd_off,
    pte_offset_map_lock,
    pte_unmap_unlock,
    scan_entries_locked,
)
from ptsim.kernel_model.registry import Addr, Size, kfunc, op


@kfunc
async def walk_pte_range(cpu, mm, pmdp, addr: int, end: int) -> int:
    """Returns how many present entries the walker saw."""
    mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
    if mapped is None:
        return 0
    table, ptl = mapped
    entries = scan_entries_locked(cpu, table)
    first = (addr >> 12) & 511
    seen = sum(1 for val in entries[first:first + (end - addr) // PAGE_SIZE] if val & 1)
    if cpu.m.log is not None:
        cpu.m.ev(cpu, "read_ptes", table=hex(table), present=seen)
    await pte_unmap_unlock(cpu, ptl)
    return seen


@op("pte_walker")
async def pte_walker(cpu, *, addr: Addr, len: Size = PAGE_SIZE) -> None:
    """A software walker as in the fault and madvise paths: mmap_lock read, then per pmd
    pte_offset_map_lock (rcu_read_lock, ptl, pmd_same recheck), read the entries,
    pte_unmap_unlock; IRQs stay on."""
    mm = cpu.mm
    await down_read(cpu, mm.mmap_lock)
    end = addr + len
    while addr < end:
        next_ = pmd_addr_end(addr, end)
        pmdp = await pmd_off(cpu, mm, addr)
        if pmdp is not None:
            await walk_pte_range(cpu, mm, pmdp, addr, next_)
        addr = next_
    await up_read(cpu, mm.mmap_lock)
