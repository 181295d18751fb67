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
    # Who destroyed it, at which step, feeds reports only: a schedule depends on whether it
    # was destroyed (two schedules that free its table at different steps reach one state).
    __state_skip__ = frozenset({"destroyed_by"})

    def __state_view__(self):
        return [("destroyed", self.destroyed_by is not None)]

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
        if m.fp is not None:  # taking it at last: a step on the lock alone, as the first was
            begin_pinned(m, cpu, ("l", lock.name))
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
    """down_read: waits only while a writer holds the lock. A reader that finds a writer
    *waiting* (and no writer holding) takes the lock at once: the kernel's reader optimistic
    lock stealing (rwsem_down_read_slowpath, "locking/rwsem: Enable reader optimistic lock
    stealing", v5.11) takes it when neither RWSEM_WRITER_LOCKED nor RWSEM_FLAG_HANDOFF is set,
    but queues behind the writer when other readers hold it (rcnt > 1) or once a waiter asked
    for handoff (after waiting RWSEM_WAIT_TIMEOUT, about 4 ms). The model does not model
    handoff and always lets the reader in: an over-approximation that adds schedules (a reader
    overtaking a waiting writer) and hides none of the orders the kernel allows, since a
    reader may always be scheduled later. What it does hide: a deadlock that needs a queued
    writer to block a reader (a read lock taken recursively while a writer waits), which
    lockdep reports in the kernel and the model's lockdep, per class, does not."""
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


def rwsem_has_waiters(m, sem: RwSem) -> bool:
    """RWSEM_FLAG_WAITERS: some CPU sleeps in down_read or down_write on ``sem``."""
    sched = m.sched
    if sched is None or not sched.waiting:  # nobody waits for anything: the usual case
        return False
    for w in sched.waits:
        if w is not None and isinstance(w[1], RwsemWait) and w[1].sem is sem:
            return True
    return False


async def down_read_trylock(cpu, sem: RwSem) -> bool:
    """kernel/locking/rwsem.c __down_read_trylock, as read in the stored patches that touch it
    (the count rework, "locking/rwsem: Make rwsem->owner an atomic_long_t" era, v5.3, and the
    2022 one that wraps it in preempt_disable): `tmp = atomic_long_read(&sem->count); while (!(tmp &
    RWSEM_READ_FAILED_MASK)) { cmpxchg(tmp + RWSEM_READER_BIAS) ... return 1 }`, with
    RWSEM_READ_FAILED_MASK = RWSEM_WRITER_MASK | RWSEM_FLAG_WAITERS | RWSEM_FLAG_HANDOFF. So it
    fails while a writer holds the lock *or anyone waits* for it (a writer queued behind
    readers, or readers queued behind a writer; HANDOFF is only ever set with waiters), and
    never steals the way down_read's slow path does. A trylock adds no lockdep dependency."""
    m = cpu.m
    if not lean_step(m, cpu):
        await m.point(cpu)
    return _read_trylock(m, cpu, sem)


def _read_trylock(m, cpu, sem: RwSem) -> bool:
    """down_read_trylock's step, after its scheduling point."""
    if m.fp is not None:
        begin_pinned(m, cpu, ("l", sem.name))
    if sem.writer is not None or (m.sched is not None and m.sched.waiting
                                  and rwsem_has_waiters(m, sem)):
        if m.log is not None:
            m.ev(cpu, "down_read_trylock", lock=sem.name, ok=False)
        return False
    lock_acquire(cpu, sem.dep, trylock=True)
    sem.readers[cpu.id] = sem.readers.get(cpu.id, 0) + 1
    if m.log is not None:
        m.ev(cpu, "down_read_trylock", lock=sem.name, ok=True)
    return True


