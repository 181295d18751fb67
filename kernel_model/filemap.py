"""The page cache of named files (struct address_space), folio locks and the i_mmap lock.

File and shmem VMAs are modelled as MAP_SHARED mappings of a named file: every VMA that maps
the file at a pgoff sees the same folio, which the page cache holds a reference on. A folio
lock is a sleeping lock; khugepaged's collapse holds the new huge folio locked, and a fault on
that range sleeps on it (filemap_fault -> lock_folio_maybe_drop_mmap), which is what keeps the
PTEs of a range being retracted from being refilled (kernel-notes D4).
"""

from __future__ import annotations

from .lockdep import lock_acquire, lock_release
from .locks import RwSem
from .snapshot import Snapshotted
from .waits import WaitReason


class AddressSpace(Snapshotted):
    def __state_ref__(self):
        return ("AddressSpace", self.name)

    def __init__(self, name: str) -> None:
        self.name = name
        self.pages: dict[int, int] = {}  # pgoff -> pfn of the page caching it
        self.i_mmap_rwsem = RwSem(f"{name}.i_mmap_rwsem", "i_mmap_rwsem")
        self.folio_locks: dict[int, int] = {}  # locked folio head -> owning CPU


class FolioWait(WaitReason):
    """folio_lock() sleeping until the folio's owner unlocks it."""

    __slots__ = ("mapping", "folio")

    def __init__(self, mapping: AddressSpace, folio: int) -> None:
        self.mapping = mapping
        self.folio = folio

    def describe(self, m) -> str:
        owner = self.mapping.folio_locks.get(self.folio)
        return (f"sleeps on folio_lock({self.mapping.name} pfn {self.folio:#x}) held by "
                f"CPU{owner}")


def mapping_of(m, name: str) -> AddressSpace:
    mapping = m.files.get(name)
    if mapping is None:
        mapping = m.files[name] = AddressSpace(name)
    return mapping


async def folio_lock(cpu, mapping: AddressSpace, folio: int) -> None:
    m = cpu.m
    await m.point(cpu)
    name = f"folio_lock({mapping.name} pfn {folio:#x})"
    lock_acquire(cpu, ("folio_lock", name))
    if folio in mapping.folio_locks:
        m.ev(cpu, "folio_lock_wait", folio=hex(folio), owner=mapping.folio_locks[folio])
        await m.wait(cpu, lambda: folio not in mapping.folio_locks, FolioWait(mapping, folio))
    mapping.folio_locks[folio] = cpu.id
    m.ev(cpu, "folio_lock", folio=hex(folio))


async def folio_trylock(cpu, mapping, folio: int) -> bool:
    """folio_trylock(): take the folio lock if it is free; a trylock adds no lockdep dependency."""
    m = cpu.m
    await m.point(cpu)
    if folio in mapping.folio_locks:
        m.ev(cpu, "folio_trylock", folio=hex(folio), ok=False)
        return False
    mapping.folio_locks[folio] = cpu.id
    lock_acquire(cpu, ("folio_lock", f"folio_lock({mapping.name} pfn {folio:#x})"), trylock=True)
    m.ev(cpu, "folio_trylock", folio=hex(folio), ok=True)
    return True


async def folio_unlock(cpu, mapping: AddressSpace, folio: int) -> None:
    m = cpu.m
    await m.point(cpu)
    del mapping.folio_locks[folio]
    lock_release(cpu, ("folio_lock", f"folio_lock({mapping.name} pfn {folio:#x})"))
    m.ev(cpu, "folio_unlock", folio=hex(folio))
