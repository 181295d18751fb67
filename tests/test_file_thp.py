"""File and shmem THP: a fault in a thp = true file or shmem vma maps a PMD-sized page-cache folio
by a huge pmd (finish_fault -> do_set_pmd); zap, munmap and a write fault handle file huge pmds;
madvise_collapse (collapse_file, then try_collapse_pte_mapped_thp with install_pmd ->
set_huge_pmd); and catalogue D12 run through the kernel's real entry, MADV_COLLAPSE."""

from __future__ import annotations

import pytest

import ptsim

from conftest import SCENARIOS

D12 = str(SCENARIOS / "d12_collapse_pte_mapped_thp_ptl_eq_pml.toml")
BASE = 0x7F0000000000

TEXT = """
[scenario]
name = "t"
cpus = 1

[[vma]]
start = 0x7f0000000000
size = "4M"
type = "{vtype}"
thp = {thp}
file = "f0"

[[agent]]
cpu = 0
do = [ {ops} ]
"""


def run(ops: str, vtype: str = "shmem", thp: bool = True):
    sc = ptsim.loads(TEXT.format(vtype=vtype, thp=str(thp).lower(), ops=ops), "t.toml")
    r = sc.variant().run(seed=0)
    return r, r.events()


def names(log, event):
    return [e for e in log if e["event"] == event]


@pytest.mark.parametrize("vtype", ["shmem", "file"])
def test_fault_maps_a_pmd_sized_page_cache_folio_by_a_huge_pmd(vtype):
    r, log = run('{ op = "touch", addr = 0x7f0000001000 }', vtype)
    assert r.bug is None  # end-of-run: the pmd's reference and the page cache's 512 match
    adds = names(log, "add_to_page_cache")
    assert len(adds) == 1 and adds[0]["order"] == 9 and adds[0]["pgoff"] == 0
    sets = names(log, "set_pmd_at")
    assert [e["func"] for e in sets] == ["do_set_pmd"] and "huge" in sets[0]["val"]
    assert not names(log, "pmd_populate")  # no PTE table, and none deposited (x86)
    assert r.stats["mm0"]["rss_kb"] == 2048 and r.stats["mm0"]["nr_ptes"] == 0


def test_thp_false_keeps_the_4k_path():
    r, log = run('{ op = "touch", addr = 0x7f0000001000 }', thp=False)
    assert r.bug is None
    assert "order" not in names(log, "add_to_page_cache")[0]
    assert [e["func"] for e in names(log, "pmd_populate")] == ["pmd_install"]
    assert r.stats["mm0"]["rss_kb"] == 4 and r.stats["mm0"]["nr_ptes"] == 1


@pytest.mark.parametrize("unmap", [
    '{ op = "madvise_dontneed", addr = 0x7f0000000000, len = "4M" }',
    '{ op = "munmap", addr = 0x7f0000000000, len = "4M" }',
])
def test_zap_and_munmap_of_file_huge_pmds_leave_no_leak(unmap):
    r, log = run('{ op = "touch", addr = 0x7f0000000000 }, '
                 '{ op = "touch", addr = 0x7f0000200000, write = true }, ' + unmap)
    assert r.bug is None  # no leak: rss, nr_ptes, refcounts (the page cache keeps its own)
    zaps = names(log, "pmdp_huge_get_and_clear_full")
    assert [e["func"] for e in zaps] == ["zap_huge_pmd", "zap_huge_pmd"]
    assert r.stats["mm0"]["rss_kb"] == 0 and r.stats["mm0"]["nr_ptes"] == 0


def test_write_to_a_read_only_file_pmd_and_a_partial_zap_unmap_it():
    r, log = run('{ op = "touch", addr = 0x7f0000000000 }, '
                 '{ op = "touch", addr = 0x7f0000001000, write = true }, '
                 '{ op = "madvise_dontneed", addr = 0x7f0000000000, len = "4K" }, '
                 '{ op = "touch", addr = 0x7f0000002000 }')
    assert r.bug is None
    splits = names(log, "pmdp_huge_clear_flush")
    assert [e["func"] for e in splits] == ["__split_huge_pmd_file"] * 2
    sets = [e["val"] for e in names(log, "set_pmd_at")]
    assert sets == ["pfn 0x5 (huge)", "pfn 0x5 (huge,rw)", "pfn 0x5 (huge)"]
    assert r.stats["mm0"]["rss_kb"] == 2048


def test_madvise_collapse_collapses_small_pages_and_installs_the_pmd():
    r, log = run('{ op = "touch", addr = 0x7f0000001000, len = "16K" }, '
                 '{ op = "madvise_collapse", addr = 0x7f0000000000, len = "2M" }, '
                 '{ op = "touch", addr = 0x7f0000003000 }', thp=False)
    assert r.bug is None
    assert [e["result"] for e in names(log, "collapse_file")] == ["SCAN_PTE_MAPPED_HUGEPAGE"]
    assert len(names(log, "retract_table")) == 1
    assert len(names(log, "set_huge_pmd")) == 1
    assert [e["result"] for e in names(log, "madvise_collapse")] == ["SCAN_SUCCEED"]
    assert r.stats["mm0"]["rss_kb"] == 2048 and r.stats["mm0"]["nr_ptes"] == 0


def test_madvise_collapse_of_a_pte_mapped_thp_takes_steps_1_to_5():
    """D12's state, alone: the PTE-mapped folio's table goes (step 4) and set_huge_pmd maps it."""
    r = ptsim.load(D12).variant("madvise-collapse-recheck-always").run(seed=0, strategy="random")
    log = r.events()
    steps = [e["event"] for e in log if e["event"] in (
        "pte_mapped_thp_cleared", "pte_mapped_thp_retracted", "set_huge_pmd")]
    assert r.bug is None
    assert steps in (["pte_mapped_thp_cleared", "pte_mapped_thp_retracted", "set_huge_pmd"],
                     ["set_huge_pmd"], [])  # [] / set_huge_pmd only: the zap came first


def test_d12_real_sequence_without_the_recheck_frees_pfn_0_and_maps_the_folio():
    """MADV_COLLAPSE against MADV_DONTNEED with one page_table_lock: the same invalid-free of
    pfn 0 as the hand-made sequence (the run ends at the RCU callback; when step 5 comes
    before it, set_huge_pmd installs a huge pmd where reclaim cleared the table)."""
    v = ptsim.load(D12).variant("madvise-collapse-no-split-ptlocks")
    s = v.stress(runs=300, seed=0, strategy="pct")
    assert [b.kind for b in s.bugs] == ["invalid-free"]
    r = v.replay(s.bugs[0].token)
    assert "pfn 0x0" in r.bug.summary
    log = r.events()
    order = [e["event"] for e in log if e["event"] in (
        "pte_mapped_thp_cleared", "pmd_clear", "pte_mapped_thp_no_recheck", "set_huge_pmd")]
    assert order[:3] == ["pte_mapped_thp_cleared", "pmd_clear", "pte_mapped_thp_no_recheck"]
    assert order[3:] in ([], ["set_huge_pmd"])
    shrunk = v.shrink(s.bugs[0].token)
    assert shrunk.bug.kind == "invalid-free"
    assert [e["event"] for e in shrunk.events() if e["event"] == "set_huge_pmd"] == ["set_huge_pmd"]


def test_d12_real_sequence_with_the_recheck_is_clean():
    v = ptsim.load(D12).variant("madvise-collapse-recheck-always")
    assert not v.stress(runs=200, seed=0, strategy="pct").bugs
    e = v.explore(preemptions=1)
    assert e.complete and not e.bugs
