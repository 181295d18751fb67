"""Why a CPU waits: what a deadlock report says about each CPU in the wait-for chain.

A primitive that cannot go on calls ``await m.wait(cpu, pred, reason)``: the CPU is not
runnable until ``pred()`` holds. ``reason`` is a :class:`WaitReason`, declared beside its
primitive (spinlock and rwsem in locks.py, folio lock in filemap.py, IPI acknowledgement in
ipi.py, synchronize_rcu in rcu.py, TLBSYNC in tlb.py); the scheduler never looks inside it.
"""

from __future__ import annotations


class WaitReason:
    """What a waiting CPU waits for."""

    __slots__ = ()

    def describe(self, m) -> str:
        """The rest of a deadlock line after "CPU1 (IRQs on) in zap_pte_range ", e.g.
        "spins on ptl(PTE 0x5) held by CPU0"."""
        raise NotImplementedError
