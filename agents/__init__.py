"""Kernel code paths, as async functions named after the kernel functions they model.

OPS maps a scenario `op` to the coroutine that runs it: op(cpu, mm, **params).
"""

from .fault import fault
from .gup import gup_fast_op
from .lazy import lazy_tlb
from .madvise import madvise_hugepage, madvise_nohugepage
from .user import touch
from .walker import pte_walker
from .zap import madvise_dontneed

OPS = {
    "touch": touch,
    "fault": fault,
    "madvise_dontneed": madvise_dontneed,
    "pte_walker": pte_walker,
    "gup_fast": gup_fast_op,
    "lazy_tlb": lazy_tlb,
    "madvise_hugepage": madvise_hugepage,
    "madvise_nohugepage": madvise_nohugepage,
}

# -- UFFDIO_MOVE and munmap (agents/uffd.py, agents/munmap.py) ---------------------------------
from .munmap import munmap  # noqa: E402
from .uffd import uffd_move  # noqa: E402

OPS["uffd_move"] = uffd_move
OPS["munmap"] = munmap

# -- khugepaged and mremap (agents/khugepaged.py, agents/mremap.py) -----------------------------
from .khugepaged import collapse_pte_mapped_thp, khugepaged_collapse, retract_page_tables_op  # noqa: E402
from .mremap import mremap_move_pmd  # noqa: E402

OPS["khugepaged_collapse"] = khugepaged_collapse
OPS["retract_page_tables"] = retract_page_tables_op
OPS["collapse_pte_mapped_thp"] = collapse_pte_mapped_thp
OPS["mremap_move_pmd"] = mremap_move_pmd
