"""MADV_GUARD_INSTALL: guard markers, PTE entries a zap leaves in place.

mm/madvise.c madvise_guard_install as merged in v6.13 ("mm: madvise: implement lightweight guard
page mechanism", Lorenzo Stoakes; read in the patch as posted and in a 6.14-era tree, whose
zap_nonpresent_ptes keeps guard markers unless zap_drop_markers()): under mmap_lock for reading,
walk_page_range_mm with guard_install_walk_ops allocates the missing tables (the walk has an
install_pte op), sets every pte_none entry to make_pte_marker(PTE_MARKER_GUARD) under the PTE
lock (guard_install_set_pte), counts the entries that already are guard markers, and aborts on
a populated entry or a huge pmd; then zap_page_range_single(vma, start, end - start, NULL) and
another try, up to MAX_MADVISE_GUARD_RETRIES (3), else -EAGAIN. A guard marker is a
non-present entry (kernel_model.pagetable.GUARD_PTE): MADV_DONTNEED's zap leaves it in place
(any_skipped), so zap_pte_range reclaims no table holding one; munmap's zap drops it
(ZAP_FLAG_DROP_MARKER).

A user access to a guard marker faults, and handle_pte_fault -> do_swap_page ->
handle_pte_marker returns VM_FAULT_SIGSEGV (agents/fault.py handle_pte_fault): the `touch` op
takes SIGSEGV as it does for a fault outside every vma. Not modelled: MADV_GUARD_REMOVE;
file-backed VMAs (allowed since v6.15: here -EINVAL, as v6.13-6.14 return).
"""

from __future__ import annotations

__kernel_file__ = "mm/madvise.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.locks import down_read, up_read
from ptsim.kernel_model.pagetable import (
    GUARD_PTE,
    index,
    is_guard_pte_marker,
    leaf,
    pmd_addr_end,
    present,
)
from ptsim.kernel_model.pgtable import (
    pmdp_get_lockless,
    pte_offset_map_lock,
    pte_unmap_unlock,
    ptep_get_locked,
    set_pte_at,
)
from ptsim.kernel_model.registry import Addr, Size, kfunc, op

from .fault import alloc_pmd, pte_alloc
from .zap import zap_page_range_single

MAX_MADVISE_GUARD_RETRIES = 3


@kfunc
async def guard_install_pmd_range(cpu, mm, addr: int, end: int) -> bool:
    """walk_pmd_range / walk_pte_range with guard_install_walk_ops over [addr, end) inside one
    pmd: __pte_alloc if the pmd is none (install_pte walks allocate), guard_install_pmd_entry
    (a huge pmd aborts), then under the PTE lock a guard marker into each pte_none entry
    (guard_install_set_pte + set_pte_at) and guard_install_pte_entry for the rest (a marker is
    counted, anything else aborts). Returns True when the walk aborted on a populated entry."""
    m = cpu.m
    pmdp = await alloc_pmd(cpu, mm, addr)
    while True:
        await pte_alloc(cpu, mm, pmdp, addr)
        pmdval = await pmdp_get_lockless(cpu, pmdp)
        if present(pmdval) and leaf(pmdval):
            return True  # "If huge return >0 so we abort the operation + zap."
        mapped = await pte_offset_map_lock(cpu, mm, pmdp, addr)
        if mapped is not None:
            break
        # walk_pte_range: pte_offset_map_lock failed (the table went away): ACTION_AGAIN
    table, ptl = mapped
    populated = False
    installed = 0
    for a in range(addr, end, 1 << 12):
        ptep = (table, index(1, a))
        val = ptep_get_locked(cpu, ptep)
        if val == 0:
            await set_pte_at(cpu, ptep, GUARD_PTE)
            installed += 1
        elif not is_guard_pte_marker(val):
            populated = True  # "If populated return >0 so we abort the operation + zap."
            break
    await pte_unmap_unlock(cpu, ptl)
    if m.log is not None:
        m.ev(cpu, "guard_install", table=hex(table), installed=installed, populated=populated)
    return populated


@op("madvise_guard_install")
async def madvise_guard_install(cpu, *, addr: Addr, len: Size) -> None:
    """madvise(addr, len, MADV_GUARD_INSTALL) (v6.13+) under mmap_lock for reading: guard markers
    in every pte_none entry of the range (tables allocated as needed); a populated entry makes
    it zap the range (zap_page_range_single, no details: no table reclaim, markers kept) and
    try again, at most 3 times (then -EAGAIN). A zap leaves guard markers in place, so
    MADV_DONTNEED's PT_RECLAIM keeps their table; a user access to one gets SIGSEGV."""
    m = cpu.m
    mm = cpu.mm
    end = addr + len
    await down_read(cpu, mm.mmap_lock)
    for vma in mm.vmas_in(addr, end):
        if vma.type != "anon":  # is_valid_guard_vma (v6.13: anonymous only)
            m.ev(cpu, "madvise_guard_install_einval", vma=vma.index)
            break
        start, stop = max(addr, vma.start), min(end, vma.end)
        for _ in range(MAX_MADVISE_GUARD_RETRIES):
            populated = False
            a = start
            while a < stop:
                nxt = pmd_addr_end(a, stop)
                if await guard_install_pmd_range(cpu, mm, a, nxt):
                    populated = True
                    break
                a = nxt
            if not populated:
                break
            await zap_page_range_single(cpu, vma, start, stop - start, None)
        else:
            m.ev(cpu, "madvise_guard_install_eagain", vma=vma.index)
    await up_read(cpu, mm.mmap_lock)
