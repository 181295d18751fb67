"""The scheduler: choice points and the CPU hand-off, knowing nothing of the kernel.

Each simulated CPU is a trio task, and exactly one is ever runnable: at a scheduling point the
running CPU asks the scheduler who goes next and, if it is another CPU, reschedules that task
and parks itself. Trio's own ordering therefore never matters. When the running CPU is the
only option, it steps on without a hand-off.

What the scheduler sees of the machine: its CPUs (``id``, ``idle``, ``key``), the events it
offers besides their steps (``m.pending_events``: each fires itself; none while
``m.events_live`` is 0, when the scheduler does not ask), whether the CPU asking is
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

# The hand-off's two calls, looked up once (they run at every switch between CPUs).
_reschedule = trio.lowlevel.reschedule
_wait_rescheduled = trio.lowlevel.wait_task_rescheduled


def _abort(_raise_cancel):
    return trio.lowlevel.Abort.SUCCEEDED


class _Abandoned(BaseException):
    """Raised in a CPU task parked inside its agents when it wakes to find its schedule over
    (a bug, or a run given up, elsewhere): it unwinds the agents' coroutines, as trio's
    cancellation did when every schedule had a nursery of its own. A BaseException, so that no
    op's ``except Exception`` takes it for a crash of its own."""


# The CpuPool of the current trio run (trio_run makes one), or None.
_POOL = trio.lowlevel.RunVar("ptsim.sched.CpuPool", default=None)


