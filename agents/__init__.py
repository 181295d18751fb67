"""Kernel code paths, as async functions named after the kernel functions they model.

Each scenario op is declared where it is implemented, with ``@op`` (kernel_model.registry);
importing this package imports every agent module, which registers them all.
"""

from . import fault, guard, gup, khugepaged, lazy, madvise, mremap, munmap, uffd, user, walker, zap  # noqa: F401
