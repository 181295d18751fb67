"""Spinlocks and sleeping rw-semaphores as shared objects.

Each operation is a scheduling point and checks the lock word like KASAN would: a split ptlock
lives with its table page, so locking it after the page (or the lock) was freed is a
use-after-free. A spinning CPU is not runnable until the lock is released (it still takes IPIs
while its IRQs are on); a sleeping rwsem waiter is quiescent for RCU.
"""

from __future__ import annotations

from .footprint import begin_pinned
from .lean import lean_step
from .lockdep import lock_acquire, lock_release
from .memory import PAGETABLE, PT_USE_AFTER_FREE
from .registry import bug_kind
from .waits import WaitReason

DEADLOCK = bug_kind(
    "deadlock",
    "a wait-for cycle no CPU can leave: spinlocks, IPIs waiting on CPUs with IRQs off, "
    "synchronize_rcu inside a reader, sleeping locks")


class SpinLock:
    """A spinlock. A split ptlock records the table page it lives in (``pfn``): when that page
    is freed, or when pagetable_dtor destroys the lock, any use of it is a use-after-free."""

    __slots__ = ("name", "pfn", "owner", "destroyed_by", "lock_class", "dep")

    def __init__(self, name: str, pfn: int | None = None, lock_class: str = "") -> None:
        self.name = name
        self.pfn = pfn
        self.owner: int | None = None
        self.destroyed_by: tuple | None = None
        self.lock_class = lock_class or name
        self.dep = (self.lock_class, name)  # lockdep's key

    def __getstate__(self):
        return (self.name, self.pfn, self.owner, self.destroyed_by, self.lock_class)

    def __setstate__(self, state):
        self.name, self.pfn, self.owner, self.destroyed_by, self.lock_class = state
        self.dep = (self.lock_class, self.name)

    def __repr__(self) -> str:
        return self.name


class RwSem:
    """mmap_lock or a per-VMA lock: many readers or one writer; waiters sleep."""

    __slots__ = ("name", "readers", "writer", "lock_class", "dep")

    def __init__(self, name: str, lock_class: str = "") -> None:
        self.name = name
        self.readers: dict[int, int] = {}
        self.writer: int | None = None
        self.lock_class = lock_class or name
        self.dep = (self.lock_class, name)  # lockdep's key

    def __getstate__(self):
        return (self.name, dict(self.readers), self.writer, self.lock_class)

    def __setstate__(self, state):
        self.name, self.readers, self.writer, self.lock_class = state
        self.dep = (self.lock_class, self.name)

    def __repr__(self) -> str:
        return self.name


class SpinWait(WaitReason):
    __slots__ = ("lock",)

    def __init__(self, lock: SpinLock) -> None:
        self.lock = lock

    def describe(self, m) -> str:
        return f"spins on {self.lock.name} held by CPU{self.lock.owner}"


class RwsemWait(WaitReason):
    __slots__ = ("sem",)

    def __init__(self, sem: RwSem) -> None:
        self.sem = sem

    def describe(self, m) -> str:
        sem = self.sem
        holders = [f"writer CPU{sem.writer}"] if sem.writer is not None else []
        holders += [f"reader CPU{r}" for r in sorted(sem.readers)]
        return f"sleeps on {sem.name} held by {', '.join(holders)}"


# -- operations: each is a scheduling point, checked like KASAN checks the lock word ---------

def ptlock_consequence(m, page_freed: bool) -> str:
    """What a use of a destroyed split ptlock means in the kernel, by ptlock_kind (declared in
    pgalloc.py beside the ptlock's allocation). include/linux/mm.h: with ALLOC_SPLIT_PTLOCKS
    ptlock_alloc takes the lock from the page->ptl kmem_cache and ptlock_free (called by
    pagetable_dtor) kmem_cache_free()s it (mm/memory.c); without it, ptlock_ptr is
    &ptdesc->ptl, a field of the table page's struct ptdesc, and ptlock_free does nothing."""
    if m.cfg.ptlock_kind == "allocated":
        return ("ptlock_kind = allocated (ALLOC_SPLIT_PTLOCKS, lockdep or DEBUG_SPINLOCK "
                "builds): pagetable_dtor's ptlock_free already kmem_cache_free()d the lock, so "
                "this is a slab use-after-free of a page->ptl object, which KASAN reports at "
                "the lock operation")
    if page_freed:
        return ("ptlock_kind = embedded (production builds): the lock is a field of the freed "
                "page's struct ptdesc, so this writes struct page memory of a page the "
                "allocator may already have reused; KASAN does not watch struct page, so "
                "it would go unreported: silent corruption or a lock that never unlocks")
    return ("ptlock_kind = embedded (production builds): ptlock_free does nothing, the lock "
            "word still sits in the not yet freed page's struct ptdesc, so nothing reports "
            "this use; it becomes a write to freed struct page memory once the page is freed "
            "while the lock is in use")


