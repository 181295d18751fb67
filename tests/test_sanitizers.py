"""Each sanitizer fires at the access, names the culprit, and stays quiet on legal accesses."""

from __future__ import annotations

import pytest

from ptsim.kernel_model.errors import BugFound
from ptsim.kernel_model.memory import ZERO_PFN
from ptsim.kernel_model.mm import Mm
from ptsim.kernel_model.pagetable import index, mk_pte, mk_table_entry
from ptsim.kernel_model.pgalloc import folio_put, free_table_page
from ptsim.kernel_model.sanitizers import check_end_of_run
from ptsim.kernel_model.tlb import hw_access

from conftest import bare_machine, run_threads

ADDR = 0x7F0000000000


def machine_with_page():
    """mm0 with pgd -> pud -> pmd -> pte -> one data page at ADDR, accounted as the kernel would."""
    m = bare_machine()
    setup = (None, "setup", 0)
    pgd = m.mem.alloc_table(4, "mm0", setup)
    mm = m.mms["mm0"] = Mm("mm0", pgd)
    pud, pmd, pte = (m.mem.alloc_table(level, "mm0", setup) for level in (3, 2, 1))
    m.mem.entries[pgd][index(4, ADDR)] = mk_table_entry(pud)
    m.mem.entries[pud][index(3, ADDR)] = mk_table_entry(pmd)
    m.mem.entries[pmd][index(2, ADDR)] = mk_table_entry(pte)
    page = m.mem.alloc_data(setup)
    m.mem.entries[pte][index(1, ADDR)] = mk_pte(page, True)
    mm.nr_puds = mm.nr_pmds = mm.nr_ptes = mm.rss = 1
    mm.cpumask = {0, 1}
    return m, mm, (pgd, pud, pmd, pte), page


def test_consistent_machine_passes_the_end_of_run_checks():
    m, *_ = machine_with_page()
    check_end_of_run(m)


async def test_user_access_through_a_stale_tlb_entry_to_a_freed_page():
    m, mm, tables, page = machine_with_page()
    pte = tables[3]

    async def user(cpu):
        assert await hw_access(cpu, mm, ADDR, write=True)  # fills the TLB
        # Someone clears the pte and frees the page without flushing this CPU's TLB.
        m.mem.entries[pte][index(1, ADDR)] = 0
        folio_put(m, page, (0, "buggy_zap", m.step))
        await hw_access(cpu, mm, ADDR, write=False)

    sched = await run_threads(m, {1: user}, 0)
    bug = sched.bug
    assert bug.kind == "tlb-use-after-free" and bug.cpu == 1
    assert "stale TLB entry" in bug.summary and bug.history[0]["func"] == "buggy_zap"


async def test_hardware_walk_through_a_stale_pde_into_a_freed_table():
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()

    async def user(cpu):
        assert await hw_access(cpu, mm, ADDR, write=True)  # fills TLB and paging-structure caches
        cpu.tlb("mm0").pte.clear()  # the leaf entry goes, the PDE cache entry stays
        m.mem.entries[pmd][index(2, ADDR)] = 0
        m.mem.entries[pte][index(1, ADDR)] = 0
        free_table_page(m, pte, (0, "buggy_free", m.step))
        await hw_access(cpu, mm, ADDR, write=False)

    sched = await run_threads(m, {1: user}, 0)
    assert sched.bug.kind == "tlb-use-after-free"
    assert "stale paging-structure cache entry" in sched.bug.summary


def test_double_free_is_an_invalid_free():
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    m.mem.entries[pte][index(1, ADDR)] = 0
    free_table_page(m, pte, (0, "first", 1))
    with pytest.raises(BugFound) as exc:
        free_table_page(m, pte, (1, "second", 2))
    assert exc.value.finding.kind == "invalid-free" and "double free" in exc.value.finding.summary
    with pytest.raises(BugFound) as exc:
        free_table_page(m, page, (1, "confused", 3))
    assert exc.value.finding.kind == "invalid-free"


def test_freeing_a_table_with_present_entries():
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    with pytest.raises(BugFound) as exc:
        free_table_page(m, pte, (0, "early_free", 1))
    assert exc.value.finding.kind == "nonempty-table-freed"


@pytest.mark.parametrize("damage", ["nr_ptes", "rss", "orphan table", "page ref"])
def test_leaks_and_accounting_errors(damage):
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    if damage == "nr_ptes":
        mm.nr_ptes = 2
    elif damage == "rss":
        mm.rss = 0
    elif damage == "orphan table":
        m.mem.alloc_table(1, "mm0", (0, "lost", 1))
    else:
        m.mem.refcount[page] += 1  # a pin never released
    with pytest.raises(BugFound) as exc:
        check_end_of_run(m)
    assert exc.value.finding.kind == "leak"


@pytest.mark.parametrize("damage", [None, "rss", "page ref"])
def test_a_pte_table_of_many_equal_entries_is_accounted_as_entry_by_entry(damage):
    """The end-of-run walk counts a table of few distinct values (the zero page mapped over
    and over, as split_huge_zero_page_pmd leaves it) value by value: the references and RSS
    must be those of every entry."""
    m, mm, (pgd, pud, pmd, pte), page = machine_with_page()
    entries = m.mem.entries[pte]
    for i in range(1, 301):
        entries[i] = mk_pte(ZERO_PFN, False)  # no reference, no RSS
    for i in range(301, 341):
        entries[i] = entries[index(1, ADDR)]  # the data page 40 more times
    m.mem.refcount[page] += 40
    mm.rss += 40
    if damage == "rss":
        mm.rss -= 1
    elif damage == "page ref":
        m.mem.refcount[page] -= 1
    if damage is None:
        check_end_of_run(m)
        return
    with pytest.raises(BugFound) as exc:
        check_end_of_run(m)
    assert exc.value.finding.kind == "leak"
