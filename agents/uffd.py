"""UFFDIO_MOVE: move_pages -> move_pages_pte -> move_present_pte (mm/userfaultfd.c, ~6.14).

The model covers the simple case: anonymous, PTE-mapped, exclusive small folios in one mm, the
source page present (or the shared zero page), the destination pte none. Order of steps as in
the kernel:

  move_pages:     uffd_move_lock (mmap_lock read here); per page: mm_find_pmd(src),
                  mm_alloc_pmd(dst),
                  dst_pmdval = pmdp_get_lockless(dst_pmd), pmd_trans_huge_lock(src_pmd),
                  pte_alloc(dst_pmd), move_pages_pte; -EAGAIN goes round again
  move_pages_pte: pte_offset_map_rw_nolock(dst) (-> dst_pmdval, dst_ptl; inside rcu_read_lock),
                  pte_offset_map_rw_nolock(src) (dummy pmdval), the pmd_none sanity checks,
                  orig_dst_pte under dst_ptl, orig_src_pte under src_ptl, pin the folio under
                  src_ptl (pte_same), then move_present_pte
  move_present_pte: double_pt_lock, is_pte_pages_stable (pte_same src and dst, and -- with the
                  fix "mm: userfaultfd: recheck dst_pmd entry in move_pages_pte()", config
                  uffd_move_recheck_pmd -- pmd_same(dst_pmdval, pmdp_get_lockless(dst_pmd))),
                  ptep_clear_flush(src), folio_move_anon_rmap, set_pte_at(dst), double_pt_unlock
  out:            folio_put, pte_unmap(dst), pte_unmap(src)

The fixed kernel rechecks only the dst pmd: "Unlike dst_pte, the subsequent pte_same() check can
ensure the stability of the src_pte page, so there is no need to get pmdval" (the src pte is
present, so reclaim cannot empty and free that table without changing the pte first).

Not modelled (nothing in the model depends on them): the folio lock and anon_vma lock (the
trylocks always succeed), folio_maybe_dma_pinned, mmu notifiers, swap and migration entries,
huge pmds (move_pages_huge_pmd), UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES.
"""

from __future__ import annotations

__kernel_file__ = "mm/userfaultfd.c"  # where the kernel functions below live (reports cite it)

from ptsim.kernel_model.errors import NotModelled
from ptsim.kernel_model.footprint import touch
from ptsim.kernel_model.locks import down_read, spin_lock, spin_lock_nested, spin_unlock, up_read
from ptsim.kernel_model.memory import DATA, ZERO_PFN
from ptsim.kernel_model.pagetable import PAGE_SIZE, entry_pfn, index, leaf, mk_pte, present
from ptsim.kernel_model.pgalloc import folio_put
from ptsim.kernel_model.pgtable import (
    pmd_off,
    pmdp_get,
    pmdp_get_lockless,
    pte_offset_map_rw_nolock,
    pte_unmap,
    ptep_get,
    ptep_get_and_clear,
    set_pte_at,
)
from ptsim.kernel_model.registry import Addr, Size, config_key, kfunc, op
from ptsim.kernel_model.tlb import flush_tlb_mm_range

from .fault import alloc_pmd, pte_alloc

UFFD_MOVE_RECHECK_PMD = config_key(
    "uffd_move_recheck_pmd", (True, False),
    "move_pages_pte rechecks the dst pmd with pmd_same after taking the PTE locks (the tables "
    "were mapped with pte_offset_map_rw_nolock, which PT_RECLAIM may free under mmap_lock read).",
    "mm: userfaultfd: recheck dst_pmd entry in move_pages_pte() (PT_RECLAIM series, v6.14)")

# move_pages_pte's return values (the kernel's errnos); > 0 is bytes moved.
EAGAIN, ENOENT, EEXIST, EINVAL, EBUSY = -11, -2, -17, -22, -16


# -- helpers the kernel has in mm/ and include/linux -------------------------------------------

@kfunc
async def mm_alloc_pmd(cpu, mm, addr: int):
    """mm/userfaultfd.c: pgd_offset -> p4d_alloc -> pud_alloc -> pmd_alloc."""
    return await alloc_pmd(cpu, mm, addr)


