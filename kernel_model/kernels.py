"""Kernel profiles: released kernels as values of the config keys.

A profile names a kernel as first released (x.y.0; stable backports are not applied) and gives
every config key that describes kernel *code* the value that kernel's code has, with the commit
or release that set it. ``[scenario] kernel = "6.14"``, ``--kernel 6.14`` or ``kernel="6.14"``
in the API start a scenario from those values; ``[config]``, a variant's ``config`` and
``--set`` still override them (in that order).

Two kinds of key are not code:

- *environment* keys (:data:`ENVIRONMENT`) describe a configuration every release can be built
  or run in (one page_table_lock with few CPUs; a paravirt or INVLPGB flush). A profile gives
  their usual value, and any value of theirs stays faithful to the release.
- values no released kernel ever had (flush_before_set_pmd = true: an RFC that was not merged)
  are never faithful.

A release may also have shipped other configurations of code keys (CONFIG_PT_RECLAIM=n from
6.14 to 6.19; a paravirt guest freeing tables with tlb_remove_table before 6.15): a profile lists
them as ``also``. A resolved variant is *counterfactual* when its code keys match no
configuration of any profile (:func:`counterfactual`): a buggy variant that reverts a fix is
usually one, and `ptsim validate` and the reports say so.

How the values were established (this is what "read" means below): the stored copies of
torvalds/linux files available to us were single snapshots of varying age, not the release
tags, and a full clone could not be fetched; the values therefore come from the kernel functions
as quoted in the model's own docstrings (agents/, kernel_model/), the kernel files in the index
(mm/pt_reclaim.c of 6.14-6.19; arch/x86/mm/pgtable.c of 6.15+, where ___pte_free_tlb calls
tlb_remove_table with no dtor), and the merge records on the mailing lists (mm-hotfixes pull
requests, linux-next revision lists, stable review lists) that date each commit to a release.
Each value's ``source`` says which.

Profiles may name keys nobody has registered (yet): they are ignored until a module registers
them; tests/test_kernels.py fails when a registered code key has no value in some profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from .registry import CONFIG, Registry, _caller_module

# Keys that describe the machine or the build rather than kernel code: key -> why.
ENVIRONMENT: Mapping[str, str] = MappingProxyType({
    "split_ptlocks": "CONFIG_SPLIT_PTE_PTLOCKS follows NR_CPUS >= SPLIT_PTLOCK_CPUS (4) and the "
                     "architecture, in every release",
    "tlb_flush": "paravirt flushes (KVM, Hyper-V, Xen) exist in every release, AMD INVLPGB "
                 "since v6.15: both are ways a kernel runs, not code a release changed",
    "ptlock_kind": "ALLOC_SPLIT_PTLOCKS follows sizeof(spinlock_t) > sizeof(long) (lockdep, "
                   "DEBUG_SPINLOCK) in every release: a build option, not code a release "
                   "changed",
})


# Values no released kernel had: (key, value) -> what they are.
NEVER_RELEASED: Mapping[tuple[str, object], str] = MappingProxyType({
    ("flush_before_set_pmd", True): "the PT_RECLAIM RFC's flush, never merged",
    ("flush_freed_tables_to_lazy", False): "no x86 kernel skips lazy CPUs on a flush that frees "
                                           "tables",
    ("pte_mapped_thp_recheck_always", True): "the fix ptsim proposes for D12, not merged",
    ("zap_rescan_after_break", False): "the 6.14 release candidates only",
})


@dataclass(frozen=True)
class Value:
    """One key's value in a profile, and the commit, release or file that set it."""

    value: object
    source: str


@dataclass(frozen=True)
class Shipped:
    """Another configuration a release shipped: these keys' values instead of the profile's."""

    name: str
    values: Mapping[str, object]
    absent: frozenset = frozenset()  # code keys whose code this configuration lacks


