"""Building the machine a scenario describes: VMAs, MAP_POPULATE, [[setup]], the post-setup
snapshot every schedule starts from, and each CPU's agent calls.
"""

from __future__ import annotations

import pickle

import ptsim.agents  # noqa: F401  (registers the shipped ops)
from ptsim.kernel_model import rcu
from ptsim.kernel_model.errors import NotModelled, SetupBlocked
from ptsim.kernel_model.machine import Machine
from ptsim.kernel_model.mm import Mm, Vma
from ptsim.kernel_model.pagetable import PAGE_SIZE
from ptsim.kernel_model.registry import ACTIVE_OPS, OPS, Config, Faults
from ptsim.kernel_model.snapshot import compile_copier

from .scenario import Scenario

# Parameter types whose values are user addresses: a repetition's stride moves them.
ADDRESS_TYPES = ("addr", "pmd_addr")


class OpCall:
    """One op of an agent, bound to its address space and arguments: ``call(cpu)`` makes the CPU
    run it (the op becomes the outermost frame of its backtrace, the mm its current->mm)."""

    __slots__ = ("name", "fn", "mm", "kwargs")

    def __init__(self, name: str, fn, mm, kwargs: dict) -> None:
        self.name = name
        self.fn = fn
        self.mm = mm
        self.kwargs = kwargs

    def __call__(self, cpu):
        cpu.op = self.name
        cpu.mm = self.mm
        return self.fn(cpu, **self.kwargs)


def not_modelled(scn: Scenario) -> str | None:
    """Why this scenario cannot run on the current model, or None."""
    for vma in scn.vmas:
        if vma.uffd_wp:
            return "uffd_wp = true"
    for spec in (*scn.setup, *scn.agents):
        for op in spec.ops:
            if op.op not in OPS:
                return f"op {op.op!r} ({spec.key})"
    return None


def op_calls(m: Machine, spec) -> list[OpCall]:
    """The calls an agent or setup entry expands to (repeat x do), on machine ``m``."""
    mm = m.mms[spec.mm]
    calls = []
    for rep in range(spec.repeat):
        shift = rep * spec.stride
        for op in spec.ops:
            entry = OPS[op.op]
            kwargs = dict(op.args)
            if shift:
                for param in entry.params:
                    if param.type in ADDRESS_TYPES:
                        kwargs[param.name] += shift
            calls.append(OpCall(op.op, ACTIVE_OPS.get(op.op, entry.fn), mm, kwargs))
    return calls


def agent_calls(m: Machine, scn: Scenario) -> list[list[OpCall]]:
    """Each CPU's agent calls, in file order."""
    calls: list[list[OpCall]] = [[] for _ in m.cpus]
    for spec in scn.agents:
        calls[spec.cpu].extend(op_calls(m, spec))
    return calls


def _run_to_completion(coro):
    """Setup never suspends (no scheduling points, nothing to wait for): drive it directly."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise SetupBlocked("setup tried to suspend")


def build_machine(scn: Scenario) -> Machine:
    """The machine after setup: VMAs, populate, [[setup]] entries, every callback drained."""
    reason = not_modelled(scn)
    if reason:
        raise NotModelled(reason)
    m = Machine(scn.cpus, Config(scn.cfg), Faults(scn.flt), scn.max_steps)
    for i, v in enumerate(scn.vmas):
        if v.mm not in m.mms:
            m.mms[v.mm] = Mm(v.mm, m.mem.alloc_table(4, v.mm, (None, "mm_alloc_pgd", 0)))
        m.mms[v.mm].vmas.append(Vma(i, v.mm, v.start, v.end, v.type, v.thp, v.file, v.pgoff,
                                    v.uffd_wp))
    for mm in m.mms.values():
        mm.vmas.sort(key=lambda vma: vma.start)
    for spec in scn.agents:
        m.mms[spec.mm].cpumask.add(spec.cpu)

    def run_on(cpu, call: OpCall) -> None:
        cpu.idle = False
        m.running = cpu
        try:
            _run_to_completion(call(cpu))
        finally:
            cpu.idle = True
            cpu.op = cpu.mm = None
            m.running = None
        rcu.rcu_barrier(m)

    cpu0 = m.cpus[0]
    fault = OPS["fault"].fn
    for v in scn.vmas:
        if v.populate:
            mm = m.mms[v.mm]
            mm.cpumask.add(0)
            for addr in range(v.start, v.end, PAGE_SIZE):
                # MAP_POPULATE (populate_vma_page_range -> handle_mm_fault): write faults for
                # anon memory, no TLB fills.
                run_on(cpu0, OpCall("fault", fault, mm, {"addr": addr,
                                                         "write": v.type == "anon"}))
    for spec in scn.setup:
        m.mms[spec.mm].cpumask.add(spec.cpu)
        cpu = m.cpus[spec.cpu]
        for call in op_calls(m, spec):
            run_on(cpu, call)
    m.history.clear()
    return m


class Workload:
    """A scenario made ready to run: the post-setup machine, pickled once, and how to lay out
    the agents on a fresh copy of it.

    A fresh copy is what pickle.loads of the snapshot gives. It is made by the copier that
    kernel_model/snapshot.py compiles from one such restored machine (the template, never run),
    ~10 times cheaper than pickle.loads; the copier is used only if a copy pickles to the same
    bytes as the template, else (and for graphs it declines) pickle.loads makes every copy."""

    def __init__(self, scn: Scenario) -> None:
        self.scn = scn
        machine = build_machine(scn)
        self.option_keys = machine.option_keys()
        self.snapshot = pickle.dumps(machine, protocol=pickle.HIGHEST_PROTOCOL)
        self._copy = self._copier()
        # Each CPU's agent calls as (op, its registered function, mm name, arguments), laid out
        # once: calls() binds them to a machine (op_calls' registry lookups, argument copies
        # and repetition strides cost more than a short schedule's first steps).
        self._layout = [[(c.name, OPS[c.name].fn, c.mm.name, c.kwargs) for c in cpu]
                        for cpu in agent_calls(machine, scn)]

    def _copier(self):
        template = pickle.loads(self.snapshot)
        copy = compile_copier(template)
        if copy is None:
            return None
        as_pickled = pickle.dumps(template, protocol=pickle.HIGHEST_PROTOCOL)
        if pickle.dumps(copy(), protocol=pickle.HIGHEST_PROTOCOL) != as_pickled:
            return None
        return copy

    def fresh(self) -> Machine:
        if self._copy is not None:
            return self._copy()
        return pickle.loads(self.snapshot)

    def calls(self, m: Machine) -> list[list[OpCall]]:
        """agent_calls(m, scn): an op's function is looked up now (a variant's replacement is
        installed only while its engine runs); the arguments are shared, never changed (a call
        passes them as keywords)."""
        mms, active = m.mms, ACTIVE_OPS
        return [[OpCall(name, active.get(name, fn), mms[mm], kwargs)
                 for name, fn, mm, kwargs in cpu] for cpu in self._layout]