async def folio_get(cpu, pfn: int) -> None:
    """Pin the folio while holding src_ptl: the pte maps it, so its count is at least one."""
    m = cpu.m
    await m.point(cpu)
    if m.fp is not None:
        touch(m, ("k", pfn), True)
    m.mem.refcount[pfn] += 1
    m.ev(cpu, "folio_get", pfn=hex(pfn))


async def folio_put_step(cpu, pfn: int) -> None:
    m = cpu.m
    await m.point(cpu)
    folio_put(m, pfn, m.who(cpu), cpu)


@kfunc
async def double_pt_lock(cpu, ptl1, ptl2) -> None:
    """Same lock: take it once. Otherwise in address order (the ptdesc, i.e. the table page,
    so pfn order), the second with spin_lock_nested(SINGLE_DEPTH_NESTING)."""
    if ptl1 is not ptl2 and (ptl1.pfn or 0) > (ptl2.pfn or 0):
        ptl1, ptl2 = ptl2, ptl1
    await spin_lock(cpu, ptl1)
    if ptl1 is not ptl2:
        await spin_lock_nested(cpu, ptl2)


@kfunc
async def double_pt_unlock(cpu, ptl1, ptl2) -> None:
    await spin_unlock(cpu, ptl1)
    if ptl1 is not ptl2:
        await spin_unlock(cpu, ptl2)


@kfunc
async def ptep_clear_flush(cpu, mm, addr: int, ptep) -> int:
    """x86: ptep_get_and_clear, then flush_tlb_page if the old pte was accessible (present)."""
    old = await ptep_get_and_clear(cpu, ptep)
    if present(old):
        await flush_tlb_mm_range(cpu, mm, addr, addr + PAGE_SIZE, False)  # flush_tlb_page
    return old


@kfunc
async def is_pte_pages_stable(cpu, dst_ptep, src_ptep, orig_dst_pte: int, orig_src_pte: int,
                              dst_pmdp, dst_pmdval: int) -> bool:
    """Called with both ptls held."""
    if await ptep_get(cpu, src_ptep) != orig_src_pte:
        return False
    if await ptep_get(cpu, dst_ptep) != orig_dst_pte:
        return False
    if cpu.m.cfg.uffd_move_recheck_pmd:
        # "since dst_pte needs to be none, the subsequent pte_same() check cannot prevent the
        # dst_pte page from being freed concurrently, so we also need to obtain dst_pmdval and
        # recheck pmd_same()"
        if await pmdp_get_lockless(cpu, dst_pmdp) != dst_pmdval:
            cpu.m.ev(cpu, "uffd_move_pmd_changed", pmd=hex(dst_pmdp[0]), idx=dst_pmdp[1])
            return False
    return True


# -- mm/userfaultfd.c ----------------------------------------------------------------------------

@kfunc
async def move_present_pte(cpu, mm, dst_addr: int, src_addr: int, dst_ptep, src_ptep,
                           orig_dst_pte: int, orig_src_pte: int, dst_pmdp, dst_pmdval: int,
                           dst_ptl, src_ptl, src_folio: int) -> int:
    err = 0
    await double_pt_lock(cpu, dst_ptl, src_ptl)
    if not await is_pte_pages_stable(cpu, dst_ptep, src_ptep, orig_dst_pte, orig_src_pte,
                                     dst_pmdp, dst_pmdval):
        err = EAGAIN
    else:
        # folio_test_large / folio_maybe_dma_pinned / PageAnonExclusive: small, exclusive.
        await ptep_clear_flush(cpu, mm, src_addr, src_ptep)
        # folio_move_anon_rmap(src_folio, dst_vma); src_folio->index = linear_page_index(...):
        # the mapping's reference moves from src to dst; rss is unchanged (same mm).
        cpu.m.ev(cpu, "folio_move_anon_rmap", pfn=hex(src_folio), src=hex(src_addr),
                 dst=hex(dst_addr))
        # "Follow mremap() behavior and treat the entry dirty after the move"
        await set_pte_at(cpu, dst_ptep, mk_pte(src_folio, True))
    await double_pt_unlock(cpu, dst_ptl, src_ptl)
    return err