@dataclass(frozen=True)
class KernelProfile:
    name: str
    description: str
    tree: str  # the tree, tag and commit the values describe
    values: Mapping[str, Value]
    also: tuple[Shipped, ...]
    absent: frozenset  # code keys whose code this release does not have: any value is faithful
    module: str

    def value(self, key: str):
        return self.values[key].value

    def config(self) -> dict[str, object]:
        """The values of the keys registered now (keys nobody registered are left out)."""
        return {k: v.value for k, v in self.values.items() if k in CONFIG}

    def configurations(self) -> list[tuple[str, dict[str, object], frozenset]]:
        """(name, values, absent keys) of every configuration the release shipped, its default
        first."""
        base = {k: v.value for k, v in self.values.items()}
        out = [(self.name, base, self.absent)]
        for alt in self.also:
            out.append((f"{self.name} {alt.name}", {**base, **alt.values},
                        self.absent | alt.absent))
        return out


KERNELS: Registry[KernelProfile] = Registry("kernel profile")
DEFAULT_KERNEL = "mainline"  # what a scenario naming no kernel is compared with


def kernel(name: str, description: str, tree: str, values: Mapping[str, Value],
           also: tuple[Shipped, ...] = (), absent=()) -> str:
    """Declare a kernel profile; returns its name."""
    unknown = [k for alt in also for k in alt.values if k not in values]
    if unknown:
        raise ValueError(f"kernel profile {name!r}: `also` sets {unknown}, which it has no "
                         "value for")
    KERNELS.add(name, KernelProfile(name, description, tree, MappingProxyType(dict(values)),
                                    tuple(also), frozenset(absent), _caller_module()))
    return name


def code_keys() -> list[str]:
    """The registered config keys that describe kernel code (not the environment)."""
    return [k for k in CONFIG if k not in ENVIRONMENT]


def missing_values() -> dict[str, list[str]]:
    """profile -> the registered code keys it gives no value for (empty when complete)."""
    out = {}
    for profile in KERNELS.values():
        missing = [k for k in code_keys() if k not in profile.values]
        if missing:
            out[profile.name] = missing
    return out


def released_values(key: str) -> set:
    """Every value of ``key`` some configuration of some profile has (its code present)."""
    seen = set()
    for profile in KERNELS.values():
        for _name, values, absent in profile.configurations():
            if key in values and key not in absent:
                seen.add(values[key])
    return seen


def _mismatches(cfg: Mapping[str, object], values: Mapping[str, object], absent) -> list[str]:
    return [k for k in code_keys()
            if k in values and k not in absent and cfg.get(k, CONFIG[k].default) != values[k]]


def matching(cfg: Mapping[str, object]) -> list[str]:
    """The configurations (``6.14``, ``6.14 PT_RECLAIM=n, bare metal``) whose code keys all
    have ``cfg``'s values."""
    return [name for profile in KERNELS.values()
            for name, values, absent in profile.configurations()
            if not _mismatches(cfg, values, absent)]


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def counterfactual(cfg: Mapping[str, object], kernel_name: str | None = None) -> list[str]:
    """Why the resolved config ``cfg`` is no released kernel, one phrase per key (empty when
    some profile's configuration has every code key's value). Keys are named against the
    closest configuration of ``kernel_name`` (the scenario's profile; without one, of any
    profile); a value no release ever had says so."""
    if matching(cfg):
        return []
    named = KERNELS.get(kernel_name) if kernel_name else None
    candidates = [c for p in ([named] if named else KERNELS.values()) for c in p.configurations()]
    reasons = []
    never = []
    for key in code_keys():
        value = cfg.get(key, CONFIG[key].default)
        released = released_values(key)
        if (key, value) in NEVER_RELEASED:
            never.append(key)
            reasons.append(f"{key} = {_show(value)} (never released: "
                           f"{NEVER_RELEASED[key, value]})")
        elif released and value not in released:
            never.append(key)
            reasons.append(f"{key} = {_show(value)} (in no profiled kernel, "
                           f"{', '.join(KERNELS)})")
    if candidates:
        name, values, absent = min(candidates,
                                   key=lambda c: len(_mismatches(cfg, c[1], c[2])))
        for key in _mismatches(cfg, values, absent):
            if key not in never:
                reasons.append(f"{key} = {_show(cfg.get(key, CONFIG[key].default))} "
                               f"({name} has {_show(values[key])})")
    if not reasons:  # every key matches some release, but not all of them one release
        reasons.append("no released kernel has this combination")
    return reasons


# -- the profiles ------------------------------------------------------------------------------