async def lock_vma_under_rcu(cpu, mm, addr: int):
    """mm/mmap_lock.c lock_vma_under_rcu (6.15+; mm/memory.c before): mas_walk under
    rcu_read_lock, then vma_start_read, which never waits: in 6.4-6.14 it is
    down_read_trylock(&vma->vm_lock->lock) after the vm_lock_seq check (a vma write-locked by
    vma_start_write stays locked until mmap_write_unlock); from 6.15 a refcount,
    __refcount_inc_not_zero_limited_acquire(&vma->vm_refcnt), that fails while a writer is in
    __vma_enter_locked (VMA_LOCK_OFFSET added) and on a detached vma (refcount 0, -EAGAIN:
    retry the walk). The model's vm_lock is held for writing from vma_start_write to
    mmap_write_unlock and waited on by a writer in vma_start_write, so both versions are
    down_read_trylock here. Then the check that the vma is still attached and covers addr.
    Returns the read-locked vma or None (the caller falls back to mmap_lock). RCU is not
    modelled here: the model never frees a vma."""
    vma = mm.find_vma(addr)  # mas_walk
    if vma is None:
        return None
    if not await down_read_trylock(cpu, vma.vm_lock):  # vma_start_read
        return None
    if vma not in mm.vmas or not vma.start <= addr < vma.end:  # detached, or not ours
        await up_read(cpu, vma.vm_lock)  # inval_end_read: vma_end_read
        return None
    return vma


async def lock_mm_and_find_vma(cpu, mm, addr: int):
    """mm/mmap_lock.c lock_mm_and_find_vma (6.5+): get_mmap_lock_carefully is
    mmap_read_trylock, then mmap_read_lock_killable; find_vma. Returns the vma with mmap_lock
    held for reading, or None with it released (no vma: SIGSEGV; stack expansion is not
    modelled)."""
    if not await down_read_trylock(cpu, mm.mmap_lock):
        await down_read(cpu, mm.mmap_lock)
    vma = mm.find_vma(addr)
    if vma is None:
        await up_read(cpu, mm.mmap_lock)
    return vma


async def lock_vma_or_mmap(cpu, mm, addr: int):
    """The fault path's locking, arch/x86/mm/fault.c do_user_addr_fault (6.4+): `vma =
    lock_vma_under_rcu(mm, address); if (!vma) goto lock_mmap;` ... `lock_mmap: vma =
    lock_mm_and_find_vma(mm, address, regs); if (unlikely(!vma)) { bad_area_nosemaphore(...);
    return; }`. Returns (vma, the rwsem held for reading: the vma's lock or mmap_lock), or
    (None, None) where the kernel sends SIGSEGV. (VM_FAULT_RETRY under the vma lock, which
    also falls back, is not modelled: no modelled fault returns it.)"""
    # lock_vma_under_rcu, down_read_trylock and lean_step inlined: this is every fault's path
    # (measure_vmpte --instructions). A vma's range never changes in the model (munmap
    # removes whole vmas), so "still attached" is the whole recheck.
    vma = mm.find_vma(addr)
    if vma is not None:
        lock = vma.vm_lock
        m = cpu.m
        if cpu is m.lean:
            m.step += 1
            if m.step > m.max_steps:
                raise m.livelock(cpu)
        else:
            await m.point(cpu)
        if m.fp is None and m.log is None and lock.writer is None and (
                m.sched is None or not m.sched.waiting):
            lock_acquire(cpu, lock.dep, trylock=True)
            lock.readers[cpu.id] = lock.readers.get(cpu.id, 0) + 1
            ok = True
        else:
            ok = _read_trylock(m, cpu, lock)
        if ok:
            if vma in mm.vmas:  # vma_start_read fails on a detached vma
                return vma, lock
            await up_read(cpu, lock)
    vma = await lock_mm_and_find_vma(cpu, mm, addr)
    return (vma, mm.mmap_lock) if vma is not None else (None, None)


async def try_vma_read_lock(cpu, mm, start: int, end: int):
    """mm/madvise.c try_vma_read_lock (6.17: "mm: use per_vma lock for MADV_DONTNEED",
    a6fde7add78d, and the madvise_lock rework around it): `vma = lock_vma_under_rcu(mm,
    start); if (!vma) goto take_mmap_read_lock;` then, if the range ends past the vma
    ("Must span only a single VMA"), the mm is not current's, or userfaultfd_armed(vma):
    vma_end_read and `take_mmap_read_lock: mmap_read_lock(mm)`. Returns the vma read-locked
    (the caller madvises [start, end) in it alone), or None with mmap_lock held for reading
    (the caller walks the vmas, madvise_walk_vmas)."""
    vma = await lock_vma_under_rcu(cpu, mm, start)
    if vma is not None:
        if end <= vma.end and not vma.uffd_wp:
            return vma
        await up_read(cpu, vma.vm_lock)  # vma_end_read
    await down_read(cpu, mm.mmap_lock)
    return None


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
