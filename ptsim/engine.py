"""The engine: builds the machine from a scenario, runs setup once, and runs schedules.

Each simulated CPU is a trio task, and exactly one is ever runnable: at a scheduling point the
running CPU asks the scheduler who goes next and, if it is another CPU, reschedules that task
and parks itself. Trio's own ordering therefore never matters. When the running CPU is the
only option, it steps on without a hand-off. Every schedule starts from the same post-setup
state (pickled once) and nothing carries over between schedules.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import trio

from . import agents as agent_ops
from .kernel_model import rcu as rcu_mod
from .kernel_model.errors import BugFound, Finding, NotModelled
from .kernel_model.ipi import deliver_ipi
from .kernel_model.machine import Machine
from .kernel_model.mm import Mm, Vma
from .kernel_model.sanitizers import check_end_of_run
from .scenario import Scenario
from .strategies import (CountingStrategy, Divergence, GuidedStrategy, PctStrategy, Pruned,
                         RandomStrategy, ReplayStrategy)
from .token import Token

def not_modelled(scn: Scenario) -> str | None:
    """Why this scenario cannot run on the current model, or None."""
    for vma in scn.vmas:
        if vma.thp and vma.type != "anon":
            return f"thp = true on a {vma.type} vma (file THP through the page cache)"
        if vma.uffd_wp:
            return "uffd_wp = true"
    for spec in (*scn.setup, *scn.agents):
        for op in spec.ops:
            if op.op not in agent_ops.OPS:
                return f"op {op.op!r} ({spec.key})"
    return None


PCT_CALIBRATION_RUNS = 5


# What ends a schedule early without being a finding (Sched._give_up).
UNFINISHED = (Divergence, NotModelled, Pruned)


class SetupBlocked(Exception):
    pass


async def _setup_wait(cpu, pred, what) -> None:
    if not pred():
        raise SetupBlocked(f"setup would block on {what[0]} {what[1]!r}")


def _run_to_completion(coro):
    """Setup never suspends (no scheduling points, nothing to wait for): drive it directly."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise SetupBlocked("setup tried to suspend")


def _op_calls(m: Machine, spec) -> list:
    """The (op name, coroutine function, mm, kwargs) list an agent entry expands to (repeat x do)."""
    mm = m.mms[spec.mm]
    calls = []
    for rep in range(spec.repeat):
        shift = rep * spec.stride
        for op in spec.ops:
            kwargs = dict(op.args)
            for key in ("addr", "dst"):
                if key in kwargs:
                    kwargs[key] += shift
            calls.append((op.op, agent_ops.OPS[op.op], mm, kwargs))
    return calls


def build_machine(scn: Scenario) -> Machine:
    """The machine after setup: VMAs, populate, [[setup]] entries, every callback drained."""
    m = Machine(scn.cpus, scn.cfg, scn.flt, scn.max_steps)
    m.wait = _setup_wait
    m.choose_fault = lambda cpu, name: m.flt[name] >= 1.0
    for i, v in enumerate(scn.vmas):
        if v.mm not in m.mms:
            m.mms[v.mm] = Mm(v.mm, m.mem.alloc_table(4, v.mm, (None, "mm_alloc_pgd", 0)))
        m.mms[v.mm].vmas.append(Vma(i, v.mm, v.start, v.end, v.type, v.thp, v.file, v.pgoff, v.uffd_wp))
    for mm in m.mms.values():
        mm.vmas.sort(key=lambda vma: vma.start)
    for spec in scn.agents:
        m.mms[spec.mm].cpumask.add(spec.cpu)

    def run_on(cpu, coro) -> None:
        cpu.idle = False
        m.running = cpu
        try:
            _run_to_completion(coro)
        finally:
            cpu.idle = True
            m.running = None
        rcu_mod.rcu_barrier(m)

    cpu0 = m.cpus[0]
    for v in scn.vmas:
        if v.populate:
            mm = m.mms[v.mm]
            mm.cpumask.add(0)
            for addr in range(v.start, v.end, 4096):
                # MAP_POPULATE: write faults for anon memory, no TLB fills.
                run_on(cpu0, agent_ops.fault(cpu0, mm, addr, write=v.type == "anon"))
    for spec in scn.setup:
        m.mms[spec.mm].cpumask.add(spec.cpu)
        cpu = m.cpus[spec.cpu]
        for name, fn, mm, kwargs in _op_calls(m, spec):
            run_on(cpu, fn(cpu, mm, **kwargs))
    m.history.clear()
    return m


