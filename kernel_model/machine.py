"""The simulated machine: CPUs, memory, address spaces, config, and the sanitizer's view.

Everything here is plain, picklable kernel state. The engine attaches three callables at run
time (``point``, ``wait``, ``choose_fault``): a primitive calls ``await m.point(cpu)`` before it
touches shared state, which is where the scheduler may switch CPUs.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from typing import Callable

from .errors import BugFound, Finding
from .memory import FREE, LEVEL_NAMES, PAGETABLE, Memory
from .mm import Mm
from .rcu import Rcu
from .tlb import Tlb


class Cpu:
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
        self.fstack: list[str] = []  # kernel functions being executed, innermost last

    def tlb(self, mm: str) -> Tlb:
        tlb = self.tlbs.get(mm)
        if tlb is None:
            tlb = self.tlbs[mm] = Tlb()
        return tlb

    def func(self) -> str:
        return self.fstack[-1] if self.fstack else "-"

    def quiescent(self) -> bool:
        return self.idle or (self.rcu_depth == 0 and self.irqs_on and self.preempt == 0)

    def __repr__(self) -> str:
        return f"CPU{self.id}"


def kfunc(fn: Callable) -> Callable:
    """Mark an agent coroutine as a kernel function: events and reports name it.

    The wrapper is generated with fn's own parameter list (no *args/**kwargs packing: it runs
    millions of times in the seed-002 measurement). No try/finally: an exception ends the
    schedule, and the stack left behind is the backtrace the report wants."""
    sig = inspect.signature(fn)
    params, call, namespace = [], [], {"_fn": fn, "_name": fn.__name__}
    kw_only = False
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return _kfunc_generic(fn)
        if p.kind is p.KEYWORD_ONLY and not kw_only:
            params.append("*")
            kw_only = True
        text = p.name
        if p.default is not p.empty:
            namespace[f"_d_{p.name}"] = p.default
            text += f"=_d_{p.name}"
        params.append(text)
        call.append(f"{p.name}={p.name}" if kw_only else p.name)
    src = (f"async def {fn.__name__}({', '.join(params)}):\n"
           f"    stack = cpu.fstack\n"
           f"    stack.append(_name)\n"
           f"    result = await _fn({', '.join(call)})\n"
           f"    stack.pop()\n"
           f"    return result\n")
    exec(src, namespace)
    return functools.wraps(fn)(namespace[fn.__name__])


def _kfunc_generic(fn: Callable) -> Callable:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(cpu, *args, **kwargs):
        stack = cpu.fstack
        stack.append(name)
        result = await fn(cpu, *args, **kwargs)
        stack.pop()
        return result

    return wrapper


def _backtrace(cpu: Cpu | None) -> tuple[str, ...]:
    """Innermost first; a scenario op named like its kernel function appears once."""
    if cpu is None:
        return ()
    trace: list[str] = []
    for name in reversed(cpu.fstack):
        if not trace or trace[-1] != name:
            trace.append(name)
    return tuple(trace)


async def _no_point(cpu) -> None:
    return None


class Machine:
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
        for key in ("sched", "log", "point", "wait", "choose_fault", "lean"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.attach_runtime(None)

    # -- events ------------------------------------------------------------------------
    def who(self, cpu: Cpu | None, what: str = "") -> tuple:
        if cpu is None:
            return (None, what or "setup", self.step)
        return (cpu.id, cpu.func() if cpu.fstack else what, self.step)

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
