"""THP faults and zaps, file and shmem mappings through the page cache, lazy-TLB CPUs."""

from __future__ import annotations

import collections

import pytest

from ptsim.engine import Engine
from ptsim.scenario import load_scenario, loads_scenario

from conftest import SCENARIOS

BASE = """
[scenario]
name = "t"
cpus = {cpus}

{config}

[[vma]]
start = 0x7f0000000000
size = "4M"
type = "{vtype}"
thp = {thp}
{file}

{body}
"""


def engine_for(body: str, cpus: int = 1, vtype: str = "anon", thp: bool = False,
               config: str = "", variant=None) -> Engine:
    text = BASE.format(cpus=cpus, vtype=vtype, thp=str(thp).lower(), body=body, config=config,
                       file='file = "f0"' if vtype != "anon" else "")
    return Engine(loads_scenario(text, "t.toml").resolve(variant))


def test_thp_write_fault_maps_a_huge_pmd_and_zap_frees_it():
    e = engine_for("""
[[agent]]
cpu = 0
do = [ { op = "touch", addr = 0x7f0000000000, len = "8K", write = true },
       { op = "madvise_dontneed", addr = 0x7f0000000000, len = "2M" } ]
""", thp=True)
    result = e.run_seed(0, log=True)
    assert result.bug is None
    events = [ev["event"] for ev in result.log]
    assert "set_pmd_at" in events and "pmdp_huge_get_and_clear_full" in events
    walks = [ev for ev in result.log if ev["event"] == "hw_walk"]
    assert walks[-1]["level"] == 2  # the second page hit the 2M translation or walked to the pmd
    stats = result.stats["mm0"]
    assert stats["nr_ptes"] == 0 and stats["rss_kb"] == 0  # the deposited table went with it


def test_thp_read_fault_maps_the_huge_zero_page_and_a_write_splits_it():
    e = engine_for("""
[[agent]]
cpu = 0
do = [ { op = "touch", addr = 0x7f0000000000 },
       { op = "touch", addr = 0x7f0000001000, write = true } ]
""", thp=True)
    result = e.run_seed(0, log=True)
    assert result.bug is None
    events = [ev["event"] for ev in result.log]
    assert "set_pmd_at" in events and "pmdp_huge_clear_flush" in events
    stats = result.stats["mm0"]
    assert stats["nr_ptes"] == 1 and stats["rss_kb"] == 4  # one page copied, the rest zero pages


def test_thp_disabled_vma_gets_ptes_and_madvise_hugepage_enables_thp():
    e = engine_for("""
[[agent]]
cpu = 0
do = [ { op = "touch", addr = 0x7f0000000000, write = true },
       { op = "madvise_hugepage", addr = 0x7f0000000000, len = "4M" },
       { op = "touch", addr = 0x7f0000200000, write = true } ]
""")
    result = e.run_seed(0)
    assert result.bug is None
    stats = result.stats["mm0"]
    assert stats["nr_ptes"] == 2  # a PTE table, and the deposit under the huge pmd
    assert stats["rss_kb"] == 4 + 2048


@pytest.mark.parametrize("vtype", ["file", "shmem"])
def test_file_pages_stay_in_the_page_cache_after_a_zap(vtype):
    e = engine_for("""
[[agent]]
cpu = 0
do = [ { op = "touch", addr = 0x7f0000000000, len = "16K" },
       { op = "touch", addr = 0x7f0000001000, write = true },
       { op = "madvise_dontneed", addr = 0x7f0000000000, len = "2M" },
       { op = "touch", addr = 0x7f0000000000 } ]
""", vtype=vtype)
    result = e.run_seed(0, log=True)
    assert result.bug is None  # end-of-run refcounts include the page cache's reference
    adds = [ev for ev in result.log if ev["event"] == "add_to_page_cache"]
    assert [ev["pgoff"] for ev in adds] == [0, 1, 2, 3]  # the refault found page 0 cached
    assert result.stats["mm0"]["rss_kb"] == 4


def test_two_vmas_of_one_file_share_its_pages():
    text = """
[scenario]
name = "t"
cpus = 2

[[vma]]
start = 0x7f0000000000
size = "2M"
type = "shmem"
file = "f0"

[[vma]]
start = 0x7f1000000000
size = "2M"
type = "shmem"
file = "f0"

[[agent]]
cpu = 0
op = "touch"
addr = 0x7f0000000000
write = true

[[agent]]
cpu = 1
op = "touch"
addr = 0x7f1000000000
"""
    e = Engine(loads_scenario(text, "t.toml").resolve())
    for seed in range(20):
        result = e.run_seed(seed, log=True)
        assert result.bug is None
        assert len([ev for ev in result.log if ev["event"] == "add_to_page_cache"]) == 1
        accesses = {ev["pfn"] for ev in result.log if ev["event"] == "user_access"}
        assert len(accesses) == 1


def test_d11_lazy_cpu_speculative_walk_needs_the_lazy_flush():
    sf = load_scenario(SCENARIOS / "d11_lazy_tlb_speculative_walk.toml")
    buggy = Engine(sf.resolve("skip-lazy"))
    kinds = collections.Counter(r.bug.kind for r in buggy.run_seeds(range(60)) if r.bug)
    assert set(kinds) == {"tlb-use-after-free"}
    fixed = Engine(sf.resolve("flush-lazy"))
    results = fixed.run_seeds(range(200))
    assert not [r for r in results if r.bug]
    # The lazy CPU really was interrupted by the table-freeing flush in those schedules.
    log = fixed.run_seed(0, log=True).log
    assert [ev for ev in log if ev["event"] == "flush_tlb_func" and ev["cpu"] == 1]


def test_lazy_cpu_is_skipped_by_flushes_that_free_no_tables():
    """should_flush_tlb(): a flush without freed tables leaves a lazy CPU's stale leaf entries
    alone, and that is no bug (SPEC: tlb-use-after-free)."""
    text = """
[scenario]
name = "t"
cpus = 2

[[vma]]
start = 0x7f0000000000
size = "4M"
type = "anon"

[[setup]]
cpu = 1
op = "touch"
addr = 0x7f0000000000
len = "16K"
write = true

[[agent]]
cpu = 0
op = "madvise_dontneed"
addr = 0x7f0000000000
len = "16K"

[[agent]]
cpu = 1
op = "lazy_tlb"
steps = 40
"""
    e = Engine(loads_scenario(text, "t.toml").resolve())
    for seed in range(40):
        result = e.run_seed(seed, log=True)
        assert result.bug is None
        assert not [ev for ev in result.log if ev["event"] == "flush_tlb_func" and ev["cpu"] == 1
                    and any(x["event"] == "enter_lazy_tlb" and x["step"] < ev["step"]
                            for x in result.log)]