@dataclass
class RunResult:
    seed: int | None
    bug: Finding | None
    hazards: list[Finding]
    steps: int
    choices: list[int]
    stats: dict
    log: list[dict] | None = None
    tables_freed_concurrently: int = 0
    leftover: int = 0
    extra: dict = field(default_factory=dict)


def _abort(_raise_cancel):
    return trio.lowlevel.Abort.SUCCEEDED


class Sched:
    """One schedule's scheduler: the choice points and the CPU hand-off."""

    def __init__(self, m: Machine, strategy, calls: list[list], fast: bool = True) -> None:
        self.m = m
        self.strategy = strategy
        self.calls = calls
        self.cpus = m.cpus
        self.rcu = m.rcu
        # The lean single-CPU path (see point()): off, every step goes through choose().
        self.fast = fast
        # The one CPU that is not idle, when exactly one is (and the lean path is on), else None.
        self.solo = None
        self.tasks: list = [None] * len(m.cpus)
        self.waits: list = [None] * len(m.cpus)
        self.choices: list[int] = []
        self.bug: Finding | None = None
        self.nursery = None
        self.opts: list = []
        self.replay = isinstance(strategy, ReplayStrategy)
        self.guided = isinstance(strategy, GuidedStrategy)
        if self.guided:
            strategy.sched = self  # explore's state cache reads the CPUs' continuations
        self.abort: Exception | None = None

    # -- choices ---------------------------------------------------------------------------
    def _pick(self, opts: list, cur) -> int:
        if self.replay or self.guided:
            self.strategy.step = self.m.step
            self.strategy.cur = cur
        idx = self.strategy.pick(opts)
        self.choices.append(idx)
        return idx

    def choose_fault(self, cpu, name: str) -> bool:
        p = self.m.flt[name]
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        if self.replay or self.guided:
            self.strategy.step = self.m.step
            self.strategy.cur = cpu
        value = self.strategy.fault(p)
        self.choices.append(value)
        return bool(value)

    def _options(self) -> list:
        """What may happen next: each runnable CPU's step, then pending events (IPI delivery to
        a CPU with IRQs on, the end of a grace period every CPU has been quiescent in)."""
        waits = self.waits
        opts = self.opts
        opts.clear()
        events = False
        for c in self.cpus:
            if not c.idle:
                w = waits[c.id]
                if w is None or w[0]():
                    opts.append(c)
            if c.ipis and c.irqs_on:
                events = True
        if events:
            for c in self.cpus:
                if c.ipis and c.irqs_on:
                    opts.append(("ipi", c))
        if self.rcu.gp_active and rcu_mod.note_quiescent(self.m):
            opts.append(("gp", None))
        return opts

    def choose(self, cur):
        """Who steps next. Pending events (IPI delivery, grace-period end) are options too;
        when one is chosen it happens here and the choice is made again."""
        m = self.m
        while True:
            opts = self._options()
            n = len(opts)
            if n == 1:
                pick = opts[0]
            elif n == 0:
                if all(c.idle for c in self.cpus):
                    return None
                raise self.deadlock()
            else:
                pick = opts[self._pick(opts, cur)]
            if type(pick) is not tuple:
                return pick
            m.step += 1  # an IPI handler or the RCU callbacks: a step of their own
            if pick[0] == "ipi":
                deliver_ipi(m, pick[1])
            else:
                rcu_mod.end_gp(m)

    def deadlock(self) -> BugFound:
        m = self.m
        chain = []
        for c in self.cpus:
            if c.idle:
                continue
            w = self.waits[c.id]
            irq = "IRQs off" if not c.irqs_on else "IRQs on"
            if w is None:
                chain.append(f"CPU{c.id} ({irq}) is runnable")
                continue
            kind, obj = w[1]
            if kind == "lock":
                chain.append(f"CPU{c.id} ({irq}) in {c.func()} spins on {obj.name} held by CPU{obj.owner}")
            elif kind == "ipi":
                chain.append(f"CPU{c.id} ({irq}) in {c.func()} waits for {obj.name} IPI "
                             f"acknowledgement from " + ", ".join(
                                 f"CPU{t} ({'IRQs off' if not m.cpus[t].irqs_on else 'IRQs on'})"
                                 for t in sorted(obj.pending)))
            elif kind == "rwsem":
                holders = [f"writer CPU{obj.writer}"] if obj.writer is not None else []
                holders += [f"reader CPU{r}" for r in sorted(obj.readers)]
                chain.append(f"CPU{c.id} ({irq}) in {c.func()} sleeps on {obj.name} held by "
                             + ", ".join(holders))
            else:
                readers = [f"CPU{x.id}" for x in self.cpus if not x.quiescent()]
                chain.append(f"CPU{c.id} in {c.func()} waits in synchronize_rcu for a grace "
                             f"period held off by {', '.join(readers) or 'nobody'}")
        cpu = next((c for c in self.cpus if not c.idle), None)
        return m.bug("deadlock", cpu, "no CPU can make progress: " + "; ".join(chain),
                     obj="wait-for chain", detail=chain)

    # -- the scheduling point ---------------------------------------------------------------
    def _update_solo(self) -> None:
        """Recompute ``solo`` after a CPU's idle flag changed (start of the run, an agent done)."""
        live = [c for c in self.cpus if not c.idle]
        self.solo = live[0] if self.fast and len(live) == 1 else None
        self.m.lean = None if self.m.rcu.gp_active else self.solo

    async def point(self, cpu) -> None:
        """Before each access: maybe another CPU (or an event) goes first. The step is counted
        for the CPU that then performs its access.

        The lean path: when ``cpu`` is the only CPU not idle (so no other CPU can step and none
        waits on a predicate), no IPI is pending for it (idle CPUs take theirs at once, so no
        other CPU has one) and no grace period can end now, choose() would build the one-option
        list [cpu] and return cpu without asking the strategy. Then only the step is counted:
        no option list, no strategy call, no trio hand-off. note_quiescent() is still called
        while a grace period runs (it records this CPU's quiescent states, as choose() does);
        when it says the grace period may end, that end competes with this CPU, which is a
        real choice, and the full path makes it."""
        if self.solo is cpu and not cpu.ipis and (
                not self.rcu.gp_active or not rcu_mod.note_quiescent(self.m)):
            m = self.m
            m.step += 1
            if m.step > m.max_steps:
                raise m.livelock(cpu)
            return
        nxt = self.choose(cpu)
        if nxt is not cpu:
            trio.lowlevel.reschedule(self.tasks[nxt.id])
            await trio.lowlevel.wait_task_rescheduled(_abort)
            self.m.running = cpu
        self._count(cpu)

    def _count(self, cpu) -> None:
        m = self.m
        m.step += 1
        if m.step > m.max_steps:
            raise m.livelock(cpu)

    async def wait(self, cpu, pred, what) -> None:
        """Not runnable until pred() holds; resuming (taking the lock, seeing the IPIs
        acknowledged) is this CPU's next step."""
        self.waits[cpu.id] = (pred, what)
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
            for name, fn, mm, kwargs in self.calls[cpu.id]:
                cpu.op = name
                await fn(cpu, mm, **kwargs)
            cpu.op = None
            cpu.idle = True
            self._update_solo()
            while cpu.ipis:  # an idle CPU takes its IPIs at once
                deliver_ipi(self.m, cpu)
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

    async def _start(self) -> None:
        try:
            first = self.choose(None)
        except BugFound as found:
            self._stop(found.finding)
            return
        except UNFINISHED as exc:
            self._give_up(exc)
            return
        if first is not None:
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

    async def wait(self, cpu, pred, what) -> None:
        self.waits[cpu.id] = (pred, what)
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
            try:
                nxt = self.choose(self.asking)
            except BugFound as found:
                self._stop(found.finding)
                return
            except UNFINISHED as exc:
                self._give_up(exc)
                return
            if nxt is None:
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


