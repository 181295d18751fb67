"""UFFDIO_MOVE (agents/uffd.py) and munmap (agents/munmap.py): races D3 and D5 reproduce and
their fixes hold; a lone move moves; munmap frees exactly the tables no neighbour can use."""

from __future__ import annotations

import textwrap

import pytest

from ptsim.agents.munmap import munmap
from ptsim.agents.uffd import uffd_move
from ptsim.build import build_machine
from ptsim.engine import Engine
from ptsim.kernel_model import rcu as rcu_mod
from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.memory import DATA, FREE
from ptsim.kernel_model.pagetable import entry_pfn, index, present
from ptsim.kernel_model.sanitizers import check_end_of_run
from ptsim.scenario import load_scenario

from conftest import SCENARIOS, run_threads

D3 = str(SCENARIOS / "d03_ptlock_free_vs_uffd_move.toml")
D5 = str(SCENARIOS / "d05_uffd_move_dst_pmd_recheck.toml")

SRC = 0x7F0000000000
DST = 0x7F0000200000


def engine(path: str, variant: str | None = None, overrides=()) -> Engine:
    return Engine(load_scenario(path).resolve(variant, list(overrides)))


def write_scenario(tmp_path, body: str, name: str = "s.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def events(result, name: str) -> list[dict]:
    return [ev for ev in result.log if ev["event"] == name]


# -- D3: the split ptlock destroyed by pte_free_tlb ------------------------------------------------

def test_d3_immediate_ptlock_free_is_a_use_after_free_in_move_pages_pte():
    e = engine(D3, "ptlock-immediate")
    bugs = [r.bug for r in e.run_seeds(range(300), "pct") if r.bug]
    assert bugs and {b.kind for b in bugs} == {"pt-use-after-free"}
    for bug in bugs:
        assert bug.cpu == 1 and "move_pages_pte" in bug.backtrace
        # spin_lock of the destroyed lock; or spin_unlock, when CPU1 took it between CPU0's
        # unlock and pte_free_tlb and held it while pagetable_dtor freed it
        assert bug.access.split("(")[0] in ("spin_lock", "spin_unlock")
        assert bug.access.split("(", 1)[1].startswith("ptl(PTE")
        whats = [h["what"] for h in bug.history]
        assert "pagetable_dtor destroyed the ptlock" in whats
        assert all(h["cpu"] == 0 for h in bug.history)  # MADV_DONTNEED's reclaim destroyed it


def test_d3_rcu_ptlock_free_is_clean_and_the_recheck_retries():
    """Clean, and not for want of the race: in some schedules CPU1 locked the reclaimed
    (detached, still RCU-protected) table, saw the pmd changed and moved the page on retry."""
    e = engine(D3, "ptlock-rcu")
    retried = 0
    for seed in range(300):
        result = e.run_seed(seed, "pct", log=True)
        assert result.bug is None, result.bug.summary
        if events(result, "uffd_move_pmd_changed"):
            retried += 1
            assert [ev["ret"] for ev in events(result, "uffd_move_ret")] == [4096]
    assert retried > 0
    assert not [r for r in e.run_seeds(range(200), "random") if r.bug]


# -- D5: the missing dst pmd recheck ---------------------------------------------------------------

def test_d5_without_the_recheck_the_moved_pte_lands_in_a_freed_table():
    e = engine(D5, "no-recheck")
    found = 0
    for seed in range(300):
        result = e.run_seed(seed, "pct", log=True)
        if result.bug is None:
            continue
        found += 1
        bug = result.bug
        assert bug.kind == "nonempty-table-freed"
        table = bug.pfns[0]
        # The cause: CPU1 set the moved pte in that table after CPU0's reclaim unlinked it.
        clears = [ev for ev in result.log if ev["event"] == "pmd_clear" and ev["cpu"] == 0
                  and ev["old"].startswith(f"pfn {table:#x}")]
        sets = [ev for ev in events(result, "set_pte_at")
                if ev["cpu"] == 1 and ev["table"] == hex(table)]
        assert clears and sets and clears[0]["step"] < sets[0]["step"]
        assert not events(result, "uffd_move_pmd_changed")
    assert found > 0


def test_d5_with_the_recheck_the_move_retries_on_a_new_table():
    e = engine(D5, "recheck-pmd")
    retried = 0
    for seed in range(300):
        result = e.run_seed(seed, "pct", log=True)
        assert result.bug is None, result.bug.summary
        if events(result, "uffd_move_pmd_changed"):
            retried += 1
            # -EAGAIN, then pte_alloc installs a fresh table and the page moves into it.
            errs = [ev["err"] for ev in events(result, "move_pages_pte_done")]
            assert errs[-1] == 0 and -11 in errs
            assert events(result, "alloc_table")
    assert retried > 0
    assert not [r for r in e.run_seeds(range(200), "random") if r.bug]


def test_d5_bug_is_gone_with_the_recheck_on_the_same_schedules():
    """Same seeds, only the fix toggled: every schedule that lost the page now runs clean."""
    buggy = engine(D5, "no-recheck")
    fixed = engine(D5, "no-recheck", ["uffd_move_recheck_pmd=true"])
    seeds = [r.seed for r in buggy.run_seeds(range(200), "pct") if r.bug]
    assert seeds
    assert not [r for r in fixed.run_seeds(seeds, "pct") if r.bug]


# -- a lone UFFDIO_MOVE ----------------------------------------------------------------------------

MOVE_ALONE = """
    [scenario]
    name = "one UFFDIO_MOVE"
    cpus = 1

    [[vma]]
    start = 0x7f0000000000
    size = "4M"
    type = "anon"

    [[setup]]
    op = "touch"
    addr = 0x7f0000000000
    len = "8K"
    write = true

    [[agent]]
    cpu = 0
    op = "uffd_move"
    addr = 0x7f0000000000
    dst = 0x7f0000200000
    len = "8K"
"""


def _pte(m, mm, addr: int) -> int:
    pud = entry_pfn(m.mem.entries[mm.pgd][index(4, addr)])
    pmd = entry_pfn(m.mem.entries[pud][index(3, addr)])
    pmdval = m.mem.entries[pmd][index(2, addr)]
    if not present(pmdval):
        return 0
    return m.mem.entries[entry_pfn(pmdval)][index(1, addr)]


async def test_uffd_move_moves_the_folio(tmp_path):
    scn = load_scenario(write_scenario(tmp_path, MOVE_ALONE)).resolve(None, [])
    m = build_machine(scn)
    mm = m.mms["mm0"]
    folios = [entry_pfn(_pte(m, mm, SRC + off)) for off in (0, 4096)]
    assert all(m.mem.kind[f] == DATA for f in folios)
    assert (mm.rss, mm.nr_ptes) == (2, 1)

    async def mover(cpu):
        cpu.mm = mm
        await uffd_move(cpu, addr=SRC, dst=DST, len=8192)

    sched = await run_threads(m, {0: mover}, seed=0)
    assert sched.bug is None
    for off, folio in zip((0, 4096), folios):
        assert _pte(m, mm, SRC + off) == 0
        dst = _pte(m, mm, DST + off)
        assert present(dst) and entry_pfn(dst) == folio  # the same folio, not a copy
        assert m.mem.refcount[folio] == 1  # the pin taken under src_ptl was dropped
    assert (mm.rss, mm.nr_ptes) == (2, 2)  # rss unchanged; pte_alloc made the dst table
    rcu_mod.rcu_barrier(m)
    check_end_of_run(m)
    ret = [ev["ret"] for ev in m.log if ev["event"] == "uffd_move_ret"]
    assert ret == [8192]


def test_uffd_move_alone_passes_the_end_of_run_checks(tmp_path):
    e = engine(write_scenario(tmp_path, MOVE_ALONE))
    result = e.run_seed(0, log=True)
    assert result.bug is None
    assert result.stats["mm0"]["rss_kb"] == 8 and result.stats["mm0"]["nr_ptes"] == 2
    flushes = events(result, "flush_tlb_mm_range")
    assert [f["start"] for f in flushes] == [hex(SRC), hex(SRC + 4096)]  # ptep_clear_flush


@pytest.mark.parametrize("config", [[], ["split_ptlocks=false"]])
def test_uffd_move_within_one_pte_table_takes_its_lock_once(tmp_path, config):
    """double_pt_lock: src and dst in one table share a ptl (and without split ptlocks every
    ptl is mm->page_table_lock): it is taken once, not twice (that would be a self-deadlock)."""
    body = MOVE_ALONE.replace("dst = 0x7f0000200000", "dst = 0x7f0000010000")
    result = engine(write_scenario(tmp_path, body), overrides=config).run_seed(0, log=True)
    assert result.bug is None
    assert [ev["ret"] for ev in events(result, "uffd_move_ret")] == [8192]
    assert result.stats["mm0"]["nr_ptes"] == 1 and result.stats["mm0"]["rss_kb"] == 8
    locks = [ev for ev in events(result, "spin_lock") if ev["func"] == "double_pt_lock"]
    assert len(locks) == 2  # one per page moved


async def test_uffd_move_onto_a_mapped_dst_fails_with_eexist(tmp_path):
    body = MOVE_ALONE.replace('len = "8K"\n    write = true',
                              'len = "8K"\n    write = true\n\n    [[setup]]\n    op = "touch"\n'
                              '    addr = 0x7f0000200000\n    write = true')
    scn = load_scenario(write_scenario(tmp_path, body)).resolve(None, [])
    m = build_machine(scn)
    mm = m.mms["mm0"]
    before = (_pte(m, mm, SRC), _pte(m, mm, DST))

    async def mover(cpu):
        cpu.mm = mm
        await uffd_move(cpu, addr=SRC, dst=DST, len=4096)

    await run_threads(m, {0: mover}, seed=0)
    assert [ev["ret"] for ev in m.log if ev["event"] == "uffd_move_ret"] == [-17]
    assert (_pte(m, mm, SRC), _pte(m, mm, DST)) == before


async def test_uffd_move_of_the_zero_page(tmp_path):
    body = MOVE_ALONE.replace('len = "8K"\n    write = true', 'len = "4K"')
    scn = load_scenario(write_scenario(tmp_path, body)).resolve(None, [])
    m = build_machine(scn)
    mm = m.mms["mm0"]

    async def mover(cpu):
        cpu.mm = mm
        await uffd_move(cpu, addr=SRC, dst=DST, len=4096)

    sched = await run_threads(m, {0: mover}, seed=0)
    assert sched.bug is None
    assert _pte(m, mm, SRC) == 0 and entry_pfn(_pte(m, mm, DST)) == 1  # ZERO_PFN
    rcu_mod.rcu_barrier(m)
    check_end_of_run(m)


# -- munmap ----------------------------------------------------------------------------------------

MUNMAP_BASE = """
    [scenario]
    name = "munmap"
    cpus = 2

    [[vma]]                       # A: 4 MB, two PTE tables
    start = 0x7f0000000000
    size = "4M"
    type = "anon"

    [[setup]]
    op = "touch"
    addr = 0x7f0000000000
    len = "16K"
    write = true

    [[setup]]
    op = "touch"
    addr = 0x7f00003ff000
    write = true
"""

NEIGHBOUR = """
    [[vma]]                       # B: in the same 1 GB (same PMD table), another 2 MB slot
    start = 0x7f0000800000
    size = "2M"
    type = "anon"

    [[setup]]
    op = "touch"
    addr = 0x7f0000800000
    write = true
"""

MUNMAP_A = """
    [[agent]]
    cpu = 0
    op = "munmap"
    addr = 0x7f0000000000
    len = "4M"
"""


@pytest.mark.parametrize("config", [[], ["table_free=semi_rcu"], ["table_free=page"],
                                    ["ptlock_free=immediate"], ["split_ptlocks=false"]])
def test_munmap_of_the_only_vma_frees_every_table(tmp_path, config):
    e = engine(write_scenario(tmp_path, MUNMAP_BASE + MUNMAP_A), overrides=config)
    before = e.fresh().stats()["mm0"]
    assert (before["nr_puds"], before["nr_pmds"], before["nr_ptes"]) == (1, 1, 2)
    for strategy in ("random", "pct"):
        for result in e.run_seeds(range(5), strategy):
            assert result.bug is None, result.bug.summary
            assert result.stats["mm0"] == {"vm_pte_kb": 0, "nr_ptes": 0, "nr_pmds": 0,
                                           "nr_puds": 0, "rss_kb": 0}


async def test_munmap_keeps_the_pmd_table_a_neighbour_uses(tmp_path):
    scn = load_scenario(write_scenario(tmp_path,
                                       MUNMAP_BASE + NEIGHBOUR + MUNMAP_A)).resolve(None, [])
    m = build_machine(scn)
    mm = m.mms["mm0"]
    pgde = m.mem.entries[mm.pgd][index(4, SRC)]
    pud = entry_pfn(pgde)
    pmd = entry_pfn(m.mem.entries[pud][index(3, SRC)])
    ptes = [entry_pfn(m.mem.entries[pmd][i]) for i in (0, 1)]
    b_pte = _pte(m, mm, 0x7F0000800000)

    async def unmapper(cpu):
        cpu.mm = mm
        await munmap(cpu, addr=SRC, len=4 << 20)

    sched = await run_threads(m, {0: unmapper}, seed=0)
    assert sched.bug is None
    assert [v.start for v in mm.vmas] == [0x7F0000800000]
    assert m.mem.entries[pmd][0] == m.mem.entries[pmd][1] == 0  # pmd_clear, no lock
    assert m.mem.entries[mm.pgd][index(4, SRC)] == pgde  # PUD and PMD tables stay
    assert _pte(m, mm, 0x7F0000800000) == b_pte  # B untouched
    rcu_mod.rcu_barrier(m)
    assert all(m.mem.kind[t] == FREE for t in ptes)
    assert (mm.nr_puds, mm.nr_pmds, mm.nr_ptes, mm.rss) == (1, 1, 1, 1)
    check_end_of_run(m)


def test_munmap_of_both_vmas_frees_the_upper_tables_at_the_last(tmp_path):
    second = MUNMAP_A.replace("0x7f0000000000", "0x7f0000800000").replace('"4M"', '"2M"')
    e = engine(write_scenario(tmp_path, MUNMAP_BASE + NEIGHBOUR + MUNMAP_A + second))
    for result in e.run_seeds(range(5), "random"):
        assert result.bug is None
        assert result.stats["mm0"]["vm_pte_kb"] == 0 and result.stats["mm0"]["rss_kb"] == 0
    result = e.run_seed(0, log=True)
    kinds = [ev["event"] for ev in result.log if ev["event"].endswith("_free_tlb")]
    # first munmap: A's two PTE tables; second: B's PTE table, then the PMD and PUD tables
    assert kinds == ["pte_free_tlb"] * 3 + ["pmd_free_tlb", "pud_free_tlb"]


def test_munmap_keeps_a_pte_table_shared_with_a_neighbour_in_the_same_2m(tmp_path):
    """free_pgd_range's floor/ceiling: A and B share one PTE table; unmapping either keeps it."""
    body = """
        [scenario]
        name = "shared PTE table"
        cpus = 1

        [[vma]]
        start = 0x7f0000000000
        size = "64K"
        type = "anon"

        [[vma]]
        start = 0x7f0000100000
        size = "64K"
        type = "anon"

        [[setup]]
        op = "touch"
        addr = 0x7f0000000000
        len = "8K"
        write = true

        [[setup]]
        op = "touch"
        addr = 0x7f0000100000
        write = true

        [[agent]]
        cpu = 0
        op = "munmap"
        addr = {addr}
        len = "64K"
    """
    for addr, rss_kb in (("0x7f0000000000", 4), ("0x7f0000100000", 8)):
        e = engine(write_scenario(tmp_path, body.replace("{addr}", addr), f"{addr}.toml"))
        result = e.run_seed(0, log=True)
        assert result.bug is None
        stats = result.stats["mm0"]
        assert (stats["nr_ptes"], stats["nr_pmds"], stats["nr_puds"]) == (1, 1, 1)
        assert stats["rss_kb"] == rss_kb
        assert not [ev for ev in result.log if ev["event"].endswith("_free_tlb")]


def test_munmap_concurrent_with_a_walker_of_the_same_range_is_clean(tmp_path):
    """pte_walker holds mmap_lock for reading, munmap takes it for writing: the walker sees the
    tables either all there or all gone, never a table being freed."""
    walker = """
        [[agent]]
        cpu = 1
        op = "pte_walker"
        addr = 0x7f0000000000
        len = "4M"
    """
    e = engine(write_scenario(tmp_path, MUNMAP_BASE + NEIGHBOUR + MUNMAP_A + walker))
    orders = set()
    for strategy in ("random", "pct"):
        for seed in range(150):
            result = e.run_seed(seed, strategy, log=True)
            assert result.bug is None, result.bug.summary
            assert result.stats["mm0"]["nr_ptes"] == 1
            reads = events(result, "read_ptes")
            detach = events(result, "vmas_detached")[0]["step"]
            orders.add(bool(reads) and reads[0]["step"] < detach)
    assert orders == {True, False}  # the walker ran before munmap in some, after in others


def test_munmap_of_part_of_a_vma_is_not_modelled(tmp_path):
    part = MUNMAP_A.replace('"4M"', '"2M"')
    e = engine(write_scenario(tmp_path, MUNMAP_BASE + part))
    with pytest.raises(BaseException) as exc:  # NotModelled, possibly inside trio's group
        e.run_seed(0)
    found = exc.value
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    assert isinstance(found, NotModelled) and "vma split" in str(found)


async def test_munmap_of_a_file_vma_unlinks_it_from_rmap_under_the_i_mmap_lock(tmp_path):
    body = """
        [scenario]
        name = "munmap of a file mapping"
        cpus = 1

        [[vma]]
        start = 0x7f0000000000
        size = "2M"
        type = "file"
        file = "f0"

        [[setup]]
        op = "touch"
        addr = 0x7f0000000000
        len = "8K"

        [[agent]]
        cpu = 0
        op = "munmap"
        addr = 0x7f0000000000
        len = "2M"
    """
    m = build_machine(load_scenario(write_scenario(tmp_path, body)).resolve(None, []))
    mm = m.mms["mm0"]
    assert mm.nr_ptes == 1

    async def unmapper(cpu):
        cpu.mm = mm
        await munmap(cpu, addr=SRC, len=2 << 20)

    sched = await run_threads(m, {0: unmapper}, seed=0)
    assert sched.bug is None
    names = [(ev["event"], ev.get("lock")) for ev in m.log]
    i = names.index(("down_write", "f0.i_mmap_rwsem"))
    assert names[i + 1][0] == "vma_interval_tree_remove"
    first_free = next(j for j, (ev, _) in enumerate(names) if ev == "pte_free_tlb")
    assert i < first_free  # hidden from rmap before its tables go
    rcu_mod.rcu_barrier(m)
    assert (mm.nr_ptes, mm.nr_pmds, mm.nr_puds, mm.rss) == (0, 0, 0, 0)
    check_end_of_run(m)  # the page cache still holds the file's pages
