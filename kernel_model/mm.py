"""struct mm_struct and struct vm_area_struct: the address space and its mappings."""

from __future__ import annotations

from .locks import RwSem, SpinLock
from .snapshot import Snapshotted


class Vma:
    __slots__ = ("start", "end", "type", "thp", "file", "pgoff", "uffd_wp", "mm", "vm_lock",
                 "index")

    def __init__(self, index: int, mm: str, start: int, end: int, type: str, thp: bool,
                 file: str | None, pgoff: int, uffd_wp: bool) -> None:
        self.index = index
        self.mm = mm
        self.start = start
        self.end = end
        self.type = type
        self.thp = thp
        self.file = file
        self.pgoff = pgoff
        self.uffd_wp = uffd_wp
        # The per-VMA lock (vma_start_read / vma_start_write) that 6.4+ faults and 6.17+
        # MADV_DONTNEED take instead of mmap_lock.
        self.vm_lock = RwSem(f"vma[{index}].vm_lock", "vma_lock")

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for slot, value in zip(self.__slots__, state):
            setattr(self, slot, value)

    def __repr__(self) -> str:
        return f"vma[{self.index}] {self.start:#x}-{self.end:#x}"

    def __state_ref__(self):
        return ("Vma", self.mm, self.index)


class Mm(Snapshotted):
    def __state_ref__(self):
        return ("Mm", self.name)

    def __init__(self, name: str, pgd: int) -> None:
        self.name = name
        self.pgd = pgd
        self.vmas: list[Vma] = []
        self.mmap_lock = RwSem(f"{name}.mmap_lock", "mmap_lock")
        # Without split ptlocks both the pmd lock and every PTE lock are this one lock.
        self.page_table_lock = SpinLock(f"{name}.page_table_lock", lock_class="page_table_lock")
        self.nr_ptes = 0
        self.nr_pmds = 0
        self.nr_puds = 0
        self.rss = 0
        self.cpumask: set[int] = set()
        self.tlb_flush_pending = 0

    def find_vma(self, addr: int) -> Vma | None:
        for vma in self.vmas:
            if vma.start <= addr < vma.end:
                return vma
        return None

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and start < v.end]
