"""explore's and shrink's policy: follow a prefix of choices, then never preempt."""

from __future__ import annotations

from . import Divergence, Strategy


class GuidedStrategy(Strategy):
    """Follow a prefix of choices, then never preempt.

    After the prefix the CPU that could continue does (a preemption is a switch away from it);
    when it cannot (it blocked, finished, or nothing has run yet) the first option runs, and an
    injected fault does not fire. Every choice point is recorded as (number of options, index of
    the CPU that could continue or None, index chosen, preemptions before it), which is what
    the explorer branches on; ``faults`` holds, per point, the faults fired before it, or None
    where the point is not a fault injection. ``on_point`` (explore's state cache) is called
    before each choice past the prefix and may raise Pruned.
    """

    name = "guided"

    def __init__(self, prefix=(), on_point=None) -> None:
        self.prefix = prefix
        self.on_point = on_point
        self.parks = on_point is not None  # the state cache needs every CPU parked
        self.sched = None
        self.points: list[tuple[int, int | None, int, int]] = []
        self.faults: list[int | None] = []  # per point: faults fired before it, None: a CPU pick
        self.fired = 0
        self.decisions: list = []  # what each choice chose: an option key, or ("fault", 0|1)
        self.runners: list[int] = []  # the keys of the CPUs chosen, in order (not events)
        self.preemptions = 0
        self.cur = None  # the CPU that asked, at the choice being made
        self.step = 0

    def attach(self, sched) -> None:
        self.sched = sched  # explore's state cache reads the parked CPUs' continuations

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        """The index to take at choice ``pos`` (past the prefix: the default)."""
        if pos < len(self.prefix):
            idx = self.prefix[pos]
            if idx >= len(keys):
                raise Divergence(f"choice {pos} ({idx}) is impossible at step {self.step}: "
                                 f"only {len(keys)} options")
            return idx
        return default

    def _choose(self, keys: list, cont: int | None) -> int:
        pos = len(self.points)
        default = 0 if cont is None else cont
        if pos >= len(self.prefix) and self.on_point is not None:
            self.on_point(self, cont)
        idx = self._wanted(pos, keys, default)
        self.points.append((len(keys), cont, idx, self.preemptions))
        self.decisions.append(keys[idx])
        if cont is not None and idx != cont:
            self.preemptions += 1
        return idx

    def pick(self, options: list, current, step: int) -> int:
        self.cur, self.step = current, step
        self.faults.append(None)
        cont = next((i for i, o in enumerate(options) if o is current), None)
        idx = self._choose([o.key for o in options], cont)
        if not options[idx].is_event:
            self.runners.append(options[idx].key)
        return idx

    def fault(self, p: float, current, step: int) -> int:
        self.cur, self.step = current, step
        self.faults.append(self.fired)
        fired = self._choose([("fault", 0), ("fault", 1)], None)
        self.fired += fired
        return fired


class SteeredStrategy(GuidedStrategy):
    """shrink: steered by decisions (which CPU or event goes, whether a fault fires) rather than
    option indices, so that dropping or changing one decision leaves the others meaning what
    they meant. A decision that is not possible where it falls, or None, takes the
    non-preempting default; past the list, the default."""

    def __init__(self, decisions: list) -> None:
        super().__init__(())
        self.steer = decisions

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        want = self.steer[pos] if pos < len(self.steer) else None
        return keys.index(want) if want is not None and want in keys else default
