"""mmu_gather as the kernel has it (issue 13): the mmu_gather_batch_full fault (force_flush and
force_break in zap_pte_range), any_skipped with guard markers (madvise_guard_install), and
mm_tlb_flush_nested in tlb_finish_mmu."""

from __future__ import annotations

from ptsim.engine import Engine
from ptsim.scenario import load_scenario

from conftest import SCENARIOS

D2 = str(SCENARIOS / "d02_nonempty_reclaim_after_break.toml")
BASE = 0x7f0000000000


def _scenario(tmp_path, name: str, body: str, cpus: int = 1, kernel: str = "6.17") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[scenario]\nname = "{name}"\nkernel = "{kernel}"\ncpus = {cpus}\n'
                    f'max_steps = 50000\n\n' + body)
    return str(path)


def _vma(size: str = "4M") -> str:
    return f'[[vma]]\nstart = {BASE:#x}\nsize = "{size}"\ntype = "anon"\n\n'


def _op(kind: str, cpu: int, op: str, addr: int, len: str | None = None, **kw) -> str:
    text = f'[[{kind}]]\ncpu = {cpu}\nop = "{op}"\naddr = {addr:#x}\n'
    if len is not None:
        text += f'len = "{len}"\n'
    for k, v in kw.items():
        text += f"{k} = {str(v).lower()}\n"
    return text + "\n"


def engine(path: str, *overrides: str, variant: str | None = None) -> Engine:
    return Engine(load_scenario(path).resolve(variant, list(overrides)))


def _ev(log, name: str, **fields):
    return [e for e in log if e["event"] == name
            and all(e.get(k) == v for k, v in fields.items())]


def _first_step(log, name: str, **fields) -> int:
    return _ev(log, name, **fields)[0]["step"]


# -- mmu_gather_batch_full ------------------------------------------------------------------------

def _dontneed_scenario(tmp_path, size: str, touched: list[tuple[int, str]]) -> str:
    body = _vma(size)
    for addr, length in touched:
        body += _op("setup", 0, "touch", addr, length, write=True)
    body += _op("agent", 0, "madvise_dontneed", BASE, size)
    return _scenario(tmp_path, "dontneed", body)


def test_batch_full_forces_a_flush_under_ptl_and_frees_each_folio_mid_zap(tmp_path):
    path = _dontneed_scenario(tmp_path, "2M", [(BASE, "32K")])
    log = engine(path, "faults.mmu_gather_batch_full=1.0").run_seed(0, log=True).log
    full = _ev(log, "mmu_gather_batch_full")
    clears = _ev(log, "ptep_get_and_clear")
    frees = _ev(log, "free_folio")
    assert len(full) == len(clears) == len(frees) == 8
    for i, ev in enumerate(full):
        # tlb_flush_mmu_tlbonly while the PTE lock is held, then the unlock, then the folio
        # is freed (tlb_flush_mmu), all before the next entry is zapped
        after = [e for e in log if e["step"] >= ev["step"]]
        names = [e["event"] for e in after]
        assert names.index("flush_tlb_mm_range") < names.index("spin_unlock") \
            < names.index("free_folio")
        if i + 1 < len(clears):
            assert frees[i]["step"] < clears[i + 1]["step"]
    assert len(_ev(log, "zap_force_break")) == 8
    # The default (probability 0): one flush, in tlb_finish_mmu, after every entry is cleared
    log0 = engine(path).run_seed(0, log=True).log
    assert not _ev(log0, "mmu_gather_batch_full")
    assert len(_ev(log0, "flush_tlb_mm_range")) == 1
    last_clear = _ev(log0, "ptep_get_and_clear")[-1]["step"]
    assert all(e["step"] > last_clear for e in _ev(log0, "free_folio"))


def test_batch_full_break_sends_the_table_to_the_slow_path(tmp_path):
    """force_break clears direct_reclaim (6.14 after the Feb 2025 fix): the table is reclaimed
    by try_to_free_pte's rescan, never by the fast path."""
    path = _dontneed_scenario(tmp_path, "2M", [(BASE, "8K")])
    result = engine(path, "faults.mmu_gather_batch_full=1.0").run_seed(0, log=True)
    assert result.bug is None
    stacks = [e["stack"] for e in _ev(result.log, "pmd_clear")]
    assert len(stacks) == 1 and "try_to_free_pte" in stacks[0]
    stacks0 = [e["stack"] for e in _ev(engine(path).run_seed(0, log=True).log, "pmd_clear")]
    assert len(stacks0) == 1 and "try_get_and_clear_pmd" in stacks0[0]


