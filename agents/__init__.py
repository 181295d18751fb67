"""Kernel code paths, as async functions named after the kernel functions they model.

OPS maps a scenario `op` to the coroutine that runs it: op(cpu, mm, **params).
"""

from .fault import fault
from .gup import gup_fast_op
from .user import touch
from .walker import pte_walker
from .zap import madvise_dontneed

OPS = {
    "touch": touch,
    "fault": fault,
    "madvise_dontneed": madvise_dontneed,
    "pte_walker": pte_walker,
    "gup_fast": gup_fast_op,
}
