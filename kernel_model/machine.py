"""The simulated machine: CPUs, memory, address spaces, config, and the sanitizer's view.

Everything here is plain, picklable kernel state. The engine attaches three callables at run
time (``point``, ``wait``, ``choose_fault``): a primitive calls ``await m.point(cpu)`` before it
touches shared state, which is where the scheduler may switch CPUs.
"""

from __future__ import annotations

import sys
from collections import deque
from types import CodeType
from typing import Callable

from .errors import BugFound, Finding
from .memory import FREE, LEVEL_NAMES, PAGETABLE, Memory
from .mm import Mm
from .rcu import Rcu
from .snapshot import Snapshotted
from .tlb import Tlb


class Cpu(Snapshotted):
    """Per-CPU state: IRQ flag, preempt count, RCU nesting, the loaded mm, TLBs, pending IPIs."""

    def __init__(self, m: "Machine", cpu_id: int) -> None:
        self.m = m
        self.id = cpu_id
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

    def backtrace(self) -> tuple[str, ...]:
        """The kernel functions this CPU is in, innermost first: IPI handlers, then its own
        stack (live frames if it is the CPU running now, else its parked task's await chain),
        then the scenario op. A scenario op named like its kernel function appears once."""
        m = self.m
        names = self.irq[::-1]
        if m.running is self:
            names += _frames(sys._getframe(1))
        elif m.sched is not None and m.sched.tasks[self.id] is not None:
            names += _suspended(m.sched.tasks[self.id].coro)
        if self.op is not None:
            names.append(self.op)
        trace: list[str] = []
        for name in names:
            if not trace or trace[-1] != name:
                trace.append(name)
        return tuple(trace)

    def func(self, default: str = "-") -> str:
        """The innermost kernel function this CPU is in (cheaper than backtrace()[0])."""
        if self.irq:
            return self.irq[-1]
        if self.m.running is self:
            return next(_frames(sys._getframe(1)), None) or self.op or default
        trace = self.backtrace()
        return trace[0] if trace else default

    def quiescent(self) -> bool:
        return self.idle or (self.rcu_depth == 0 and self.irqs_on and self.preempt == 0)

    def __repr__(self) -> str:
        return f"CPU{self.id}"


# Code object of every kernel function (@kfunc) -> its name: the unwinder's symbol table.
KFUNCS: dict[CodeType, str] = {}


def kfunc(fn: Callable) -> Callable:
    """Mark an agent coroutine as a kernel function: events and reports name it.

    Free at run time (the seed-002 measurement calls these millions of times): nothing is
    pushed on entry. Like the kernel's unwinder, a report reads the backtrace off the stack
    itself when it needs one (Cpu.backtrace)."""
    KFUNCS[fn.__code__] = fn.__name__
    return fn


def _frames(frame):
    """Kernel functions on a live Python stack, innermost first (lazily: func() wants one)."""
    while frame is not None:
        name = KFUNCS.get(frame.f_code)
        if name is not None:
            yield name
        frame = frame.f_back


def _suspended(coro) -> list[str]:
    """Kernel functions of a task parked between steps, innermost first: its await chain."""
    names = []
    while coro is not None and hasattr(coro, "cr_code"):
        name = KFUNCS.get(coro.cr_code)
        if name is not None:
            names.append(name)
        coro = coro.cr_await
    names.reverse()
    return names


def _backtrace(cpu: Cpu | None) -> tuple[str, ...]:
    return () if cpu is None else cpu.backtrace()


async def _no_point(cpu) -> None:
    return None


class Machine(Snapshotted):
    def __init__(self, ncpus: int, cfg: dict, flt: dict, max_steps: int) -> None:
        self.cfg = cfg
        self.flt = flt
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
        self.ptlocks: dict = {}
        self.files: dict = {}  # file name -> AddressSpace (page cache, i_mmap lock, folio locks)
        self.deposits: dict[tuple, list[int]] = {}  # pmd -> deposited PTE tables (THP)  # table pfn -> its split ptlock (pagetable_ctor .. pagetable_dtor)
        self.attach_runtime(None)

    # -- runtime attachments (never pickled) ---------------------------------------------
    def attach_runtime(self, sched) -> None:
        self.sched = sched
        self.log: list[dict] | None = None
        self.lean: Cpu | None = None  # set by the scheduler: see lean_step()
        self.running: Cpu | None = None  # the CPU whose code runs now (the engine sets it)
        if sched is None:
            self.point = _no_point
            self.wait = None
            self.choose_fault = None
        else:
            self.point = sched.point
            self.wait = sched.wait
            self.choose_fault = sched.choose_fault

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("sched", "log", "point", "wait", "choose_fault", "lean", "running"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        Snapshotted.__setstate__(self, state)
        self.attach_runtime(None)

    # -- events ------------------------------------------------------------------------
    def who(self, cpu: Cpu | None, what: str = "") -> tuple:
        if cpu is None:
            return (None, what or "setup", self.step)
        return (cpu.id, cpu.func(what), self.step)

    def ev(self, cpu: Cpu | None, event: str, **fields) -> None:
        if self.log is not None:
            rec = {"step": self.step, "cpu": None if cpu is None else cpu.id,
                   "func": cpu.func() if cpu is not None else "-", "event": event}
            rec.update(fields)
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
        history: list[dict] = []
        for key in keys:
            history.extend(self.history.get(key, []))
            if key[0] == "page" and self.mem.free_by[key[1]] is not None:
                # Folio frees are the hot path of big runs: their history is the shadow
                # state's free_by, turned into a report entry only here.
                cpu_id, func, step = self.mem.free_by[key[1]]
                history.append({"cpu": cpu_id, "func": func, "step": step, "what": "freed the folio"})
        history.sort(key=lambda h: h["step"])
        finding = Finding(kind=kind, summary=summary, cpu=None if cpu is None else cpu.id,
                          func=cpu.func() if cpu is not None else None, step=self.step,
                          obj=obj, history=history, pfns=pfns, detail=detail or [],
                          backtrace=_backtrace(cpu),
                          access=access)
        return BugFound(finding)

    def livelock(self, cpu: Cpu) -> BugFound:
        return self.bug("livelock", cpu, f"the schedule reached max_steps = {self.max_steps} "
                        f"(CPU{cpu.id} in {cpu.func()})", obj="max_steps")

    def hazard(self, kind: str, cpu: Cpu | None, summary: str, obj: str = "") -> None:
        """Hazards are counted, not fatal: the schedule goes on. The first of each kind is kept."""
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
            raise self.bug("pt-use-after-free", cpu,
                           f"CPU{cpu.id} {op} reads freed {level} page pfn {pfn:#x} in {cpu.func()}",
                           obj=f"{level} table pfn {pfn:#x}", keys=(("pt", pfn),), pfns=(pfn,),
                           access=f"{op} on freed table {pfn:#x}")
        raise self.bug("pt-use-after-free", cpu,
                       f"CPU{cpu.id} {op} treats {mem.describe(pfn)} as a page table in {cpu.func()}",
                       obj=mem.describe(pfn), keys=(("pt", pfn),), pfns=(pfn,),
                       access=f"{op} on {mem.describe(pfn)}")