_LAZY = Value(True, "native_flush_tlb_multi sends freed_tables flushes to lazy-TLB CPUs since "
                    "the lazy-TLB rework (v4.19), arch/x86/mm/tlb.c; false was never released")
_NO_RFC = Value(False, "the PT_RECLAIM RFC's arch_flush_tlb_before_set_huge_page (RFC v1/v2, "
                       "2024) was dropped before merging; true was never released")
_SYNC = Value(True, "mm/khugepaged: fix GUP-fast interaction by sending IPI (2ba99c5e0881, "
                    "v6.1): tlb_remove_table_sync_one() after pmdp_collapse_flush()")
_SPLIT = Value(True, "environment: CONFIG_SPLIT_PTE_PTLOCKS=y on x86-64 with NR_CPUS >= 4")
_IPI = Value("ipi", "environment: native x86 flush_tlb_multi IPIs")
_EMBEDDED = Value("embedded", "environment: a production build, spinlock_t fits in a long, the "
                              "ptlock is embedded in struct ptdesc (no ALLOC_SPLIT_PTLOCKS)")
_MREMAP = Value(True, "mm/mremap: fix move_normal_pmd/retract_page_tables race (Jann Horn, "
                      "mm-hotfixes-stable Oct 2024, merged for v6.12-rc; Fixes 1d65b771bc08; "
                      "stable 6.6.58)")
_NO_THP_RECHECK = Value(False, "try_collapse_pte_mapped_thp rechecks pmd_same in step 4 only "
                               "if ptl != pml (mm/khugepaged.c); true is the fix ptsim proposes "
                               "for catalogue D12, never released")
_RECLAIM_614 = Value(True, "mm: pgtable: reclaim empty PTE page in madvise(MADV_DONTNEED) "
                           "(v6.14): CONFIG_PT_RECLAIM 'default y', x86-64 selects "
                           "ARCH_SUPPORTS_PT_RECLAIM")
_RESCAN = Value(True, "mm: pgtable: fix incorrect reclaim of non-empty PTE pages (Qi Zheng, "
                      "mm-hotfixes Feb 2025, in v6.14-rc; the bug never reached a release)")
_PTLOCK_RCU = Value("rcu", "mm: move pagetable_*_dtor() to __tlb_remove_table() (Dec 2024, "
                           "v6.14): the ptlock is destroyed when the table page is freed")
_RETRACT = Value(True, "mm: khugepaged: recheck pmd state in retract_page_tables() (PT_RECLAIM "
                       "series, v6.14)")
_UFFD = Value(True, "mm: userfaultfd: recheck dst_pmd entry in move_pages_pte() (PT_RECLAIM "
                    "series, v6.14)")
_PMD_FLUSH_OLD = Value(False, "before 3ef938c35035 (v6.15) x86 flush_tlb_range() passed "
                              "freed_tables=false")
_PMD_FLUSH_NEW = Value(True, "x86 3ef938c35035 (v6.15): flush_tlb_range() passes "
                             "freed_tables=true, so pmdp_collapse_flush reaches lazy CPUs")
_VMA_FIRST = Value(True, "mm: fix the race between collapse and PT_RECLAIM under per-vma lock "
                         "(Barry Song; mm-hotfixes-stable 2025-08-12, v6.17-rc2)")
_VMA_LOCK = Value("vma", "mm: use per_vma lock for MADV_DONTNEED (a6fde7add78d, v6.17-rc1)")
_MMAP_LOCK = Value("mmap", "madvise_dontneed under mmap_lock read until a6fde7add78d (v6.17)")
_VMA_LATE = Value(False, "collapse_huge_page write-locked the vma after check_pmd_still_valid "
                         "until the 6.17 fix (harmless while MADV_DONTNEED took mmap_lock)")
_TRY_TO_FREE = Value("try_to_free_pte", "mm/pt_reclaim.c (6.14-6.19): try_get_and_clear_pmd "
                                        "fast path (trylock of pml), try_to_free_pte slow path")

