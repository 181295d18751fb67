"""The lean step: counting a CPU's step without the scheduler when it has nothing to decide."""

from __future__ import annotations


def lean_step(m, cpu) -> bool:
    """Count this CPU's step without asking the scheduler, when it has nothing to decide: the
    CPU is the only one with work and no grace period is running (Sched.point's lean path, with
    no coroutine to create). Returns False when the primitive must await m.point(cpu)."""
    if cpu is m.lean and not m.rcu.gp_active:
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)
        return True
    return False
