"""MADV_HUGEPAGE / MADV_NOHUGEPAGE (mm/khugepaged.c hugepage_madvise): set or clear the vma's
THP permission. madvise takes mmap_lock for write for these advices
(madvise_need_mmap_write), so no fault of the mm runs while the flags change."""

from __future__ import annotations

__kernel_file__ = "mm/khugepaged.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.locks import down_write, up_write
from ptsim.kernel_model.registry import Addr, Size, kfunc, op


@kfunc
async def hugepage_madvise(cpu, mm, addr: int, len: int, allow: bool) -> None:
    m = cpu.m
    await down_write(cpu, mm.mmap_lock)
    await m.point(cpu)
    for vma in mm.vmas_in(addr, addr + len):
        # The kernel splits the vma at addr and addr + len; the model applies the flag to every
        # vma the range touches (scenarios give whole vmas).
        vma.thp = allow
        m.ev(cpu, "vm_flags", vma=vma.index, thp=allow)
    await up_write(cpu, mm.mmap_lock)


@op("madvise_hugepage")
async def madvise_hugepage(cpu, *, addr: Addr, len: Size) -> None:
    """madvise(MADV_HUGEPAGE): the vmas in the range get VM_HUGEPAGE (faults there may map
    2 MB huge pmds)."""
    await hugepage_madvise(cpu, cpu.mm, addr, len, True)


@op("madvise_nohugepage")
async def madvise_nohugepage(cpu, *, addr: Addr, len: Size) -> None:
    """madvise(MADV_NOHUGEPAGE): the vmas in the range get VM_NOHUGEPAGE."""
    await hugepage_madvise(cpu, cpu.mm, addr, len, False)