class CpuPool:
    """Trio tasks that run simulated CPUs, schedule after schedule, inside one trio run.

    Task ``slot`` runs CPU ``slot`` of whichever schedule holds the pool: it parks at the top
    of its loop, and the hand-off that chooses its CPU for the first time starts the CPU's
    agents (Sched.cpu_main); when they end it parks at the top again. (The CPU chosen first is
    run by the task that runs the schedule, Sched._drive, and so is a CPU first chosen once
    that one's agents are done, Sched._hand_on; their pool tasks stay parked throughout. Each
    CPU's agents run on one task from start to end.) Starting a task and a nursery per
    schedule cost more than a short schedule's own steps (D1: ~37 steps); a parked task costs
    nothing between schedules. One schedule at a time holds the pool (``busy``); a schedule
    that finds it busy, or runs outside trio_run, makes a pool of its own for its duration
    (Sched.run).

    A pool task's own frame holds only the pool, its slot and trio's task_status, the same in
    every schedule: explore's state cache reads a parked CPU's whole await chain
    (statehash.task_state), and two equal states must read equal whichever schedule reached
    them."""

    __state_ref_always__ = True  # no state of a schedule: explore's state cache names it

    def __state_ref__(self):
        return "CpuPool"

    def __init__(self, nursery) -> None:
        self.nursery = nursery
        self.tasks: list = []  # slot -> its trio task
        self.jobs: list = []  # slot -> the Sched its CPU belongs to in the current schedule
        self.busy = False

    async def lend(self, n: int) -> None:
        """Start the tasks of slots up to n-1 that the pool does not have yet."""
        while len(self.tasks) < n:
            self.jobs.append(None)
            self.tasks.append(await self.nursery.start(self._serve, len(self.tasks)))

    async def _serve(self, slot: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(trio.lowlevel.current_task())
        while True:
            await _wait_rescheduled(_abort)  # until its CPU first steps
            await self.jobs[slot].cpu_task(slot)

    def close(self) -> None:
        """End the tasks: they are all parked at the top of their loops, between schedules."""
        self.nursery.cancel_scope.cancel()


class Sched:
    """One schedule's scheduler. ``calls[i]`` is CPU i's list of agent calls, each a callable
    ``call(cpu)`` returning the coroutine to run."""

    __state_ref_always__ = True  # no state of its own: explore's state cache names it

    def __state_ref__(self):
        return "Sched"

    def __init__(self, m, strategy, calls: list[list], fast: bool = True) -> None:
        self.m = m
        self.strategy = strategy
        self.pick = strategy.pick  # (bound once: choose() asks it at nearly every step)
        self.calls = calls
        self.cpus = m.cpus
        # The lean single-CPU path (see point()): off, every step goes through choose().
        self.fast = fast
        # The one CPU that is not idle, when exactly one is (and the lean path is on), else None.
        self.solo = None
        self.active: list = []  # the CPUs that are not idle, in order (_update_solo)
        self.tasks: list = [None] * len(m.cpus)
        self.waits: list = [None] * len(m.cpus)  # (predicate, WaitReason) of a waiting CPU
        self.waiting = 0  # how many CPUs wait (have a predicate in waits)
        self.choices: list[int] = []
        self.bug: Finding | None = None
        self.opts: list = []  # the options of the choice being made (one list, reused)
        self.abort: Exception | None = None
        self.owner = None  # the task that awaits run(): woken when the schedule is over
        self.live: list[int] = []  # CPUs whose agents started and have not ended
        self.over = False  # a bug was found or the run given up
        self.ended = False  # the owner ended the schedule itself (_end)
        self.bodies: list = [None] * len(m.cpus)  # each CPU's cpu_main coroutine, once started
        self.take = None  # a CPU the owner runs next, its own CPU's agents done (_hand_on)
        strategy.attach(self)

    def parked(self, cpu):
        """The coroutine of ``cpu``'s agents while its task is parked (the unwinder reads its
        await chain), or None before they start."""
        return self.bodies[cpu.id]

    # -- choices ---------------------------------------------------------------------------
    def decide_fault(self, cpu, p: float) -> bool:
        value = self.strategy.fault(p, cpu, self.m.step)
        self.choices.append(value)
        return bool(value)

    def _options(self) -> list:
        """What may happen next: each runnable CPU's step, then the machine's pending events."""
        opts = self.opts
        if self.waiting:
            waits = self.waits
            opts.clear()
            for c in self.active:
                w = waits[c.id]
                if w is None or w[0]():
                    opts.append(c)
        else:
            opts[:] = self.active  # no CPU waits: every CPU not idle can step
        self.m.pending_events(opts)
        return opts

    def choose(self, cur):
        """Who steps next. When a pending event is chosen it fires here (a step of its own)
        and the choice is made again. (The option list is _options(), written out here: this
        runs at nearly every step of a schedule with two CPUs at work.)"""
        m = self.m
        if not self.waiting and not m.events_live:
            # The usual case, first and short: every CPU not idle can step and nothing else is
            # pending, so the options are the active CPUs (read, never changed), none an event.
            opts = self.active
            if len(opts) > 1:
                idx = self.pick(opts, cur, m.step)
                self.choices.append(idx)
                return opts[idx]
        waits = self.waits
        buf = self.opts
        while True:
            if self.waiting:
                opts = buf
                opts.clear()
                for c in self.active:
                    w = waits[c.id]
                    if w is None or w[0]():
                        opts.append(c)
                if m.events_live:
                    m.pending_events(opts)
            elif m.events_live:
                opts = buf
                opts[:] = self.active
                m.pending_events(opts)
            else:  # the usual case: every CPU not idle, and nothing else (read, never changed)
                opts = self.active
            n = len(opts)
            if n == 1:
                pick = opts[0]
            elif n == 0:
                if not self.active:
                    return None
                raise m.deadlock([None if w is None else w[1] for w in waits])
            else:
                idx = self.pick(opts, cur, m.step)
                self.choices.append(idx)
                pick = opts[idx]
            if not pick.is_event:
                return pick
            m.step += 1
            pick.fire()

    # -- the scheduling point ---------------------------------------------------------------
    def _update_solo(self) -> None:
        """Recompute ``active`` and ``solo`` after a CPU's idle flag changed (start of the run,
        an agent done): only the scheduler changes it while a schedule runs."""
        live = []
        for c in self.cpus:
            if not c.idle:
                live.append(c)
        self.active = live
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
            _reschedule(self.tasks[nxt.id])
            await _wait_rescheduled(_abort)
            if self.over:
                raise _Abandoned
            m.running = cpu
        m.step += 1  # (_count, without its call: this runs at nearly every step)
        if m.step > m.max_steps:
            raise m.livelock(cpu)

    def _count(self, cpu) -> None:
        m = self.m
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)

    async def wait(self, cpu, pred, reason) -> None:
        """Not runnable until pred() holds; resuming (taking the lock, seeing the IPIs
        acknowledged) is this CPU's next step."""
        self.waits[cpu.id] = (pred, reason)
        self.waiting += 1
        nxt = self.choose(cpu)
        if nxt is not cpu:
            _reschedule(self.tasks[nxt.id])
            await _wait_rescheduled(_abort)
            if self.over:
                raise _Abandoned
            self.m.running = cpu
        self.waits[cpu.id] = None
        self.waiting -= 1
        self._count(cpu)

    # -- CPU tasks --------------------------------------------------------------------------
    def _stop(self, finding: Finding) -> None:
        if self.bug is None:
            self.bug = finding
        self.over = True

    def _give_up(self, exc: Exception) -> None:
        """Not a finding: the run cannot go on (a token that does not fit, a path the model
        lacks, e.g. splitting a huge pmd, or explore's pruning); the engine re-raises it."""
        self.abort = exc
        self.over = True

    def _wind_down(self) -> None:
        """From a CPU task, once the schedule is over: unwind the next CPU still parked inside
        its agents (it calls this again when unwound), or, when none is left, end the schedule.
        One task at a time, so that exactly one is runnable even now."""
        if self.live:
            _reschedule(self.tasks[self.live.pop()])  # it wakes to see over: _Abandoned
        else:
            self._end()

    def _end(self) -> None:
        """The schedule is over and no CPU is left inside its agents: the owner goes on (it is
        running already when it ran the CPU that ended the schedule: see _drive)."""
        if trio.lowlevel.current_task() is self.owner:
            self.ended = True
        else:
            _reschedule(self.owner)

    async def _unwind(self) -> None:
        """From the owner, once it ended the schedule at a choice it made: the same."""
        if self.live:
            self._wind_down()
            await _wait_rescheduled(_abort)

    async def cpu_task(self, slot: int) -> None:
        """What the task of CPU ``slot`` runs for this schedule (a pool task, or the owner for
        the first CPU: _drive): its agents, from the hand-off that first chose it."""
        body = self.bodies[slot] = self.cpu_main(self.cpus[slot])
        try:
            await body
        except _Abandoned:
            self._wind_down()

    async def cpu_main(self, cpu) -> None:
        self.m.running = cpu
        self.live.append(cpu.id)
        try:
            try:
                for call in self.calls[cpu.id]:
                    try:
                        await call(cpu)
                    except (BugFound, *UNFINISHED):
                        raise
                    except Exception as exc:  # a crash in the op's own code: a finding
                        raise self.m.op_crash(cpu, exc) from None
            finally:
                if cpu.id in self.live:  # not when _wind_down took it out to unwind it
                    self.live.remove(cpu.id)
            cpu.idle = True
            self._update_solo()
            cpu.enter_idle()
            self._hand_on(cpu)
        except BugFound as found:
            self._stop(found.finding)
            self._wind_down()
        except UNFINISHED as exc:
            self._give_up(exc)
            self._wind_down()

    def _hand_on(self, cpu) -> None:
        """A CPU finished its agent: whoever is chosen next runs; when no one is, the schedule
        is over. When the owner ran the finished CPU and the one chosen has not started yet,
        the owner runs that one too (_drive): its pool task would have had to be woken, and at
        the end the owner again, two trips through trio's run loop for nothing (a quarter of
        D1's schedules under PCT run one CPU to its end before the other starts)."""
        nxt = self.choose(cpu)
        if nxt is None:
            self._end()
        elif self.bodies[nxt.id] is None and self.tasks[cpu.id] is self.owner:
            self.tasks[nxt.id] = self.owner
            self.take = nxt
        else:
            _reschedule(self.tasks[nxt.id])

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

    async def _drive(self) -> None:
        """The owner's part: the first choice, then the first CPU's agents, run by the owner
        itself (handing the first step to a pool task and being woken at the end would cost
        two trips through trio's run loop, as much as a few steps of a short schedule), then
        wait until the schedule is over, unless it ended on the owner's own watch."""
        ok, first = self._decide(None)
        if ok and first is not None:
            self.tasks[first.id] = self.owner
            await self.cpu_task(first.id)
            while self.take is not None:  # chosen when the owner's CPU was done: see _hand_on
                nxt, self.take = self.take, None
                await self.cpu_task(nxt.id)
            if not self.ended:
                await _wait_rescheduled(_abort)

    async def run(self) -> None:
        """Run the schedule on the trio run's CpuPool (see trio_run), or, when there is none or
        another schedule holds it, on a pool of its own."""
        pool = _POOL.get()
        if pool is not None and not pool.busy:
            await self._run_on(pool)
            return
        async with trio.open_nursery() as nursery:
            pool = CpuPool(nursery)
            await self._run_on(pool)
            pool.close()

    async def _run_on(self, pool: CpuPool) -> None:
        pool.busy = True  # before lend() awaits: another schedule of the run must not take it
        tasks = pool.tasks
        if len(tasks) < len(self.cpus):
            await pool.lend(len(self.cpus))
        self.owner = trio.lowlevel.current_task()
        for cpu in self.cpus:
            if self.calls[cpu.id]:
                cpu.idle = False
                self.tasks[cpu.id] = tasks[cpu.id]
                pool.jobs[cpu.id] = self
        self._update_solo()
        await self._drive()
        # Every task is parked at the top of its loop again (an exception out of _drive leaves
        # the pool busy: it is not used again).
        for i in range(len(self.cpus)):
            pool.jobs[i] = None
        pool.busy = False