@kfunc
async def move_zeropage_pte(cpu, mm, dst_addr: int, src_addr: int, dst_ptep, src_ptep,
                            orig_dst_pte: int, orig_src_pte: int, dst_pmdp, dst_pmdval: int,
                            dst_ptl, src_ptl) -> int:
    await double_pt_lock(cpu, dst_ptl, src_ptl)
    if not await is_pte_pages_stable(cpu, dst_ptep, src_ptep, orig_dst_pte, orig_src_pte,
                                     dst_pmdp, dst_pmdval):
        await double_pt_unlock(cpu, dst_ptl, src_ptl)
        return EAGAIN
    zero_pte = mk_pte(ZERO_PFN, False, special=True)  # pte_mkspecial(pfn_pte(my_zero_pfn()))
    await ptep_clear_flush(cpu, mm, src_addr, src_ptep)
    await set_pte_at(cpu, dst_ptep, zero_pte)
    await double_pt_unlock(cpu, dst_ptl, src_ptl)
    return 0


class _Mapped:
    """What move_pages_pte's `out:` label undoes: the pinned folio and the two pte maps."""

    __slots__ = ("src_folio", "dst", "src")

    def __init__(self) -> None:
        self.src_folio: int | None = None
        self.dst = False
        self.src = False


@kfunc
async def move_pages_pte(cpu, mm, dst_pmdp, src_pmdp, dst_addr: int, src_addr: int) -> int:
    held = _Mapped()
    err = await _move_pages_pte(cpu, mm, dst_pmdp, src_pmdp, dst_addr, src_addr, held)
    # out: folio_unlock + folio_put, then pte_unmap(dst_pte), pte_unmap(src_pte).
    # (A bug found inside stops the schedule there: no cleanup runs then.)
    if held.src_folio is not None:
        await folio_put_step(cpu, held.src_folio)
    if held.dst:
        await pte_unmap(cpu)
    if held.src:
        await pte_unmap(cpu)
    return err


async def _move_pages_pte(cpu, mm, dst_pmdp, src_pmdp, dst_addr: int, src_addr: int,
                          held: _Mapped) -> int:
    m = cpu.m
    # "Use the maywrite version to indicate that dst_pte will be modified" -- with the fix,
    # its pmdval is kept for the pmd_same recheck; before it, a dummy.
    mapped = await pte_offset_map_rw_nolock(cpu, mm, dst_pmdp, dst_addr)
    if mapped is None:  # "Retry if a huge pmd materialized from under us"
        return EAGAIN
    held.dst = True
    dst_table, dst_pmdval, dst_ptl = mapped
    dst_ptep = (dst_table, index(1, dst_addr))

    mapped = await pte_offset_map_rw_nolock(cpu, mm, src_pmdp, src_addr)  # &dummy_pmdval
    if mapped is None:
        return EAGAIN
    held.src = True
    src_table, _dummy_pmdval, src_ptl = mapped
    src_ptep = (src_table, index(1, src_addr))

    # "Sanity checks before the operation": pmd_none / pmd_trans_huge of either pmd -> -EINVAL.
    # These were WARN_ON_ONCE()s until the PT_RECLAIM series dropped them: reclaim can clear
    # the dst pmd right here. Plain reads; the move just fails.
    for pmdp in (dst_pmdp, src_pmdp):
        val = await pmdp_get(cpu, pmdp)
        if val == 0 or leaf(val):
            m.ev(cpu, "uffd_move_pmd_sanity", pmd=hex(pmdp[0]), idx=pmdp[1], val=hex(val))
            return EINVAL

    await spin_lock(cpu, dst_ptl)
    orig_dst_pte = await ptep_get(cpu, dst_ptep)
    await spin_unlock(cpu, dst_ptl)
    if orig_dst_pte != 0:
        return EEXIST

    await spin_lock(cpu, src_ptl)
    orig_src_pte = await ptep_get(cpu, src_ptep)
    await spin_unlock(cpu, src_ptl)
    if orig_src_pte == 0:
        return ENOENT  # no UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES

    if not present(orig_src_pte):
        raise NotModelled("UFFDIO_MOVE of a swap or migration entry (move_swap_pte)")
    if entry_pfn(orig_src_pte) == ZERO_PFN:
        return await move_zeropage_pte(cpu, mm, dst_addr, src_addr, dst_ptep, src_ptep,
                                       orig_dst_pte, orig_src_pte, dst_pmdp, dst_pmdval,
                                       dst_ptl, src_ptl)

    # "Pin the page while holding the lock to be sure the page isn't freed under us"
    await spin_lock(cpu, src_ptl)
    if await ptep_get(cpu, src_ptep) != orig_src_pte:
        await spin_unlock(cpu, src_ptl)
        return EAGAIN
    pfn = entry_pfn(orig_src_pte)
    if m.mem.kind[pfn] != DATA:  # vm_normal_folio() found no normal folio
        await spin_unlock(cpu, src_ptl)
        return EBUSY
    await folio_get(cpu, pfn)
    held.src_folio = pfn
    await spin_unlock(cpu, src_ptl)
    # folio_trylock, folio_get_anon_vma + anon_vma_trylock_write: not modelled (they succeed).

    return await move_present_pte(cpu, mm, dst_addr, src_addr, dst_ptep, src_ptep,
                                  orig_dst_pte, orig_src_pte, dst_pmdp, dst_pmdval,
                                  dst_ptl, src_ptl, pfn)