def test_tables_queued_mid_zap_are_freed_by_that_flush(tmp_path):
    """The first PTE table is reclaimed into the gather's table batch; the full page batch met
    in the second table flushes it (tlb_flush_mmu -> tlb_table_flush -> call_rcu) before the
    zap goes on, not in tlb_finish_mmu."""
    path = _dontneed_scenario(tmp_path, "4M", [(BASE, "8K"), (BASE + (2 << 20), "8K")])
    log = engine(path, "faults.mmu_gather_batch_full=1.0").run_seed(0, log=True).log
    queued = _ev(log, "pte_free_tlb")
    assert len(queued) == 2
    first_table_queued = queued[0]["step"]
    table_flush = [e for e in _ev(log, "call_rcu", cb="tlb_remove_table_rcu")
                   if e["step"] > first_table_queued][0]["step"]
    clears = [e["step"] for e in _ev(log, "ptep_get_and_clear")]
    later_clears = [s for s in clears if s > first_table_queued]
    assert later_clears and table_flush < later_clears[-1]  # mid-zap, in the second table
    freed = _ev(log, "free_table", pfn=queued[0]["pfn"])
    assert freed and freed[0]["step"] > table_flush
    # Without the fault, the batch goes to call_rcu only in tlb_finish_mmu, after every clear
    log0 = engine(path).run_seed(0, log=True).log
    rcu0 = _ev(log0, "call_rcu", cb="tlb_remove_table_rcu")
    assert len(rcu0) == 1 and rcu0[0]["step"] > _ev(log0, "ptep_get_and_clear")[-1]["step"]


def test_d2_is_found_through_a_full_batch_alone():
    """D2's other trigger: with need_resched off, a full batch drops ptl mid-table and the
    before-fix fast path frees the table CPU1 refilled; the fixed code keeps it."""
    faults = ("faults.need_resched=0", "faults.mmu_gather_batch_full=0.3")
    buggy = engine(D2, *faults, variant="before-fix").run_seeds(range(150))
    assert any(r.bug and r.bug.kind == "nonempty-table-freed" for r in buggy)
    assert not any(r.bug for r in engine(D2, "faults.need_resched=0", variant="before-fix")
                   .run_seeds(range(150)))
    fixed = engine(D2, *faults, variant="rescan-after-break").run_seeds(range(150))
    assert not any(r.bug for r in fixed)


# -- guard markers and any_skipped ---------------------------------------------------------------

def _guard_scenario(tmp_path, second_agent: str = "touch") -> str:
    body = _vma("4M")
    body += _op("setup", 0, "touch", BASE, "32K", write=True)
    body += _op("setup", 0, "touch", BASE + (2 << 20), "32K", write=True)
    body += _op("setup", 0, "madvise_guard_install", BASE + 0x10000, "8K")
    if second_agent == "munmap":
        body += _op("agent", 0, "munmap", BASE, "4M")
    else:
        body += _op("agent", 0, "madvise_dontneed", BASE, "4M")
        body += _op("agent", 0, "touch", BASE + 0x10000, write=True)
    return _scenario(tmp_path, "guard", body)


def test_a_guard_marker_keeps_its_table_and_an_empty_table_is_reclaimed(tmp_path):
    result = engine(_guard_scenario(tmp_path)).run_seed(0, log=True)
    assert result.bug is None and not result.hazards
    log = result.log
    skipped = _ev(log, "zap_skip_marker")
    assert [e["idx"] for e in skipped] == [16, 17]
    guarded_table = skipped[0]["table"]
    freed = [e["pfn"] for e in _ev(log, "pte_free_tlb")]
    assert len(freed) == 1 and freed[0] != guarded_table  # the second table only
    assert not _ev(log, "clear_not_present_full_ptes")
    # the table with the markers was not even offered to reclaim (can_reclaim_pt false)
    assert len(_ev(log, "pmd_clear")) == 1
    # a user access to the guard page: SIGSEGV, the marker stays
    segv = _ev(log, "SIGSEGV")
    assert len(segv) == 1
    assert [e["marker"] for e in _ev(log, "handle_pte_marker")] == ["guard"]
    assert not _ev(log, "alloc_folio")


