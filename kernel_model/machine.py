"""The simulated machine: CPUs, memory, address spaces, config, and the sanitizer's view.

Everything here is plain, picklable kernel state. A scheduler attaches itself at run time
(``attach_runtime``): a primitive calls ``await m.point(cpu)`` before it touches shared state,
which is where the scheduler may switch CPUs, and ``await m.wait(cpu, pred, reason)`` when it
cannot go on. The machine offers the scheduler what may happen besides a CPU's step (pending
events that fire themselves: pending_events) and describes a stuck machine (deadlock); the
scheduler knows nothing of the kernel.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import deque

from .errors import BugFound, Finding, SetupBlocked
from .ipi import IpiDelivery, deliver_ipi
from .locks import DEADLOCK
from .memory import FREE, LEVEL_NAMES, PAGETABLE, PT_USE_AFTER_FREE, Memory
from .mm import Mm
from .rcu import GracePeriodEnd, Rcu, note_quiescent, rcu_barrier
from .registry import KFUNC_IDS, KINDS, Config, Faults, bug_kind, kfunc_name
from .sanitizers import check_end_of_run
from .snapshot import Snapshotted
from .tlb import Tlb

LIVELOCK = bug_kind("livelock", "the schedule reached max_steps")
OP_CRASH = bug_kind(
    "op-crash",
    "a Python exception raised inside an op during a schedule (a user's op or patched kernel "
    "function, or the model itself): reported with its traceback, CPU and step")


class Cpu(Snapshotted):
    """Per-CPU state: IRQ flag, preempt count, RCU nesting, the loaded mm, TLBs, pending IPIs.

    To the scheduler a CPU is a runner: ``id``, ``idle``, and ``key``, its identity among the
    options of a choice (PCT's priorities, shrink's decisions); pending events have keys too."""

    is_event = False
    prompt = False  # (an event's: see ptsim/strategies/guided.py, cost())
    eager = False
    __state_ref_always__ = True

    def __state_ref__(self):
        return ("cpu", self.id)

    def __init__(self, m: "Machine", cpu_id: int) -> None:
        self.m = m
        self.id = cpu_id
        self.key = cpu_id
        self.mm: Mm | None = None  # current->mm: the address space of the op this CPU runs
        self.irqs_on = True
        self.preempt = 0  # preempt_disable nesting; held and spinning spinlocks count
        self.rcu_depth = 0
        self.idle = True  # no task of the model running: an extended quiescent state
        self.lazy = False  # a kernel thread runs with this mm loaded lazily
        self.in_insn = False  # a user access (and its hardware walk) is in flight
        self.tlbs: dict[str, Tlb] = {}
        self.ipis: deque = deque()  # IPIs sent to this CPU, not yet handled
        self.held: list = []  # spinlocks held, in acquisition order
        self.lockdep: list[tuple[str, str]] = []  # (class, name) of every lock held, for lockdep
        self.op: str | None = None  # the scenario op this CPU runs: the outermost frame
        self.irq: list[str] = []  # IPI handlers running on this CPU, innermost last

    def tlb(self, mm: str) -> Tlb:
        tlb = self.tlbs.get(mm)
        if tlb is None:
            tlb = self.tlbs[mm] = Tlb()
        return tlb

    def backtrace(self, skip: int = 1) -> tuple[str, ...]:
        """The kernel functions this CPU is in, innermost first: IPI handlers, then its own
        stack (live frames if it is the CPU running now, else its parked task's await chain),
        then the scenario op. A scenario op named like its kernel function appears once."""
        m = self.m
        names = self.irq[::-1]
        if m.running is self:
            names += _frames(sys._getframe(skip))
        elif m.sched is not None and (coro := m.sched.parked(self)) is not None:
            names += _suspended(coro)
        if self.op is not None:
            names.append(self.op)
        trace: list[str] = []
        for name in names:
            if not trace or trace[-1] != name:
                trace.append(name)
        return tuple(trace)

    def func(self, default: str = "-", frame=None) -> str:
        """The innermost kernel function this CPU is in (cheaper than backtrace()[0]). A caller
        that knows the frames above it are no kernel function's may start the walk at
        ``frame`` (a live frame of this CPU's stack)."""
        if self.irq:
            return self.irq[-1]
        if self.m.running is self:
            # _frames and kfunc_name written out: a generator left suspended after its first
            # name is closed by throwing GeneratorExit into it, which cost more than the walk
            # itself, and a call per frame would be most of what is left.
            if frame is None:
                frame = sys._getframe(1)
            kfuncs = KFUNC_IDS
            root = _UNWIND_ROOT[0]
            while frame is not None:
                code = frame.f_code
                entry = kfuncs.get(id(code))
                if entry is not None and entry[0] is code:
                    return entry[1]
                if code is root:
                    break
                frame = frame.f_back
            return self.op or default
        trace = self.backtrace()
        return trace[0] if trace else default

    def enter_idle(self) -> None:
        """Its agents are done: an idle CPU takes its pending IPIs at once."""
        m = self.m
        fp = m.fp
        if fp is not None:  # part of its last step: an idle CPU is quiescent, takes IPIs at once
            fp.touch(m.step, ("idle", self.id), True)
            if m.rcu.gp_active:
                fp.pin(m.step)
            if self.ipis:
                fp.touch(m.step, ("tlb", self.id), True)
                fp.touch(m.step, ("ipi", self.id), True)
                fp.touch(m.step, ("ipiq", self.id), True)
                for ipi in self.ipis:
                    fp.touch(m.step, ("ipi-sender", ipi.sender), False)
        self.op = None
        self.mm = None
        while self.ipis:
            deliver_ipi(self.m, self)

    def quiescent(self) -> bool:
        return self.idle or (self.rcu_depth == 0 and self.irqs_on and self.preempt == 0)

    def __repr__(self) -> str:
        return f"CPU{self.id}"


# The code every CPU's agents run under (the scheduler's loop over a CPU's ops says so: see
# unwind_root). No kernel function lies below it, only the engine's and trio's frames, so
# Cpu.func stops there: a step in an op's own code (a user access) walked the whole stack.
_UNWIND_ROOT: list = [None]


def unwind_root(code) -> None:
    """Declare the code object of the frame each CPU's agents are called from."""
    _UNWIND_ROOT[0] = code


def _frames(frame):
    """Kernel functions on a live Python stack, innermost first (lazily)."""
    while frame is not None:
        name = kfunc_name(frame.f_code)
        if name is not None:
            yield name
        frame = frame.f_back


def _suspended(coro) -> list[str]:
    """Kernel functions of a task parked between steps, innermost first: its await chain."""
    names = []
    while coro is not None and hasattr(coro, "cr_code"):
        name = kfunc_name(coro.cr_code)
        if name is not None:
            names.append(name)
        coro = coro.cr_await
    names.reverse()
    return names


def _registered(kind: str, cls: str) -> None:
    entry = KINDS.get(kind)
    if entry is None or entry.cls != cls:
        raise AssertionError(f"{kind!r} is not a registered {cls} kind (declare it with bug_kind)")


def _backtrace(cpu: Cpu | None) -> tuple[str, ...]:
    return () if cpu is None else cpu.backtrace()


async def _no_point(cpu) -> None:
    return None


async def _setup_wait(cpu, pred, reason) -> None:
    """Setup runs one entry at a time: nothing could ever end a wait."""
    if not pred():
        raise SetupBlocked(f"setup would block: CPU{cpu.id} {reason.describe(cpu.m)}")


class Machine(Snapshotted):
    # Runtime attachments (never pickled) and event objects the state cache need not hash.
    _RUNTIME = ("sched", "log", "point", "wait", "lean", "solo", "running", "fp")
    __state_skip__ = frozenset(_RUNTIME + ("history", "hazards", "cfg", "flt", "max_steps",
                                           "lock_deps", "ipi_events", "gp_end"))
    __state_ref_always__ = True

    def __state_ref__(self):
        return "Machine"

    def __init__(self, ncpus: int, cfg: Config | dict, flt: Faults | dict, max_steps: int) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else Config(cfg)
        self.flt = flt if isinstance(flt, Faults) else Faults(flt)
        self.max_steps = max_steps
        self.mem = Memory()
        self.mms: dict[str, Mm] = {}
        self.cpus = [Cpu(self, i) for i in range(ncpus)]
        self.rcu = Rcu()
        self.step = 0  # concurrent-phase steps so far; 0 during setup
        self.hazards: list[Finding] = []
        self.history: dict[object, list[dict]] = {}  # object -> its free/clear/unlink events
        self.lock_deps: dict[tuple[str, str], tuple] = {}  # lockdep: class -> class, first seen
        self.pt_parent: dict[int, tuple] = {}  # table pfn -> the entry that links it in
        self.ptlocks: dict = {}  # table pfn -> its split ptlock (pagetable_ctor .. pagetable_dtor)
        self.files: dict = {}  # file name -> AddressSpace (page cache, i_mmap lock, folio locks)
        self.deposits: dict[tuple, list[int]] = {}  # pmd -> deposited PTE tables (THP)
        self.ipi_events = [IpiDelivery(c) for c in self.cpus]
        # What could make an event pending: the IPIs queued on any CPU and not yet handled
        # (smp_call_function_many, deliver_ipi), plus one while a grace period runs (rcu.py).
        # The scheduler makes a choice at nearly every step, and mostly there is none.
        self.events_live = 0
        self.gp_end = GracePeriodEnd(self)
        self.fp = None  # step footprints, when a consumer records them (footprint.py)
        self.attach_runtime(None)

    # -- runtime attachments (never pickled) ---------------------------------------------
    def attach_runtime(self, sched) -> None:
        self.sched = sched
        self.log: list[dict] | None = None
        self.solo: Cpu | None = None  # the only CPU with work, if exactly one has (set_solo)
        self.lean: Cpu | None = None  # the CPU that may step without asking: see lean_step()
        self.running: Cpu | None = None  # the CPU whose code runs now (the engine sets it)
        if sched is None:
            self.point = _no_point
            self.wait = _setup_wait
        else:
            self.point = sched.point
            self.wait = sched.wait

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in self._RUNTIME:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        Snapshotted.__setstate__(self, state)
        self.fp = None
        self.attach_runtime(None)

    # -- what the scheduler is offered ---------------------------------------------------
    def choose_fault(self, cpu: Cpu, name: str, covered: bool = False) -> bool:
        """Does fault ``name`` fire here? A recorded scheduler choice when its probability is
        strictly between 0 and 1; during setup only a certain fault fires.

        The step goes one way or the other, and its footprint records only the way it went, so
        explore never puts it to sleep (footprint.py) unless the caller has ``covered`` it:
        declared, before the choice, everything either way touches in this step."""
        p = getattr(self.flt, name)
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        if self.sched is None:
            return False
        if self.fp is not None and not covered:
            self.fp.pin(self.step)
        return self.sched.decide_fault(cpu, p)

    def pending_events(self, opts: list) -> None:
        """Append to ``opts`` what may happen now besides a CPU's step: the delivery of an IPI
        to a CPU with IRQs on, and the end of a grace period every CPU has been quiescent in.
        Each fires itself (``fire()``) when the scheduler chooses it."""
        if not self.events_live:
            return
        for c in self.cpus:
            if c.ipis and c.irqs_on:
                opts.append(self.ipi_events[c.id])
        if self.rcu.gp_active and note_quiescent(self):
            opts.append(self.gp_end)

    def set_solo(self, cpu: Cpu | None) -> None:
        """The scheduler says ``cpu`` is the only CPU with work (or None): it may then count
        its steps without asking (lean_step), except while a grace period runs, whose end
        competes with it."""
        self.solo = cpu
        self.lean = None if self.rcu.gp_active else cpu

    def end_of_run(self) -> None:
        """Every agent is done: let every grace period end and its callbacks run, then check
        the accounting (raises BugFound)."""
        if self.fp is not None:  # what the drain touches is no step's
            self.fp.cur = -1
        rcu_barrier(self)
        check_end_of_run(self)

    def release(self) -> None:
        """Its schedule is over and nothing will read this copy again: drop the references
        that point back at it (each CPU's and the grace-period end's ``m``, the scheduler's
        hooks), so that reference counting frees it at once. Left to the cyclic GC, every
        dead copy's objects, its 512-entry tables above all, were traversed by a gen0 and a
        gen1 collection or two: ~70 k instructions per D1 schedule."""
        for cpu in self.cpus:
            cpu.m = None
        self.gp_end.m = None
        self.attach_runtime(None)

    def quiet_for(self, cpu: Cpu) -> bool:
        """Nothing but ``cpu``'s own step can happen now, as far as events go: no IPI waits
        for it and no grace period may end (its quiescent states are recorded all the same)."""
        return not cpu.ipis and (not self.rcu.gp_active or not note_quiescent(self))

    def option_keys(self) -> list[int]:
        """The key of every option a choice may offer: CPUs, IPI deliveries, the grace-period
        end (PCT gives each a priority)."""
        return ([c.key for c in self.cpus] + [e.key for e in self.ipi_events]
                + [self.gp_end.key])

    def deadlock(self, waits: list) -> BugFound:
        """No CPU can make progress. ``waits[i]`` is CPU i's WaitReason, or None if it is
        runnable (which, when this is called, only an IRQ-off wait cycle can leave stuck)."""
        chain = []
        for c in self.cpus:
            if c.idle:
                continue
            irq = "IRQs off" if not c.irqs_on else "IRQs on"
            reason = waits[c.id]
            if reason is None:
                chain.append(f"CPU{c.id} ({irq}) is runnable")
            else:
                chain.append(f"CPU{c.id} ({irq}) in {c.func()} {reason.describe(self)}")
        cpu = next((c for c in self.cpus if not c.idle), None)
        return self.bug(DEADLOCK, cpu, "no CPU can make progress: " + "; ".join(chain),
                        obj="wait-for chain", detail=chain)

    def stats(self) -> dict:
        """Per address space, the kernel's own counters (VmPTE counts PTE, PMD and PUD table
        pages, 4 KB each, as /proc/PID/status does)."""
        return {name: {"vm_pte_kb": 4 * (mm.nr_ptes + mm.nr_pmds + mm.nr_puds),
                       "nr_ptes": mm.nr_ptes, "nr_pmds": mm.nr_pmds, "nr_puds": mm.nr_puds,
                       "rss_kb": 4 * mm.rss}
                for name, mm in sorted(self.mms.items())}

    # -- events ------------------------------------------------------------------------
    def who(self, cpu: Cpu | None, what: str = "") -> tuple:
        if cpu is None:
            return (None, what or "setup", self.step)
        return (cpu.id, cpu.func(what, sys._getframe(1)), self.step)  # (from the caller)

    def ev(self, cpu: Cpu | None, event: str, **fields) -> None:
        """Log an event (only in a logged replay). ``stack`` is the CPU's kernel call stack,
        outermost first (IPI handlers last): trace viewers draw function slices from it."""
        if self.log is not None:
            stack = list(reversed(cpu.backtrace(2))) if cpu is not None else []
            rec = {"step": self.step, "cpu": None if cpu is None else cpu.id,
                   "func": stack[-1] if stack else "-", "event": event}
            rec.update(fields)
            rec["stack"] = stack
            self.log.append(rec)

    def remember(self, key: object, cpu: Cpu | None, what: str) -> None:
        """Keep, per object, the steps that freed or changed it: reports name them."""
        cpu_id, func, step = self.who(cpu, what)
        self.history.setdefault(key, []).append(
            {"cpu": cpu_id, "func": func, "step": step, "what": what})

    # -- sanitizer helpers ---------------------------------------------------------------
    def bug(self, kind: str, cpu: Cpu | None, summary: str, obj: str = "",
            keys: tuple = (), pfns: tuple = (), detail: list[str] | None = None,
            access: str = "") -> BugFound:
        _registered(kind, "bug")
        history: list[dict] = []
        for key in keys:
            history.extend(self.history.get(key, []))
            if key[0] == "page" and self.mem.free_by[key[1]] is not None:
                # Folio frees are the hot path of big runs: their history is the shadow
                # state's free_by, turned into a report entry only here.
                cpu_id, func, step = self.mem.free_by[key[1]]
                history.append({"cpu": cpu_id, "func": func, "step": step,
                                "what": "freed the folio"})
        history.sort(key=lambda h: h["step"])
        finding = Finding(kind=kind, summary=summary, cpu=None if cpu is None else cpu.id,
                          func=cpu.func() if cpu is not None else None, step=self.step,
                          obj=obj, history=history, pfns=pfns, detail=detail or [],
                          backtrace=_backtrace(cpu),
                          access=access)
        return BugFound(finding)

    def op_crash(self, cpu: Cpu, exc: Exception) -> BugFound:
        """An exception escaped the op ``cpu`` runs: a finding with the Python traceback (file
        names without directories, so the report is the same on any machine)."""
        frames = traceback.extract_tb(exc.__traceback__)[1:]  # [0] is the scheduler's loop
        codes = []
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        while tb is not None:
            codes.append(tb.tb_frame.f_code)
            tb = tb.tb_next
        where = frames[-1].name if frames else cpu.op or "-"
        detail = [f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
                  for f in frames]
        names = [kfunc_name(code) or code.co_name for code in reversed(codes)]
        message = f"{type(exc).__name__}: {exc}".strip()
        trace = tuple(dict.fromkeys([*names, cpu.op or "-"]))
        finding = Finding(kind=OP_CRASH, summary=f"CPU{cpu.id} {message} in {where} "
                          f"(op {cpu.op}) at step {self.step}", cpu=cpu.id, func=where,
                          step=self.step, obj=message, detail=["Traceback:", *detail, message],
                          backtrace=trace, access=message)
        return BugFound(finding)

    def livelock(self, cpu: Cpu) -> BugFound:
        return self.bug(LIVELOCK, cpu, f"max_steps reached: the schedule ran {self.max_steps} "
                        f"steps (CPU{cpu.id} in {cpu.func()})", obj="max_steps",
                        access="one step past max_steps")

    def hazard(self, kind: str, cpu: Cpu | None, summary: str, obj: str = "") -> None:
        """Hazards are counted, not fatal: the schedule goes on. The first of each kind is kept."""
        _registered(kind, "hazard")
        if any(h.kind == kind for h in self.hazards):
            return
        self.hazards.append(Finding(kind=kind, summary=summary, cpu=None if cpu is None else cpu.id,
                                    func=cpu.func() if cpu is not None else None, step=self.step,
                                    obj=obj, backtrace=_backtrace(cpu)))
        self.ev(cpu, "hazard", kind=kind, summary=summary)

    def check_table(self, cpu: Cpu, pfn: int, op: str) -> None:
        """KASAN for page-table contents: a software access to a table that is not live."""
        mem = self.mem
        kind = mem.kind[pfn]
        if kind == PAGETABLE:
            return
        if kind == FREE and pfn in mem.level:
            level = LEVEL_NAMES[mem.level[pfn]]
            raise self.bug(PT_USE_AFTER_FREE, cpu,
                           f"CPU{cpu.id} {op} reads freed {level} page pfn {pfn:#x} in "
                           f"{cpu.func()}",
                           obj=f"{level} table pfn {pfn:#x}", keys=(("pt", pfn),), pfns=(pfn,),
                           access=f"{op} on freed table {pfn:#x}")
        raise self.bug(PT_USE_AFTER_FREE, cpu,
                       f"CPU{cpu.id} {op} treats {mem.describe(pfn)} as a page table in "
                       f"{cpu.func()}",
                       obj=mem.describe(pfn), keys=(("pt", pfn),), pfns=(pfn,),
                       access=f"{op} on {mem.describe(pfn)}")
