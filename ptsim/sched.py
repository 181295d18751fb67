"""The scheduler: choice points and the CPU hand-off, knowing nothing of the kernel.

Each simulated CPU is a trio task, and exactly one is ever runnable: at a scheduling point the
running CPU asks the scheduler who goes next and, if it is another CPU, reschedules that task
and parks itself. Trio's own ordering therefore never matters. When the running CPU is the
only option, it steps on without a hand-off.

What the scheduler sees of the machine: its CPUs (``id``, ``idle``, ``key``), the events it
offers besides their steps (``m.pending_events``: each fires itself), whether the CPU asking is
the only thing that can happen (``m.quiet_for``), the fault probabilities it is asked to decide
(``decide_fault``), the reasons CPUs wait for (which it hands back to ``m.deadlock`` when
nothing can move) and ``m.max_steps``.
"""

from __future__ import annotations

import trio

from ptsim.kernel_model.errors import BugFound, Finding, NotModelled

from .strategies import Divergence, Pruned

# What ends a schedule early without being a finding (Sched._give_up).
UNFINISHED = (Divergence, NotModelled, Pruned)


def _abort(_raise_cancel):
    return trio.lowlevel.Abort.SUCCEEDED


class Sched:
    """One schedule's scheduler. ``calls[i]`` is CPU i's list of agent calls, each a callable
    ``call(cpu)`` returning the coroutine to run."""

    __state_ref_always__ = True  # no state of its own: explore's state cache names it

    def __state_ref__(self):
        return "Sched"

    def __init__(self, m, strategy, calls: list[list], fast: bool = True) -> None:
        self.m = m
        self.strategy = strategy
        self.calls = calls
        self.cpus = m.cpus
        # The lean single-CPU path (see point()): off, every step goes through choose().
        self.fast = fast
        # The one CPU that is not idle, when exactly one is (and the lean path is on), else None.
        self.solo = None
        self.tasks: list = [None] * len(m.cpus)
        self.waits: list = [None] * len(m.cpus)  # (predicate, WaitReason) of a waiting CPU
        self.choices: list[int] = []
        self.bug: Finding | None = None
        self.nursery = None
        self.opts: list = []
        self.abort: Exception | None = None
        strategy.attach(self)

    def parked(self, cpu):
        """The coroutine of ``cpu``'s task while it is parked (the unwinder reads it)."""
        task = self.tasks[cpu.id]
        return None if task is None else task.coro

    # -- choices ---------------------------------------------------------------------------
    def decide_fault(self, cpu, p: float) -> bool:
        value = self.strategy.fault(p, cpu, self.m.step)
        self.choices.append(value)
        return bool(value)

    def _options(self) -> list:
        """What may happen next: each runnable CPU's step, then the machine's pending events."""
        waits = self.waits
        opts = self.opts
        opts.clear()
        for c in self.cpus:
            if not c.idle:
                w = waits[c.id]
                if w is None or w[0]():
                    opts.append(c)
        self.m.pending_events(opts)
        return opts

    def choose(self, cur):
        """Who steps next. When a pending event is chosen it fires here (a step of its own)
        and the choice is made again."""
        m = self.m
        while True:
            opts = self._options()
            n = len(opts)
            if n == 1:
                pick = opts[0]
            elif n == 0:
                if all(c.idle for c in self.cpus):
                    return None
                raise m.deadlock([None if w is None else w[1] for w in self.waits])
            else:
                idx = self.strategy.pick(opts, cur, m.step)
                self.choices.append(idx)
                pick = opts[idx]
            if not pick.is_event:
                return pick
            m.step += 1
            pick.fire()

    # -- the scheduling point ---------------------------------------------------------------
    def _update_solo(self) -> None:
        """Recompute ``solo`` after a CPU's idle flag changed (start of the run, an agent done)."""
        live = [c for c in self.cpus if not c.idle]
        self.solo = live[0] if self.fast and len(live) == 1 else None
        self.m.set_solo(self.solo)

    async def point(self, cpu) -> None:
        """Before each access: maybe another CPU (or an event) goes first. The step is counted
        for the CPU that then performs its access.

        The lean path: when ``cpu`` is the only CPU not idle (so no other CPU can step and none
        waits on a predicate) and the machine has no event that could happen now
        (``quiet_for``), choose() would build the one-option list [cpu] and return cpu without
        asking the strategy. Then only the step is counted: no option list, no strategy call,
        no trio hand-off. When an event could happen, it competes with this CPU, which is a
        real choice, and the full path makes it."""
        m = self.m
        if self.solo is cpu and m.quiet_for(cpu):
            m.step += 1
            if m.step > m.max_steps:
                raise m.livelock(cpu)
            return
        nxt = self.choose(cpu)
        if nxt is not cpu:
            trio.lowlevel.reschedule(self.tasks[nxt.id])
            await trio.lowlevel.wait_task_rescheduled(_abort)
            m.running = cpu
        self._count(cpu)

    def _count(self, cpu) -> None:
        m = self.m
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)

    async def wait(self, cpu, pred, reason) -> None:
        """Not runnable until pred() holds; resuming (taking the lock, seeing the IPIs
        acknowledged) is this CPU's next step."""
        self.waits[cpu.id] = (pred, reason)
        nxt = self.choose(cpu)
        if nxt is not cpu:
            trio.lowlevel.reschedule(self.tasks[nxt.id])
            await trio.lowlevel.wait_task_rescheduled(_abort)
            self.m.running = cpu
        self.waits[cpu.id] = None
        self._count(cpu)

    # -- CPU tasks --------------------------------------------------------------------------
    def _stop(self, finding: Finding) -> None:
        if self.bug is None:
            self.bug = finding
        self.nursery.cancel_scope.cancel()

    def _give_up(self, exc: Exception) -> None:
        """Not a finding: the run cannot go on (a token that does not fit, a path the model
        lacks, e.g. splitting a huge pmd, or explore's pruning); the engine re-raises it."""
        self.abort = exc
        self.nursery.cancel_scope.cancel()

    async def cpu_main(self, cpu, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.tasks[cpu.id] = trio.lowlevel.current_task()
        task_status.started()
        await trio.lowlevel.wait_task_rescheduled(_abort)
        self.m.running = cpu
        try:
            for call in self.calls[cpu.id]:
                try:
                    await call(cpu)
                except (BugFound, *UNFINISHED):
                    raise
                except Exception as exc:  # a crash in the op's own code: a finding
                    raise self.m.op_crash(cpu, exc) from None
            cpu.idle = True
            self._update_solo()
            cpu.enter_idle()
            self._hand_on(cpu)
        except BugFound as found:
            self._stop(found.finding)
        except UNFINISHED as exc:
            self._give_up(exc)

    def _hand_on(self, cpu) -> None:
        """A CPU finished its agent: whoever is chosen next runs."""
        nxt = self.choose(cpu)
        if nxt is not None:
            trio.lowlevel.reschedule(self.tasks[nxt.id])

    def _decide(self, cur) -> tuple[bool, object]:
        """choose() outside any CPU task: a finding or an unfinished run ends the schedule
        there, and (False, None) comes back."""
        try:
            return True, self.choose(cur)
        except BugFound as found:
            self._stop(found.finding)
        except UNFINISHED as exc:
            self._give_up(exc)
        return False, None

    async def _start(self) -> None:
        ok, first = self._decide(None)
        if ok and first is not None:
            trio.lowlevel.reschedule(self.tasks[first.id])

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for cpu in self.cpus:
                if self.calls[cpu.id]:
                    cpu.idle = False
                    await nursery.start(self.cpu_main, cpu)
            self._update_solo()
            await self._start()


class ParkingSched(Sched):
    """explore's scheduler when it caches states: a CPU with something to decide parks, and a
    controller task makes the choice. At every choice every CPU is then a suspended coroutine
    whose position, locals and value stack the state cache can read (a running one's it
    cannot). It costs a second task switch per real choice, so only explore uses it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.controller = None
        self.asking = None  # the CPU that parked to have the choice made

    def _decided(self, cpu) -> bool:
        opts = self._options()
        return len(opts) == 1 and opts[0] is cpu

    async def _park(self, cpu) -> None:
        self.asking = cpu
        trio.lowlevel.reschedule(self.controller)
        await trio.lowlevel.wait_task_rescheduled(_abort)
        self.m.running = cpu

    async def point(self, cpu) -> None:
        if not self._decided(cpu):
            await self._park(cpu)
        self._count(cpu)

    async def wait(self, cpu, pred, reason) -> None:
        self.waits[cpu.id] = (pred, reason)
        if not self._decided(cpu):
            await self._park(cpu)
        self.waits[cpu.id] = None
        self._count(cpu)

    def _hand_on(self, cpu) -> None:
        self.asking = cpu
        trio.lowlevel.reschedule(self.controller)

    async def _start(self) -> None:
        await self.nursery.start(self.control)
        self._hand_on(None)

    async def control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.controller = trio.lowlevel.current_task()
        task_status.started()
        while True:
            await trio.lowlevel.wait_task_rescheduled(_abort)
            self.m.running = None
            ok, nxt = self._decide(self.asking)
            if not ok or nxt is None:
                return
            trio.lowlevel.reschedule(self.tasks[nxt.id])


def trio_run(fn, *args):
    """trio.run, except that a Ctrl-C comes out as KeyboardInterrupt: it lands in whichever CPU
    task is running, and the nursery of Sched.run wraps it in an exception group."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        raise