def test_munmap_drops_guard_markers_and_frees_the_table(tmp_path):
    result = engine(_guard_scenario(tmp_path, "munmap")).run_seed(0, log=True)
    assert result.bug is None
    assert len(_ev(result.log, "clear_not_present_full_ptes")) == 2
    assert not _ev(result.log, "zap_skip_marker")


def test_guard_install_zaps_populated_entries_and_retries(tmp_path):
    body = _vma("2M") + _op("setup", 0, "touch", BASE, "16K", write=True)
    body += _op("agent", 0, "madvise_guard_install", BASE, "16K")
    body += _op("agent", 0, "touch", BASE + 0x1000)
    result = engine(_scenario(tmp_path, "install", body)).run_seed(0, log=True)
    assert result.bug is None
    log = result.log
    installs = _ev(log, "guard_install")
    assert [e["populated"] for e in installs] == [True, False]
    assert installs[1]["installed"] == 4
    assert len(_ev(log, "free_folio")) == 4  # the zap between the two walks
    assert not _ev(log, "pmd_clear")  # zap_page_range_single(..., NULL): no reclaim
    assert _ev(log, "SIGSEGV")[0]["addr"] == hex(BASE + 0x1000)


# -- mm_tlb_flush_nested --------------------------------------------------------------------------

def _nested_scenario(tmp_path, cpus: int) -> str:
    body = _vma("4M")
    body += _op("setup", 0, "touch", BASE, "8K", write=True)
    body += _op("setup", cpus - 1, "touch", BASE + (2 << 20), "8K", write=True)
    body += _op("agent", 0, "madvise_dontneed", BASE, "8K")
    body += _op("agent", cpus - 1, "madvise_dontneed", BASE + (2 << 20), "8K")
    return _scenario(tmp_path, f"nested{cpus}", body, cpus=cpus)


def test_mm_tlb_flush_nested_widens_the_flush_to_the_whole_mm(tmp_path):
    eng = engine(_nested_scenario(tmp_path, 2))
    widened = serial = 0
    for seed in range(40):
        result = eng.run_seed(seed, log=True)
        assert result.bug is None
        log = result.log
        for flush in _ev(log, "flush_tlb_mm_range"):
            nested = [e for e in _ev(log, "mm_tlb_flush_nested", cpu=flush["cpu"])
                      if e["step"] <= flush["step"]]
            if nested:
                assert (flush["start"], flush["end"], flush["freed_tables"]) == \
                    ("0x0", hex(1 << 64), True)
                widened += 1
            else:
                assert int(flush["end"], 16) - int(flush["start"], 16) == 0x2000
                assert flush["freed_tables"] is False
                serial += 1
    assert widened and serial
    # one CPU: the two gathers never overlap, so no flush is widened
    log = engine(_nested_scenario(tmp_path, 1)).run_seed(0, log=True).log
    assert not _ev(log, "mm_tlb_flush_nested")
    assert all(e["end"] != hex(1 << 64) for e in _ev(log, "flush_tlb_mm_range"))


def test_the_fault_op_on_a_guard_marker_takes_sigsegv_in_handle_pte_fault(tmp_path):
    """handle_pte_fault -> do_swap_page -> handle_pte_marker: the marker is VM_FAULT_SIGSEGV
    for a direct `fault` as for `touch`, and the marker stays (no page is allocated)."""
    body = _vma("2M")
    body += _op("setup", 0, "touch", BASE, "32K", write=True)
    body += _op("setup", 0, "madvise_guard_install", BASE + 0x10000, "4K")
    body += _op("agent", 0, "fault", BASE + 0x10000, write=True)
    result = engine(_scenario(tmp_path, "guard_fault", body)).run_seed(0, log=True)
    assert result.bug is None and not result.hazards
    assert [e["marker"] for e in _ev(result.log, "handle_pte_marker")] == ["guard"]
    assert not _ev(result.log, "alloc_folio") and not _ev(result.log, "wp_page_copy")