class ParkingSched(Sched):
    """explore's scheduler when it caches states: a CPU with something to decide parks, and the
    owner (the task that runs the schedule) makes the choice. At every choice every CPU is then
    a suspended coroutine whose position, locals and value stack the state cache can read (a
    running one's it cannot). It costs a second task switch per real choice, so only explore
    uses it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asking = None  # the CPU that parked to have the choice made

    def _decided(self, cpu) -> bool:
        opts = self._options()
        return len(opts) == 1 and opts[0] is cpu

    async def _park(self, cpu) -> None:
        self.asking = cpu
        _reschedule(self.owner)
        await _wait_rescheduled(_abort)
        if self.over:
            raise _Abandoned
        self.m.running = cpu

    async def point(self, cpu) -> None:
        if not self._decided(cpu):
            await self._park(cpu)
        self._count(cpu)

    async def wait(self, cpu, pred, reason) -> None:
        self.waits[cpu.id] = (pred, reason)
        self.waiting += 1
        if not self._decided(cpu):
            await self._park(cpu)
        self.waits[cpu.id] = None
        self.waiting -= 1
        self._count(cpu)

    def _hand_on(self, cpu) -> None:
        self.asking = cpu
        _reschedule(self.owner)

    async def _drive(self) -> None:
        """Every choice, made here while every CPU is parked, until no CPU is left, a bug is
        found or the run is given up (then the CPU that ended it wakes the owner)."""
        while True:
            self.m.running = None
            ok, nxt = self._decide(self.asking)
            if not ok:
                await self._unwind()
                return
            if nxt is None:
                return
            _reschedule(self.tasks[nxt.id])
            await _wait_rescheduled(_abort)
            if self.over:
                return


async def _pooled(fn, args):
    """``fn(*args)`` with a CpuPool for every schedule it runs. Its exceptions come out as they
    are, not wrapped in the pool nursery's exception group."""
    failed = None
    async with trio.open_nursery() as nursery:
        pool = CpuPool(nursery)
        _POOL.set(pool)
        try:
            result = await fn(*args)
        except Exception as exc:
            failed = exc
        pool.close()
    if failed is not None:
        raise failed
    return result


def trio_run(fn, *args):
    """trio.run of ``fn(*args)`` with a CpuPool that every schedule inside it runs on; a Ctrl-C
    comes out as KeyboardInterrupt: it lands in whichever task is running, and a nursery
    (the pool's, or a schedule's own) wraps it in an exception group."""
    try:
        return trio.run(_pooled, fn, args)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        raise
