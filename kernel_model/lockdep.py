"""lockdep, per lock class: a dependency A -> B is recorded when B is acquired while A is held;
acquiring in an order that closes a cycle is a lock-order bug (lockdep's inversion report).

As in the kernel, a trylock adds no dependency (it cannot deadlock: kernel-notes F2), and
taking a second lock of the same class is allowed here (the kernel annotates it with
spin_lock_nested). Classes: "pml" (split PMD lock) before "ptl" (split PTE lock) is the legal
order; sleeping locks (mmap_lock, vma_lock, i_mmap_rwsem, folio_lock) take part too.
"""

from __future__ import annotations

from .registry import bug_kind

LOCK_ORDER = bug_kind("lock-order", "two lock classes taken in both orders (lockdep's inversion)")


def _reaches(deps: dict, start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal in the dependency graph, or None."""
    succ: dict[str, list[str]] = {}
    for a, b in deps:
        succ.setdefault(a, []).append(b)
    stack = [(start, [start])]
    seen = {start}
    while stack:
        node, path = stack.pop()
        for nxt in sorted(succ.get(node, ())):
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def lock_acquire(cpu, key: tuple[str, str], trylock: bool = False) -> None:
    """key is (lock class, lock name); locks keep theirs ready in ``dep``."""
    m = cpu.m
    if not trylock and cpu.lockdep:
        cls, name = key
        deps = m.lock_deps
        for held_cls, held_name in cpu.lockdep:
            if held_cls == cls or (held_cls, cls) in deps:
                continue
            if m.fp is not None:  # a new dependency: the graph every other new one searches
                m.fp.touch(m.step, ("lockdep",), True)
            path = _reaches(deps, cls, held_cls)
            if path is not None:
                first = deps[(path[0], path[1])]
                raise m.bug(
                    LOCK_ORDER, cpu,
                    f"CPU{cpu.id} takes {cls} ({name}) while holding {held_cls} ({held_name}) in "
                    f"{cpu.func()}, but CPU{first[0]} took {' -> '.join(path)} in {first[1]} at "
                    f"step {first[2]}", obj=f"lock classes {held_cls}, {cls}",
                    detail=[f"dependency {a} -> {b}: CPU{w[0]} in {w[1]} at step {w[2]}"
                            for (a, b), w in sorted(deps.items())],
                    access=f"lock {cls} while holding {held_cls}")
            deps[(held_cls, cls)] = (cpu.id, cpu.func(), m.step)
    cpu.lockdep.append(key)


def lock_release(cpu, key: tuple[str, str]) -> None:
    held = cpu.lockdep
    if held[-1] == key:  # locks are mostly released in reverse order
        held.pop()
        return
    for i in range(len(held) - 2, -1, -1):
        if held[i] == key:
            del held[i]
            return
