"""A user thread's loads and stores (`touch`): through the TLB, walked by hardware on a miss,
faulting on a non-present or read-only entry."""

from __future__ import annotations

from ptsim.kernel_model.pagetable import PAGE_SIZE
from ptsim.kernel_model.registry import Addr, Size, op
from ptsim.kernel_model.tlb import hw_access

from .fault import handle_mm_fault


@op("touch")
async def touch(cpu, *, addr: Addr, len: Size = PAGE_SIZE, write: bool = False) -> None:
    """A user thread's loads (or stores) of every page in the range through this CPU's TLB; a
    miss walks the tables in hardware (filling TLB and paging-structure caches); a non-present
    entry raises a page fault, handled by handle_mm_fault, and the access is retried."""
    mm = cpu.mm
    tlb = cpu.tlb(mm.name)
    for page in range(addr, addr + len, PAGE_SIZE):
        while not await hw_access(cpu, mm, page, write):
            # x86 #PF: the faulting address's TLB and paging-structure entries are invalidated
            # before the handler runs; then the access is retried.
            tlb.invalidate_address(page)
            if cpu.m.log is not None:
                cpu.m.ev(cpu, "page_fault", addr=hex(page), write=write)
            if not await handle_mm_fault(cpu, mm, page, write):
                if cpu.m.log is not None:
                    cpu.m.ev(cpu, "SIGSEGV", addr=hex(page))
                return  # the user thread takes the signal and does not retry