kernel(
    "6.12",
    "v6.12 (Nov 2024), x86-64 bare metal: no PT_RECLAIM; page tables freed by tlb_remove_page "
    "after the flush IPI; MADV_DONTNEED under mmap_lock",
    "v6.12 release: values dated from merge records and stored kernel files (the tag itself "
    "could not be read here)",
    {
        "pt_reclaim": Value(False, "mm/pt_reclaim.c and CONFIG_PT_RECLAIM arrive in v6.14"),
        "table_free": Value("page", "arch/x86/mm/pgtable.c ___pte_free_tlb -> "
                                    "paravirt_tlb_remove_table = tlb_remove_page on bare metal "
                                    "(MMU_GATHER_RCU_TABLE_FREE only if PARAVIRT) until "
                                    "a37259732a7d (v6.15)"),
        "ptlock_free": Value("immediate", "___pte_free_tlb called pagetable_pte_dtor before "
                                          "queueing the table, until 'mm: move "
                                          "pagetable_*_dtor() to __tlb_remove_table()' (v6.14)"),
        "zap_rescan_after_break": Value(True, "no PT_RECLAIM code in v6.12: any value"),
        "retract_recheck_pmd": Value(False, "retract_page_tables (1d65b771bc08, v6.6) collapses "
                                            "under pml + ptl with no pmd recheck until v6.14"),
        "uffd_move_recheck_pmd": Value(False, "move_pages_pte rechecked pte_same only until "
                                              "the PT_RECLAIM series (v6.14)"),
        "collapse_lock_vma_first": _VMA_LATE,
        "collapse_sync_gup_fast": _SYNC,
        "mremap_recheck_pmd": _MREMAP,
        "flush_freed_tables_to_lazy": _LAZY,
        "flush_before_set_pmd": _NO_RFC,
        "madv_dontneed_lock": _MMAP_LOCK,
        "split_ptlocks": _SPLIT,
        "tlb_flush": _IPI,
        "ptlock_kind": _EMBEDDED,
        "pmd_flush_freed_tables": _PMD_FLUSH_OLD,
        "pte_mapped_thp_recheck_always": _NO_THP_RECHECK,
        "pt_reclaim_code": Value("try_to_free_pte", "no PT_RECLAIM code in v6.12: any value"),
    },
    also=(Shipped("paravirt guest", {"table_free": "semi_rcu"}),),
    absent=("zap_rescan_after_break", "pt_reclaim_code"),
)

kernel(
    "6.14",
    "v6.14 (Mar 2025), x86-64: PT_RECLAIM's first release (RCU table freeing with it), "
    "MADV_DONTNEED under mmap_lock",
    "v6.14 release: values dated from merge records and mm/pt_reclaim.c as stored "
    "(torvalds/linux e65d9626f9bb; the tag itself could not be read here)",
    {
        "pt_reclaim": _RECLAIM_614,
        "table_free": Value("rcu", "x86: mm: free page table pages by RCU instead of semi RCU "
                                   "(PT_RECLAIM series, v6.14): with PT_RECLAIM x86 frees by "
                                   "tlb_remove_table and __tlb_remove_table_one by call_rcu"),
        "ptlock_free": _PTLOCK_RCU,
        "zap_rescan_after_break": _RESCAN,
        "retract_recheck_pmd": _RETRACT,
        "uffd_move_recheck_pmd": _UFFD,
        "collapse_lock_vma_first": _VMA_LATE,
        "collapse_sync_gup_fast": _SYNC,
        "mremap_recheck_pmd": _MREMAP,
        "flush_freed_tables_to_lazy": _LAZY,
        "flush_before_set_pmd": _NO_RFC,
        "madv_dontneed_lock": _MMAP_LOCK,
        "split_ptlocks": _SPLIT,
        "tlb_flush": _IPI,
        "ptlock_kind": _EMBEDDED,
        "pmd_flush_freed_tables": _PMD_FLUSH_OLD,
        "pte_mapped_thp_recheck_always": _NO_THP_RECHECK,
        "pt_reclaim_code": _TRY_TO_FREE,
    },
    also=(Shipped("PT_RECLAIM=n, bare metal", {"pt_reclaim": False, "table_free": "page"},
                  frozenset({"zap_rescan_after_break", "pt_reclaim_code"})),
          Shipped("PT_RECLAIM=n, paravirt guest", {"pt_reclaim": False, "table_free": "semi_rcu"},
                  frozenset({"zap_rescan_after_break", "pt_reclaim_code"}))),
)