def _check_lock(cpu, lock: SpinLock, op: str) -> None:
    m = cpu.m
    pfn = lock.pfn
    if lock.destroyed_by is not None:
        freed = pfn is not None and m.mem.kind[pfn] != PAGETABLE
        raise m.bug(PT_USE_AFTER_FREE, cpu,
                    f"CPU{cpu.id} {op} on {lock.name}, already destroyed by pagetable_dtor, "
                    f"in {cpu.func()}; {ptlock_consequence(m, freed)}", obj=lock.name,
                    keys=(("ptl", lock.name), ("pt", pfn)),
                    pfns=(pfn,) if pfn is not None else (), access=f"{op}({lock.name})")
    if pfn is not None and m.mem.kind[pfn] != PAGETABLE:
        raise m.bug(PT_USE_AFTER_FREE, cpu,
                    f"CPU{cpu.id} {op} on {lock.name} of {m.mem.describe(pfn)} in {cpu.func()}; "
                    f"{ptlock_consequence(m, True)}",
                    obj=lock.name, keys=(("pt", pfn), ("ptl", lock.name)), pfns=(pfn,),
                    access=f"{op}({lock.name})")


async def spin_lock(cpu, lock: SpinLock) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", lock.name))
    if lock.destroyed_by is not None or (lock.pfn is not None
                                         and m.mem.kind[lock.pfn] != PAGETABLE):
        _check_lock(cpu, lock, "spin_lock")
    if lock.owner == cpu.id:
        raise m.bug(DEADLOCK, cpu, f"CPU{cpu.id} spin_lock on {lock.name}, which it already "
                    f"holds, in {cpu.func()}", obj=lock.name)
    cpu.preempt += 1
    lock_acquire(cpu, lock.dep)
    if lock.owner is not None:
        if m.log is not None:
            m.ev(cpu, "spin_wait", lock=lock.name, owner=lock.owner)
        await m.wait(cpu, lambda: lock.owner is None or lock.destroyed_by is not None
                     or (lock.pfn is not None and m.mem.kind[lock.pfn] != PAGETABLE),
                     SpinWait(lock))
        _check_lock(cpu, lock, "spin_lock")
    lock.owner = cpu.id
    cpu.held.append(lock)
    if m.log is not None:
        m.ev(cpu, "spin_lock", lock=lock.name)


# spin_lock_nested(lock, SINGLE_DEPTH_NESTING): the same lock; this lockdep already allows a
# second lock of a class that is held (lockdep.py), which is all the annotation tells it.
spin_lock_nested = spin_lock


async def spin_trylock(cpu, lock: SpinLock) -> bool:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", lock.name))
    _check_lock(cpu, lock, "spin_trylock")
    if lock.owner is not None:
        if m.log is not None:
            m.ev(cpu, "spin_trylock", lock=lock.name, ok=False)
        return False
    cpu.preempt += 1
    lock.owner = cpu.id
    cpu.held.append(lock)
    lock_acquire(cpu, lock.dep, trylock=True)
    if m.log is not None:
        m.ev(cpu, "spin_trylock", lock=lock.name, ok=True)
    return True


async def spin_unlock(cpu, lock: SpinLock) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", lock.name))
    if lock.destroyed_by is not None or (lock.pfn is not None
                                         and m.mem.kind[lock.pfn] != PAGETABLE):
        _check_lock(cpu, lock, "spin_unlock")
    lock.owner = None
    cpu.held.remove(lock)
    lock_release(cpu, lock.dep)
    cpu.preempt -= 1
    if m.log is not None:
        m.ev(cpu, "spin_unlock", lock=lock.name)


async def down_read(cpu, sem: RwSem) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", sem.name))
    lock_acquire(cpu, sem.dep)
    if sem.writer is not None:
        await m.wait(cpu, lambda: sem.writer is None, RwsemWait(sem))
    sem.readers[cpu.id] = sem.readers.get(cpu.id, 0) + 1
    if m.log is not None:
        m.ev(cpu, "down_read", lock=sem.name)


async def up_read(cpu, sem: RwSem) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", sem.name))
    count = sem.readers[cpu.id] - 1
    if count:
        sem.readers[cpu.id] = count
    else:
        del sem.readers[cpu.id]
    lock_release(cpu, sem.dep)
    if m.log is not None:
        m.ev(cpu, "up_read", lock=sem.name)


async def down_write(cpu, sem: RwSem) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", sem.name))
    lock_acquire(cpu, sem.dep)
    if sem.writer is not None or sem.readers:
        await m.wait(cpu, lambda: sem.writer is None and not sem.readers, RwsemWait(sem))
    sem.writer = cpu.id
    if m.log is not None:
        m.ev(cpu, "down_write", lock=sem.name)


async def up_write(cpu, sem: RwSem) -> None:
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", sem.name))
    sem.writer = None
    lock_release(cpu, sem.dep)
    if m.log is not None:
        m.ev(cpu, "up_write", lock=sem.name)
