"""A user thread's loads and stores (`touch`): through the TLB, walked by hardware on a miss,
faulting on a non-present or read-only entry."""

from __future__ import annotations

from ptsim.kernel_model.tlb import hw_access

from .fault import handle_mm_fault

PAGE = 4096


async def touch(cpu, mm, addr: int, len: int = PAGE, write: bool = False) -> None:
    tlb = cpu.tlb(mm.name)
    for page in range(addr, addr + len, PAGE):
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