@kfunc
async def move_pages(cpu, mm, dst_start: int, src_start: int, length: int) -> int:
    """Returns the bytes moved, or a negative errno if none were."""
    # uffd_move_lock: the model takes mmap_lock for reading, as the kernel does without
    # CONFIG_PER_VMA_LOCK and in uffd_move_lock's fallback (kernel-notes D3: "UFFDIO_MOVE,
    # move_pages_pte, mmap read lock").
    await down_read(cpu, mm.mmap_lock)
    ret = await _move_pages(cpu, mm, dst_start, src_start, length)
    await up_read(cpu, mm.mmap_lock)  # uffd_move_unlock
    return ret


async def _move_pages(cpu, mm, dst_start: int, src_start: int, length: int) -> int:
    m = cpu.m
    dst_vma = mm.find_vma(dst_start)
    src_vma = mm.find_vma(src_start)
    if dst_vma is None or src_vma is None:
        return ENOENT
    if src_start + length > src_vma.end or dst_start + length > dst_vma.end:
        return EINVAL
    if src_vma.type != "anon" or dst_vma.type != "anon":
        return EINVAL  # validate_move_areas: "Only allow moving across anonymous vmas"
    moved = err = 0
    src_addr, dst_addr = src_start, dst_start
    while src_addr < src_start + length:
        src_pmdp = await pmd_off(cpu, mm, src_addr)  # mm_find_pmd
        if src_pmdp is None:
            err = ENOENT
            break
        dst_pmdp = await mm_alloc_pmd(cpu, mm, dst_addr)
        dst_pmdval = await pmdp_get_lockless(cpu, dst_pmdp)
        if present(dst_pmdval) and leaf(dst_pmdval):  # pmd_trans_huge(dst_pmdval)
            err = EEXIST
            break
        src_pmdval = await pmdp_get_lockless(cpu, src_pmdp)  # pmd_trans_huge_lock(src_pmd)
        if present(src_pmdval) and leaf(src_pmdval):
            raise NotModelled("UFFDIO_MOVE of a huge pmd (move_pages_huge_pmd)")
        if src_pmdval == 0:  # pmd_none(*src_pmd), no ALLOW_SRC_HOLES
            err = ENOENT
            break
        await pte_alloc(cpu, mm, dst_pmdp, dst_addr)
        err = await move_pages_pte(cpu, mm, dst_pmdp, src_pmdp, dst_addr, src_addr)
        m.ev(cpu, "move_pages_pte_done", src=hex(src_addr), dst=hex(dst_addr), err=err)
        # cond_resched(); fatal_signal_pending() is never true here.
        if err == EAGAIN:
            continue
        if err:
            break
        src_addr += PAGE_SIZE
        dst_addr += PAGE_SIZE
        moved += PAGE_SIZE
    return moved if moved else err


@op("uffd_move")
async def uffd_move(cpu, *, addr: Addr, dst: Addr, len: Size = PAGE_SIZE) -> None:
    """ioctl(UFFDIO_MOVE, {.src = addr, .dst = dst, .len = len}): move_pages -> move_pages_pte
    (pte_offset_map_rw_nolock, lock, pmd_same recheck of src and dst)."""
    ret = await move_pages(cpu, cpu.mm, dst, addr, len)
    cpu.m.ev(cpu, "uffd_move_ret", ret=ret)