kernel(
    "6.17",
    "v6.17 (Sep 2025), x86-64: PT_RECLAIM, RCU table freeing in every configuration (v6.15), "
    "MADV_DONTNEED under the per-VMA lock with the collapse fix",
    "v6.17 release: values dated from merge records (mm-hotfixes-stable 2025-08-12) and "
    "stored kernel files (the tag itself could not be read here)",
    {
        "pt_reclaim": _RECLAIM_614,
        "table_free": Value("rcu", "x86: Make MMU_GATHER_RCU_TABLE_FREE unconditional "
                                   "(a37259732a7d, v6.15); PT_RECLAIM's __tlb_remove_table_one "
                                   "by call_rcu"),
        "ptlock_free": _PTLOCK_RCU,
        "zap_rescan_after_break": _RESCAN,
        "retract_recheck_pmd": _RETRACT,
        "uffd_move_recheck_pmd": _UFFD,
        "collapse_lock_vma_first": _VMA_FIRST,
        "collapse_sync_gup_fast": _SYNC,
        "mremap_recheck_pmd": _MREMAP,
        "flush_freed_tables_to_lazy": _LAZY,
        "flush_before_set_pmd": _NO_RFC,
        "madv_dontneed_lock": _VMA_LOCK,
        "split_ptlocks": _SPLIT,
        "tlb_flush": _IPI,
        "ptlock_kind": _EMBEDDED,
        "pmd_flush_freed_tables": _PMD_FLUSH_NEW,
        "pte_mapped_thp_recheck_always": _NO_THP_RECHECK,
        "pt_reclaim_code": _TRY_TO_FREE,
    },
    also=(Shipped("PT_RECLAIM=n", {"pt_reclaim": False, "table_free": "semi_rcu"},
                  frozenset({"zap_rescan_after_break", "pt_reclaim_code"})),),
)

kernel(
    "mainline",
    "the newest mm tree read (akpm/mm as merged into linux-next, early 2026): PT_RECLAIM always "
    "on where RCU table freeing is (x86-64), its code moved into mm/memory.c "
    "(zap_empty_pte_table)",
    "akpm/mm's mm-unstable, as pushed to kernel.org's sj/linux at 8c333d09b415 (22 Jan 2026, "
    "per the push record): "
    "'mm: make PT_RECLAIM depends on MMU_GATHER_RCU_TABLE_FREE' 4374236c5c60, 'mm: move pte "
    "table reclaim code to memory.c' 2d6f8f028bfd, 'mm/memory: handle non-split locks correctly "
    "in zap_empty_pte_table()' 66f5117e1acb (mm-unstable rebases: the same patches carry other "
    "ids in other linux-next days); the rest as torvalds/linux stored, files of 6.15+ age "
    "(mm/pt_reclaim.c e65d9626f9bb)",
    {
        **KERNELS["6.17"].values,  # 6.17, and what changed since:
        "pt_reclaim": Value(True, "mm: make PT_RECLAIM depends on MMU_GATHER_RCU_TABLE_FREE "
                                  "(Qi Zheng, 2025/26): def_bool y, no longer a choice on "
                                  "x86-64"),
        "table_free": Value("rcu", "x86: Make MMU_GATHER_RCU_TABLE_FREE unconditional "
                                   "(a37259732a7d, v6.15); PT_RECLAIM's RCU single-table free"),
        "pt_reclaim_code": Value("zap_empty_pte_table",
                                 "mm: move pte table reclaim code to memory.c; mm/memory: "
                                 "handle non-split locks correctly in zap_empty_pte_table() "
                                 "(the fast path clears directly when ptl == pml)"),
    },
)

def profile_field(profile: KernelProfile) -> dict:
    """A profile as `ptsim list kernels --json` shows it."""
    return {"name": profile.name, "doc": profile.description, "tree": profile.tree,
            "config": {k: v.value for k, v in profile.values.items() if k in CONFIG},
            "sources": {k: v.source for k, v in profile.values.items() if k in CONFIG},
            "also": [{"name": a.name, "config": dict(a.values)} for a in profile.also],
            "module": profile.module}


__all__ = ["DEFAULT_KERNEL", "ENVIRONMENT", "KERNELS", "NEVER_RELEASED", "KernelProfile",
           "Shipped", "Value", "code_keys", "counterfactual", "kernel", "matching",
           "missing_values", "profile_field", "released_values"]
