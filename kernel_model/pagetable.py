"""x86-64 4-level paging: entry encoding and address arithmetic (4 KB pages, p4d folded).

An entry is an int, as in the kernel: pfn << 12 | flags. A pointer to an entry ("pmd_t *")
is the pair (table pfn, index).
"""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
PGDIR_SHIFT = 39
PTRS_PER_PTE = 512

_PAGE_PRESENT = 0x001
_PAGE_RW = 0x002
_PAGE_USER = 0x004
_PAGE_ACCESSED = 0x020
_PAGE_DIRTY = 0x040
_PAGE_PSE = 0x080
_PAGE_SPECIAL = 0x200  # software bit: pte_special (the zero page), GUP-fast refuses it

_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY

LEVEL_SHIFT = {4: PGDIR_SHIFT, 3: PUD_SHIFT, 2: PMD_SHIFT, 1: PAGE_SHIFT}
LEVEL_ENTRY = {4: "pgd", 3: "pud", 2: "pmd", 1: "pte"}

# An entry pointer (the kernel's pte_t * / pmd_t *) is a (table pfn, index) tuple.


def index(level: int, addr: int) -> int:
    return (addr >> LEVEL_SHIFT[level]) & 511


def entry_pfn(val: int) -> int:
    return val >> PAGE_SHIFT


def present(val: int) -> bool:
    return bool(val & _PAGE_PRESENT)


def writable(val: int) -> bool:
    return bool(val & _PAGE_RW)


def leaf(val: int) -> bool:
    return bool(val & _PAGE_PSE)


def mk_table_entry(pfn: int) -> int:
    """pmd_populate / pud_populate: an entry pointing at a lower-level table."""
    return (pfn << PAGE_SHIFT) | _PAGE_TABLE


def mk_pte(pfn: int, write: bool, special: bool = False) -> int:
    val = (pfn << PAGE_SHIFT) | _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
    if write:
        val |= _PAGE_RW | _PAGE_DIRTY
    if special:
        val |= _PAGE_SPECIAL
    return val


def mk_huge_pmd(pfn: int, write: bool) -> int:
    """A leaf pmd mapping a 2 MB folio (pmd_mkhuge)."""
    return mk_pte(pfn, write) | _PAGE_PSE


# A PTE marker (include/linux/swapops.h make_pte_marker): a non-present swap-format entry of
# type SWP_PTE_MARKER whose offset holds marker bits (PTE_MARKER_UFFD_WP BIT(0),
# PTE_MARKER_POISONED BIT(1), PTE_MARKER_GUARD BIT(2); include/linux/swapops.h since v6.13). The
# model has no swap entries, so a marker is the bits in the pfn field and _PAGE_SWP_MARKER, a
# software bit that only a non-present entry carries: never present, never a pfn to put.
_PAGE_SWP_MARKER = 0x100
PTE_MARKER_GUARD = 1 << 2
GUARD_PTE = (PTE_MARKER_GUARD << PAGE_SHIFT) | _PAGE_SWP_MARKER


def is_guard_pte_marker(val: int) -> bool:
    """mm/madvise.c is_guard_pte_marker(): is_pte_marker(ptent) && is_guard_swp_entry()."""
    return val == GUARD_PTE


def pmd_addr_end(addr: int, end: int) -> int:
    boundary = (addr + PMD_SIZE) & ~(PMD_SIZE - 1)
    return min(boundary, end)


def fmt_entry(val: int) -> str:
    if val == 0:
        return "none"
    if val == GUARD_PTE:
        return "guard marker"
    bits = []
    if not present(val):
        bits.append("!P")
    if leaf(val):
        bits.append("huge")
    if val & _PAGE_RW:
        bits.append("rw")
    if val & _PAGE_SPECIAL:
        bits.append("special")
    return f"pfn {entry_pfn(val):#x}" + (f" ({','.join(bits)})" if bits else "")
