"""Physical frames with KASAN-like shadow state.

A frame's metadata (its kind, refcount, who allocated and freed it) is permanent, as the
kernel's memmap is; its contents (a table's entries, a split ptlock) die with the free.
Arrays rather than one object per frame: the post-setup state is pickled once and restored
for every schedule, and lists of ints restore at memcpy speed.
"""

from __future__ import annotations

from collections import deque

from .registry import bug_kind
from .snapshot import Snapshotted

PT_USE_AFTER_FREE = bug_kind(
    "pt-use-after-free",
    "software read, write or lock of a freed page-table page or of its split ptlock (the lock "
    "counts as table contents even where the kernel embeds it in struct ptdesc)")

FREE, PAGETABLE, DATA, ZERO, RESERVED = range(5)
KIND_NAMES = ("free", "page table", "data", "zero page", "reserved")
LEVEL_NAMES = {1: "PTE", 2: "PMD", 3: "PUD", 4: "PGD"}

# pfn 0 is what pmd_pgtable() of a none pmd points at: never a table, never allocated.
PFN_RESERVED = 0
# The shared zero page that read faults on anon memory map; never freed.
ZERO_PFN = 1

# Freed frames wait this long before reuse (KASAN's quarantine): a stale pointer then still
# lands on a frame that is visibly free, which is what makes use-after-free detectable.
QUARANTINE = 4096

PTRS_PER_TABLE = 512
# 0..511 as held ints: compress() over this tuple hands them out, where over range(512) it made
# (and freed) an int object per entry it passed (the leak check's walk, a zap's skip of none ptes).
TABLE_INDICES = tuple(range(PTRS_PER_TABLE))


class Memory(Snapshotted):
    __state_skip__ = frozenset({"alloc_by", "free_by"})  # who allocated or freed: reports only

    def __state_ref__(self):
        return "Memory"

    def __init__(self) -> None:
        self.kind: list[int] = [RESERVED, ZERO]
        self.refcount: list[int] = [0, 1]
        self.level: dict[int, int] = {}
        self.entries: dict[int, list[int]] = {}
        # Who allocated / freed each frame (cpu, function, step), indexed by pfn like kind[]:
        # lists, not dicts, because the seed-002 run churns millions of frames through them.
        self.alloc_by: list[tuple | None] = [None, None]
        self.free_by: list[tuple | None] = [None, None]
        self.table_mm: dict[int, str] = {}
        self.quarantine: deque[int] = deque()
        self.free_list: deque[int] = deque()
        self.order: dict[int, int] = {}  # head pfn -> folio order (9 for a PMD-sized THP)
        # pfn -> the head of its folio (a frame of no THP is its own), indexed like kind[]: a
        # THP's 511 tails are laid out as one list extension, where a dict took 511 inserts.
        self.folio_of: list[int] = [0, 1]
        self.huge_zero: int | None = None  # the huge zero folio, allocated on first use

    def _alloc(self, kind: int) -> int:
        if self.free_list:
            pfn = self.free_list.popleft()
            self.kind[pfn] = kind
            self.refcount[pfn] = 1
            self.free_by[pfn] = None
        else:
            pfn = len(self.kind)
            self.kind.append(kind)
            self.folio_of.append(pfn)
            self.refcount.append(1)
            self.alloc_by.append(None)
            self.free_by.append(None)
        return pfn

    def alloc_data(self, who: tuple) -> int:
        pfn = self._alloc(DATA)
        self.alloc_by[pfn] = who
        return pfn

    def alloc_huge_data(self, who: tuple, kind: int = DATA) -> int:
        """A PMD-sized folio: 512 contiguous frames, the reference count on the head."""
        head = len(self.kind)
        self.kind.extend([kind] * 512)
        self.refcount.extend([1] + [0] * 511)
        self.alloc_by.extend([None] * 512)
        self.free_by.extend([None] * 512)
        self.order[head] = 9
        self.folio_of.extend([head] * 512)
        self.alloc_by[head] = who
        return head

    def huge_zero_folio(self) -> int:
        """mm_get_huge_zero_folio(): one huge zero page for the machine, never freed."""
        if self.huge_zero is None:
            self.huge_zero = self.alloc_huge_data((None, "huge_zero_folio", 0), ZERO)
        return self.huge_zero

    def folio(self, pfn: int) -> int:
        """page_folio(): the head frame of the folio pfn belongs to."""
        folio_of = self.folio_of
        return folio_of[pfn] if pfn < len(folio_of) else pfn

    def is_zero(self, pfn: int) -> bool:
        return self.kind[pfn] == ZERO

    def alloc_table(self, level: int, mm: str, who: tuple) -> int:
        pfn = self._alloc(PAGETABLE)
        self.level[pfn] = level
        self.entries[pfn] = [0] * PTRS_PER_TABLE
        self.alloc_by[pfn] = who
        self.table_mm[pfn] = mm
        return pfn

    def release(self, pfn: int, who: tuple) -> None:
        """Return the frame (the whole folio, for a head) to the allocator. Callers have
        checked that it is live."""
        if pfn in self.order:
            # The tails all at once, as _release_one would free each: a folio's tails are data
            # frames (alloc_huge_data), never tables, so no entries go with them.
            end = pfn + (1 << self.order.pop(pfn))
            n = end - pfn - 1
            self.kind[pfn + 1:end] = [FREE] * n
            self.refcount[pfn + 1:end] = [0] * n
            self.free_by[pfn + 1:end] = [who] * n
            self.quarantine.extend(range(pfn + 1, end))
            while len(self.quarantine) > QUARANTINE:
                self.free_list.append(self.quarantine.popleft())
            self.folio_of[pfn + 1:end] = range(pfn + 1, end)  # each its own frame again
        self._release_one(pfn, who)

    def _release_one(self, pfn: int, who: tuple) -> None:
        if self.kind[pfn] == PAGETABLE:
            del self.entries[pfn]
        self.kind[pfn] = FREE
        self.refcount[pfn] = 0
        self.free_by[pfn] = who
        self.quarantine.append(pfn)
        if len(self.quarantine) > QUARANTINE:
            self.free_list.append(self.quarantine.popleft())

    def describe(self, pfn: int) -> str:
        kind = self.kind[pfn] if pfn < len(self.kind) else RESERVED
        if kind == PAGETABLE:
            return f"{LEVEL_NAMES[self.level[pfn]]} table pfn {pfn:#x}"
        if kind == FREE and pfn in self.level:
            return f"freed {LEVEL_NAMES[self.level[pfn]]} table pfn {pfn:#x}"
        return f"{KIND_NAMES[kind]} pfn {pfn:#x}"
