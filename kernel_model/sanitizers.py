"""End-of-run checks: accounting and leaks, after every grace period and callback has run.

The per-access checks (use-after-free, invalid-free, nonempty-table-freed) sit at the access
itself, in pgtable.py, locks.py, tlb.py and pgalloc.py, as KASAN's do.
"""

from __future__ import annotations

from itertools import compress, islice

from .memory import DATA, PAGETABLE, TABLE_INDICES, ZERO
from .pagetable import _PAGE_PRESENT, PAGE_SHIFT, entry_pfn, leaf
from .registry import bug_kind

# The end-of-run walk counts a PTE table value by value when each distinct value stands for at
# least this many of its entries on average (so a table with fewer entries never does).
ENTRIES_PER_VALUE = 16
_FRAMES: list = [()]  # as TABLE_INDICES, for frame numbers: 0..n-1, grown as memory grows


def _indices(n: int) -> tuple:
    """0..n-1 or more, as held ints (compress stops at the shorter of its two inputs)."""
    frames = _FRAMES[0]
    if len(frames) < n:
        frames = _FRAMES[0] = tuple(range(max(n, 2 * len(frames))))
    return frames

LEAK = bug_kind(
    "leak",
    "at the end of a schedule, a table or page that no one can free (nr_ptes, RSS or page "
    "reference accounting out of step)")


def _walk(m, mm):
    """The tables reachable from mm's pgd (deposited THP tables count as PTE tables, as
    nr_ptes counts them), the references its mappings hold per folio, and its RSS in pages."""
    mem = m.mem
    entries = mem.entries
    tables = {4: [mm.pgd], 3: [], 2: [], 1: []}
    refs: dict[int, int] = {}  # a plain dict: Counter's set-up and update are Python code
    rss = 0
    for level in (4, 3, 2):
        for table in tables[level]:
            table_entries = entries[table]
            # Only the non-zero entries, found at C speed, and no further than the last of
            # them: list.count tells how many there are (0 is one object, so an identity test
            # per entry), and islice stops compress there. Most of every table is empty, many
            # a table holds nothing (a PMD table whose PTE table was freed), and an address
            # space's one PUD table sits at the PGD's index 254 or 255.
            nonzero = len(table_entries) - table_entries.count(0)
            if not nonzero:
                continue
            for idx in islice(compress(TABLE_INDICES, table_entries), nonzero):
                val = table_entries[idx]
                if not val & _PAGE_PRESENT:
                    continue
                if level == 2:
                    tables[1].extend(m.deposits.get((table, idx), ()))
                    if leaf(val):
                        head = entry_pfn(val)
                        refs[head] = refs.get(head, 0) + 1
                        rss += 0 if mem.is_zero(head) else 512
                        continue
                tables[level - 1].append(entry_pfn(val))
    for table in tables[1]:
        table_entries = entries[table]
        nonzero = len(table_entries) - table_entries.count(0)
        if not nonzero:
            continue
        distinct = set(table_entries) if nonzero >= ENTRIES_PER_VALUE else set()
        distinct.discard(0)
        if distinct and len(distinct) * ENTRIES_PER_VALUE <= nonzero:
            # A table of many equal entries (split_huge_zero_page_pmd maps the zero page 512
            # times, and most entries of a D9 schedule's last PTE table are those): each value
            # once, its entries counted at C speed.
            for val in distinct:
                if val & _PAGE_PRESENT:
                    pfn = val >> PAGE_SHIFT
                    if mem.kind[pfn] != ZERO:
                        n = table_entries.count(val)
                        folio = mem.folio(pfn)
                        refs[folio] = refs.get(folio, 0) + n
                        rss += n
        else:
            for val in islice(filter(None, table_entries), nonzero):
                if val & _PAGE_PRESENT:
                    pfn = val >> PAGE_SHIFT
                    if mem.kind[pfn] != ZERO:
                        folio = mem.folio(pfn)
                        refs[folio] = refs.get(folio, 0) + 1
                        rss += 1
    return tables, refs, rss


def check_end_of_run(m) -> None:
    mem = m.mem
    reachable: set[int] = set()
    mapped_total: dict[int, int] = {}
    for mapping in m.files.values():
        # The page cache holds one reference per page it caches (folio_nr_pages for a THP).
        for p in mapping.pages.values():
            folio = mem.folio(p)
            mapped_total[folio] = mapped_total.get(folio, 0) + 1
    for mm in m.mms.values():
        tables, refs, rss = _walk(m, mm)
        for level_tables in tables.values():
            reachable.update(level_tables)
        if mapped_total:
            for folio, n in refs.items():
                mapped_total[folio] = mapped_total.get(folio, 0) + n
        else:
            mapped_total = refs
        for level, counter in ((1, "nr_ptes"), (2, "nr_pmds"), (3, "nr_puds")):
            held = len(tables[level])
            counted = getattr(mm, counter)
            if held != counted:
                raise m.bug(LEAK, None, f"{mm.name}: {counter} is {counted} but {held} "
                            f"{('PTE', 'PMD', 'PUD')[level - 1]} tables are linked in",
                            obj=f"{mm.name}.{counter}")
        if rss != mm.rss:
            raise m.bug(LEAK, None, f"{mm.name}: RSS counter is {mm.rss} pages but "
                        f"{rss} pages are mapped", obj=f"{mm.name}.rss")
    for pfn in mem.entries:
        if pfn not in reachable:
            raise m.bug(LEAK, None, f"{mem.describe(pfn)} is allocated but linked into no "
                        "address space and queued for no free", obj=mem.describe(pfn),
                        keys=(("pt", pfn),), pfns=(pfn,))
    kind, refcount = mem.kind, mem.refcount
    # Only a frame with references, or one mappings refer to, can be out of step: a THP's 511
    # tails (DATA, count 0, unmapped) are skipped at C speed, in pfn order as before.
    held = compress(_indices(len(refcount)), refcount)
    for pfn in sorted(mapped_total.keys() | held) if mapped_total else held:
        if kind[pfn] == DATA and refcount[pfn] != mapped_total.get(pfn, 0):
            raise m.bug(LEAK, None, f"data page pfn {pfn:#x} has refcount {refcount[pfn]} "
                        f"but {mapped_total.get(pfn, 0)} references from mappings and the page "
                        "cache, and no pins left",
                        obj=f"data page pfn {pfn:#x}", keys=(("page", pfn),), pfns=(pfn,))
    assert all(kind[p] == PAGETABLE for p in reachable), "a linked table is not live"
