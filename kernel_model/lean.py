"""The lean step: counting a CPU's step without the scheduler when it has nothing to decide.

``m.lean`` is the CPU that may step without asking: the scheduler sets it to the only CPU with
work (Machine.set_solo), and RCU clears it while a grace period runs (its end may be a real choice)
and restores it when none does. The entry accessors (read_entry, write_entry) and the hardware
walker, several per page fault, inline the check ``cpu is m.lean`` (3 % fewer instructions per
seed-002 fault, `benchmarks/measure_vmpte.py --instructions`); the rest call lean_step().
"""

from __future__ import annotations


def lean_step(m, cpu) -> bool:
    """Count this CPU's step if the scheduler has nothing to decide. Returns False when the
    primitive must await m.point(cpu) instead."""
    if cpu is m.lean:
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)
        return True
    return False