class Engine:
    """Runs schedules of one resolved scenario."""

    def __init__(self, scn: Scenario, fast_path: bool = True) -> None:
        reason = not_modelled(scn)
        if reason:
            raise NotModelled(reason)
        self.scn = scn
        # Sched's lean single-CPU path; False forces every step through Sched.choose (the
        # results are the same either way: tests/test_engine_speed_paths.py).
        self.fast_path = fast_path
        self.digest = scn.digest()
        machine = build_machine(scn)
        self.snapshot = pickle.dumps(machine, protocol=pickle.HIGHEST_PROTOCOL)
        self._pct_k: int | None = None

    def fresh(self) -> Machine:
        return pickle.loads(self.snapshot)

    def token(self, choices: list[int]) -> str:
        return Token(self.digest, self.scn.variant, tuple(self.scn.overrides), tuple(choices)).encode()

    def strategy(self, name: str, seed: int, depth: int = 3):
        if name == "random":
            return RandomStrategy(seed)
        if name == "pct":
            keys = [c for c in range(self.scn.cpus)] + [1000 + c for c in range(self.scn.cpus)] + [2000]
            return PctStrategy(seed, depth, keys, self.pct_k())
        raise ValueError(f"unknown strategy {name!r}")

    def pct_k(self) -> int:
        """PCT's estimate k of how many real choices a schedule makes: the most that any of a
        few calibration runs made. One run undercounts when the CPU with the short path happens
        to go first, and change points past its count could then never be drawn."""
        if self._pct_k is None:
            counts = []
            for seed in range(PCT_CALIBRATION_RUNS):
                counter = CountingStrategy(seed)
                trio_run(self._run_one, counter, None, False)
                counts.append(counter.count)
            self._pct_k = max(max(counts), 1)
        return self._pct_k

    async def _run_one(self, strategy, seed: int | None, log: bool) -> RunResult:
        m = self.fresh()
        calls = [[] for _ in m.cpus]
        for spec in self.scn.agents:
            calls[spec.cpu].extend(_op_calls(m, spec))
        sched_class = ParkingSched if getattr(strategy, "parks", False) else Sched
        sched = sched_class(m, strategy, calls, fast=self.fast_path)
        m.attach_runtime(sched)
        if log:
            m.log = []
        await sched.run()
        if sched.abort is not None:
            raise sched.abort
        bug = sched.bug
        freed_concurrently = sum(1 for h in m.history.values() for e in h
                                 if e["what"] == "freed the table page")
        if bug is None:
            try:
                rcu_mod.rcu_barrier(m)  # end-of-run drain: grace periods and callbacks
                check_end_of_run(m)
            except BugFound as found:
                bug = found.finding
        leftover = strategy.leftover() if isinstance(strategy, ReplayStrategy) else 0
        return RunResult(seed=seed, bug=bug, hazards=list(m.hazards), steps=min(m.step, m.max_steps),
                         choices=sched.choices, stats=self.stats(m), log=m.log,
                         tables_freed_concurrently=freed_concurrently, leftover=leftover)

    @staticmethod
    def stats(m: Machine) -> dict:
        return {name: {"vm_pte_kb": 4 * (mm.nr_ptes + mm.nr_pmds + mm.nr_puds),
                       "nr_ptes": mm.nr_ptes, "nr_pmds": mm.nr_pmds, "nr_puds": mm.nr_puds,
                       "rss_kb": 4 * mm.rss}
                for name, mm in sorted(m.mms.items())}

    # -- public entry points ----------------------------------------------------------------
    def run_seeds(self, seeds, strategy: str = "random", depth: int = 3, on_result=None,
                  stop_on_first: bool = False) -> list[RunResult]:
        """Many schedules inside one trio.run (cheaper than one trio.run each). With on_result
        each result goes there and is not kept: a long stress holds no memory per schedule."""
        if strategy == "pct":
            self.pct_k()

        async def batch():
            results = []
            for seed in seeds:
                result = await self._run_one(self.strategy(strategy, seed, depth), seed, False)
                if on_result is not None:
                    on_result(result)
                else:
                    results.append(result)
                if stop_on_first and result.bug is not None:
                    break
            return results

        return trio_run(batch)

    def run_seed(self, seed: int, strategy: str = "random", depth: int = 3, log: bool = False) -> RunResult:
        if strategy == "pct":
            self.pct_k()
        return trio_run(self._run_one, self.strategy(strategy, seed, depth), seed, log)

    def replay(self, choices: list[int], log: bool = True) -> RunResult:
        """Re-run exactly the schedule the choices name. Raises Divergence if they do not fit."""
        result = trio_run(self._run_one, ReplayStrategy(list(choices)), None, log)
        if result.leftover:
            raise Divergence(f"the run ended at step {result.steps} with {result.leftover} "
                             "of the token's choices unused")
        return result
