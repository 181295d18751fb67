"""End-of-run checks: accounting and leaks, after every grace period and callback has run.

The per-access checks (use-after-free, invalid-free, nonempty-table-freed) sit at the access
itself, in pgtable.py, locks.py, tlb.py and pgalloc.py, as KASAN's do.
"""

from __future__ import annotations

from collections import Counter

from .memory import DATA, PAGETABLE, ZERO_PFN
from .pagetable import _PAGE_PRESENT, PAGE_SHIFT, entry_pfn, leaf


def _walk(m, mm):
    """Yield (level, table pfn) for every table reachable from mm's pgd, and count mappings."""
    entries = m.mem.entries
    tables = {4: [mm.pgd], 3: [], 2: [], 1: []}
    mapped: Counter = Counter()
    for level in (4, 3, 2):
        for table in tables[level]:
            for val in entries[table]:
                if not val & _PAGE_PRESENT:
                    continue
                if level == 2 and leaf(val):
                    mapped[entry_pfn(val)] += 512
                    continue
                tables[level - 1].append(entry_pfn(val))
    for table in tables[1]:
        table_entries = entries[table]
        if any(table_entries):
            mapped.update(val >> PAGE_SHIFT for val in table_entries if val & _PAGE_PRESENT)
    return tables, mapped


def check_end_of_run(m) -> None:
    mem = m.mem
    reachable: set[int] = set()
    mapped_total: Counter = Counter()
    for mm in m.mms.values():
        tables, mapped = _walk(m, mm)
        for level_tables in tables.values():
            reachable.update(level_tables)
        mapped_total.update(mapped)
        for level, counter in ((1, "nr_ptes"), (2, "nr_pmds"), (3, "nr_puds")):
            held = len(tables[level])
            counted = getattr(mm, counter)
            if held != counted:
                raise m.bug("leak", None, f"{mm.name}: {counter} is {counted} but {held} "
                            f"{('PTE', 'PMD', 'PUD')[level - 1]} tables are linked in",
                            obj=f"{mm.name}.{counter}")
        rss = sum(n for pfn, n in mapped.items() if pfn != ZERO_PFN)
        if rss != mm.rss:
            raise m.bug("leak", None, f"{mm.name}: RSS counter is {mm.rss} pages but "
                        f"{rss} pages are mapped", obj=f"{mm.name}.rss")
    for pfn in mem.entries:
        if pfn not in reachable:
            raise m.bug("leak", None, f"{mem.describe(pfn)} is allocated but linked into no "
                        "address space and queued for no free", obj=mem.describe(pfn),
                        keys=(("pt", pfn),), pfns=(pfn,))
    kind, refcount = mem.kind, mem.refcount
    for pfn in range(len(kind)):
        if kind[pfn] == DATA and refcount[pfn] != mapped_total.get(pfn, 0):
            raise m.bug("leak", None, f"data page pfn {pfn:#x} has refcount {refcount[pfn]} "
                        f"but {mapped_total.get(pfn, 0)} mappings and no pins left",
                        obj=f"data page pfn {pfn:#x}", keys=(("page", pfn),), pfns=(pfn,))
    assert all(kind[p] == PAGETABLE for p in reachable), "a linked table is not live"
