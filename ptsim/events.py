"""The structured event log: structlog JSON lines, plus text, trace-cmd and Perfetto renderings.

Events carry the step, the CPU, the kernel function and what happened, never wall-clock times
or Python object ids: the same token gives the same bytes anywhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import IO, Callable, Iterable

import structlog

from ptsim.kernel_model.registry import Registry, first_line

_SKIP = ("step", "cpu", "func", "event", "stack")


@dataclass(frozen=True)
class TraceFormat:
    name: str
    write: Callable[[list[dict], int, IO[str]], None]  # (events, number of CPUs, stream)
    doc: str
    report: bool  # the text report follows the trace on stdout


FORMATS: Registry[TraceFormat] = Registry("trace format")


def trace_format(name: str, report: bool = False):
    """Register a `replay --format` writer: ``fn(events, ncpus, stream)``."""

    def register(fn):
        FORMATS.add(name, TraceFormat(name, fn, first_line(fn.__doc__), report))
        return fn

    return register


def write_jsonl(events: Iterable[dict], fh: IO[str]) -> None:
    logger = structlog.wrap_logger(
        structlog.PrintLogger(fh),
        processors=[structlog.processors.JSONRenderer(sort_keys=True)],
    )
    for rec in events:
        fields = dict(rec)
        event = fields.pop("event")
        logger.msg(event, **fields)


def describe(rec: dict) -> str:
    """One event as a short phrase a kernel developer reads:
    'pmd_clear pmd 0x4[0]: pfn 0x5 -> none'."""
    ev = rec["event"]
    if "table" in rec and "idx" in rec and "val" in rec:
        where = f"{rec['table']}[{rec['idx']}]"
        if "old" in rec:
            return f"{ev} {where}: {rec['old']} -> {rec['val']}"
        return f"{ev} {where} = {rec['val']}"
    if "lock" in rec:
        extra = ""
        if "ok" in rec:
            extra = " ok" if rec["ok"] else " busy"
        if "owner" in rec:
            extra = f" (held by CPU{rec['owner']})"
        return f"{ev}({rec['lock']}){extra}"
    rest = " ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k not in _SKIP)
    return f"{ev} {rest}".rstrip()


def _fmt(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


@trace_format("json")
def _json_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """The structured event log: one JSON object per line, as --log writes it."""
    write_jsonl(events, fh)


@trace_format("text", report=True)
def _text_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """One line per event: step, CPU, kernel function and what happened; then the report."""
    fh.write("\n".join(text_lines(events)) + "\n")


@trace_format("ftrace")
def _ftrace_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """What `trace-cmd report` prints: a cpus=N line, then one line per event with its task,
    CPU, latency flags, timestamp (1 step = 1 us), event name and key=value arguments."""
    fh.write("\n".join(ftrace_lines(events, ncpus)) + "\n")


@trace_format("perfetto")
def _perfetto_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """Chrome trace-event JSON that ui.perfetto.dev opens: per CPU its kernel functions, locks
    held, IRQ-off and RCU read-side sections; RCU grace periods; IPI, TLB-flush and call_rcu
    flows; entry writes and the finding as instants; page-table counters."""
    trace = perfetto_trace(events, ncpus)
    # "traceEvents" first: older trace processors recognise JSON only by '{"traceEvents":['
    fh.write('{"traceEvents": ')
    json.dump(trace.pop("traceEvents"), fh, sort_keys=True)
    for key, value in trace.items():
        fh.write(f", {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    fh.write("}\n")


def text_lines(events: Iterable[dict]) -> list[str]:
    out = []
    for rec in events:
        cpu = "   -" if rec["cpu"] is None else f"CPU{rec['cpu']}"
        out.append(f"{rec['step']:6d} {cpu:>5} {rec['func']}: {describe(rec)}")
    return out


# -- what both trace writers read out of the log -------------------------------------------------

_FINDINGS = ("bug", "hazard")
_GP_EVENTS = ("gp_start", "gp_end")


def _finding(events: list[dict]) -> dict | None:
    """THE finding: the log's last event, when it is a bug or a hazard."""
    if events and events[-1].get("event") in _FINDINGS:
        return events[-1]
    return None


def _ncpus(events: list[dict], ncpus: int | None) -> int:
    seen = [rec["cpu"] + 1 for rec in events if isinstance(rec.get("cpu"), int)]
    return max([ncpus or 0, 1, *seen])


def _in_handler(rec: dict, handled: dict) -> bool:
    """rec ran inside the IPI handler whose completion ``handled`` (an ipi_handled) logs: the
    handler runs at once, between two steps of its CPU, and its name ends that CPU's stack."""
    return (rec.get("cpu") == handled.get("cpu") and rec.get("step") == handled.get("step")
            and rec.get("event") != "ipi_handled"
            and handled.get("ipi") in (rec.get("stack") or ()))


def _deliveries(events: list[dict]) -> tuple[dict[int, int], dict[int, object]]:
    """Per ipi_handled (by index): where the handler's events start. Per event inside an IPI
    handler (by index): the CPU that sent the IPI."""
    starts: dict[int, int] = {}
    senders: dict[int, object] = {}
    for j, rec in enumerate(events):
        if rec.get("event") != "ipi_handled":
            continue
        k = j
        while k > 0 and _in_handler(events[k - 1], rec):
            k -= 1
        starts[j] = k
        for i in range(k, j):
            senders[i] = rec.get("sender")
    return starts, senders


def _handles_idle(rec: dict, send: dict) -> bool:
    """rec is an idle target's handling of the IPI that ``send`` (an smp_call_function) logs
    after it: an idle CPU runs the handler inside the send."""
    if rec.get("step") != send.get("step") or rec.get("cpu") in (None, send.get("cpu")):
        return False
    if rec.get("event") == "ipi_handled":
        return (bool(rec.get("idle")) and rec.get("ipi") == send.get("ipi")
                and rec.get("sender") == send.get("cpu"))
    return send.get("ipi") in (rec.get("stack") or ())


def _causal_order(events: list[dict]) -> list[dict]:
    """The log, with each smp_call_function moved before the idle targets' handling of it,
    which the model logs first: an IPI's send comes before its handling on the timeline."""
    out: list[dict] = []
    for rec in events:
        if rec.get("event") == "smp_call_function":
            k = len(out)
            idle = False
            while k > 0 and _handles_idle(out[k - 1], rec):
                k -= 1
                idle = idle or out[k].get("event") == "ipi_handled"
            if idle:
                out.insert(k, rec)
                continue
        out.append(rec)
    return out


def _lock_name(rec: dict) -> str | None:
    if "lock" in rec:
        return str(rec["lock"])
    if "folio" in rec:
        return f"folio {rec['folio']}"
    return None


# -- trace-cmd report ----------------------------------------------------------------------------

_FT_NAME = re.compile(r"[^A-Za-z0-9_]")
_FT_PLAIN = re.compile(r'^[^\s"=\\]+$')
_FT_FIRST = ("summary", "object", "access", "token")


def _ft_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    text = str(value)
    return text if _FT_PLAIN.match(text) else json.dumps(text)


def _ft_args(rec: dict, finding: bool) -> str:
    keys = [k for k in rec if k not in _SKIP]
    if finding:
        keys = ([k for k in _FT_FIRST if k in rec]
                + [k for k in keys if k not in _FT_FIRST and k != "kind"])
    pairs = [f"{k}={_ft_value(rec[k])}" for k in keys]
    if rec.get("func") not in (None, "-"):
        pairs.append(f"func={_ft_value(rec['func'])}")
    return " ".join(pairs)


class _FtraceCpu:
    """What a CPU's latency flags are made of: IRQ-off nesting and the spinlocks it holds or
    spins on (preemption is off in both)."""

    __slots__ = ("irqs_off", "spins", "waiting")

    def __init__(self) -> None:
        self.irqs_off = 0
        self.spins = 0
        self.waiting: set[str] = set()

    def depth(self) -> int:
        return self.spins + len(self.waiting)

    def apply(self, ev: str, rec: dict) -> None:
        if ev == "local_irq_save":
            self.irqs_off += 1
        elif ev == "local_irq_restore":
            self.irqs_off = max(0, self.irqs_off - 1)
        elif ev == "spin_wait":
            self.waiting.add(str(rec.get("lock")))
        elif ev == "spin_lock" or (ev == "spin_trylock" and rec.get("ok")):
            self.waiting.discard(str(rec.get("lock")))
            self.spins += 1
        elif ev == "spin_unlock":
            self.spins = max(0, self.spins - 1)


def ftrace_lines(events: Iterable[dict], ncpus: int | None = None) -> list[str]:
    """What `trace-cmd report` prints for the log: ``cpus=N``, then per event
    ``comm-pid [cpu] flags secs.usecs: event: key=value ...``.

    A CPU's events are task cpuN-agent, pid 1000+N; grace periods are rcu_preempt (pid 16) and
    RCU callbacks rcuc/0 (pid 20), on CPU 0. The timestamp is the step (1 step = 1 us). Flags
    are the kernel's latency format: 'd' IRQs off (local_irq_save, or in an IPI handler), '.'
    (need-resched: 'N' only on a need_resched event), 'h' in an IPI handler or 's' in an RCU
    callback, the preempt depth (spinlocks held or spun on) in hex, '.'. The finding's event
    is its kind with '-' as '_', its summary, object, access and token the arguments (and its
    step, when a hazard-only schedule's finding is the first hazard, earlier than the end)."""
    evs = list(events)
    finding = _finding(evs)
    ipis = {rec.get("ipi") for rec in evs if rec.get("ipi")}
    _, in_handler = _deliveries(evs)
    cpus: dict[int, _FtraceCpu] = {}
    out = [f"cpus={_ncpus(evs, ncpus)}"]
    now = 0
    for i, rec in enumerate(evs):
        ev = str(rec.get("event"))
        cpu = rec.get("cpu")
        step = rec.get("step")
        now = max(now, step if isinstance(step, int) else 0)
        if cpu is None:
            comm, pid, num = ("rcu_preempt", 16, 0) if ev in _GP_EVENTS else ("rcuc/0", 20, 0)
            irqs, ctx, depth = False, "." if ev in _GP_EVENTS else "s", 0
        else:
            state = cpus.setdefault(cpu, _FtraceCpu())
            irqs_before, depth = state.irqs_off, state.depth()
            state.apply(ev, rec)
            stack = rec.get("stack") or ()
            hard = i in in_handler or ev == "ipi_handled" or bool(stack and stack[-1] in ipis)
            irqs = hard or max(irqs_before, state.irqs_off) > 0
            depth = max(depth, state.depth())
            comm, pid, num, ctx = f"cpu{cpu}-agent", 1000 + cpu, cpu, "h" if hard else "."
        flags = ("d" if irqs else ".") + ("N" if ev == "need_resched" else ".") + ctx
        flags += (f"{min(depth, 15):x}" if depth else ".") + "."
        name = ev
        if rec is finding:
            name = str(rec.get("kind") or ev).replace("-", "_")
        name = _FT_NAME.sub("_", name) or "event"
        secs, usecs = divmod(now, 1_000_000)
        line = f"{comm:>16}-{pid:<5} [{num:03d}] {flags} {secs:5d}.{usecs:06d}: {name}:"
        args = _ft_args(rec, rec is finding)
        if rec is finding and isinstance(step, int) and step != now:
            args += f" step={step}"  # a hazard-only schedule's finding: its first hazard
        out.append(f"{line} {args}" if args else line)
    return out


# -- Perfetto (Chrome trace-event JSON) ----------------------------------------------------------

_PID = 1
_SLOT = 10  # ts units per logged event: the event at +0, flow ends at +1 and +2, anchors +2
_STEP = 1000  # ts units (us) per step, times ten while a step holds too many events for it
_ACQUIRE = ("spin_lock", "down_read", "down_write", "folio_lock")
_TRYLOCK = ("spin_trylock", "folio_trylock")
_RELEASE = ("spin_unlock", "up_read", "up_write", "folio_unlock")
_WAIT = ("spin_wait", "folio_lock_wait")
# call_rcu callbacks that free a table no p?d_free_tlb queued (khugepaged's pte_free_defer)
_TABLE_FREE_CBS = ("pte_free_now",)
_ALIVE = "page tables alive (net since start)"
_AWAITING = "page tables awaiting free"


def _timestamps(events: list[dict]) -> list[int]:
    """ts (us) = step * width + _SLOT * (index within the step): only the step numbers and the
    events' order, never a clock; kept increasing even for a log whose steps go back."""
    per_step = Counter(rec.get("step") for rec in events)
    width = _STEP
    while width < _SLOT * (max(per_step.values(), default=0) + 1):
        width *= 10
    out: list[int] = []
    last, last_step, index = -_SLOT, None, 0
    for rec in events:
        step = rec.get("step")
        step = step if isinstance(step, int) and step > 0 else 0
        index = index + 1 if step == last_step else 0
        last_step = step
        last = max(step * width + _SLOT * index, last + _SLOT)
        out.append(last)
    return out


class _Trace:
    """Chrome trace events under construction: tracks, properly nested B/E slices per track,
    flows, instants and counters."""

    def __init__(self, ncpus: int) -> None:
        self.ncpus = ncpus
        self.base = 1000
        while self.base <= ncpus:
            self.base *= 10
        self.meta: list[dict] = []
        self.events: list[dict] = []
        self.open: dict[int, list[tuple[str, str]]] = {}
        self.tids: dict[tuple, int] = {}
        self.locks: dict[int, int] = {}
        self.flows = 0
        self.meta.append({"name": "process_name", "ph": "M", "ts": 0, "pid": _PID, "tid": 0,
                          "args": {"name": "ptsim"}})
        for cpu in range(ncpus):
            self.track(("cpu", cpu))
        self.track(("rcu",))

    # tracks ------------------------------------------------------------------------------------
    def track(self, key: tuple) -> int:
        """A track's tid, named (and given its place) the first time it is used: CPU c is tid c
        and the RCU track tid ncpus (where the instants go); a CPU's other tracks follow it."""
        tid = self.tids.get(key)
        if tid is not None:
            return tid
        kind = key[0]
        if kind == "cpu":
            tid, name, order = key[1], f"CPU{key[1]}", (key[1] + 1) * self.base
        elif kind == "rcu":
            tid, name, order = self.ncpus, "RCU", (self.ncpus + 1) * self.base
        else:
            cpu = key[1]
            if kind == "lock":
                self.locks[cpu] = self.locks.get(cpu, 0) + 1
                offset, name = 9 + self.locks[cpu], f"CPU{cpu} {key[2]}"
            else:
                offset, name = {"irq": (1, "irqs off"), "rcu_cpu": (2, "rcu"),
                                "ipi": (3, "IPI")}[kind]
                name = f"CPU{cpu} {name}"
            tid = order = (cpu + 1) * self.base + offset
        self.tids[key] = tid
        self.meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": _PID, "tid": tid,
                          "args": {"name": name}})
        self.meta.append({"name": "thread_sort_index", "ph": "M", "ts": 0, "pid": _PID,
                          "tid": tid, "args": {"sort_index": order}})
        return tid

    # slices ------------------------------------------------------------------------------------
    def emit(self, ph: str, tid: int, ts: int, name: str, cat: str, **extra) -> None:
        self.events.append({"name": name, "cat": cat, "ph": ph, "ts": ts, "pid": _PID,
                            "tid": tid, **extra})

    def begin(self, tid: int, ts: int, name: str, cat: str, args: dict | None = None) -> None:
        self.open.setdefault(tid, []).append((name, cat))
        self.emit("B", tid, ts, name, cat, **({"args": args} if args else {}))

    def end(self, tid: int, ts: int) -> bool:
        stack = self.open.get(tid)
        if not stack:
            return False
        name, cat = stack.pop()
        self.emit("E", tid, ts, name, cat)
        return True

    def top(self, tid: int) -> str | None:
        stack = self.open.get(tid)
        return stack[-1][1] if stack else None

    def close_all(self, ts: int) -> None:
        for tid in sorted(self.open):
            while self.end(tid, ts):
                pass

    def functions(self, cpu: int, ts: int, stack: list) -> None:
        """The CPU's function slices follow its kernel stack: pop what left, push what came."""
        tid = self.track(("cpu", cpu))
        names = [str(name) for name in stack]
        cur = self.open.setdefault(tid, [])
        keep = 0
        while keep < min(len(cur), len(names)) and cur[keep][0] == names[keep]:
            keep += 1
        while len(cur) > keep:
            self.end(tid, ts)
        for name in names[keep:]:
            self.begin(tid, ts, name, "function")

    def anchor(self, tid: int, ts: int, name: str) -> None:
        """A flow end at ts + 1 or + 2 needs a slice around it: a short one if none is open."""
        if not self.open.get(tid):
            self.emit("X", tid, ts, name, "anchor", dur=_SLOT // 2)

    # flows, instants, counters -----------------------------------------------------------------
    def flow(self, cat: str, name: str, src: tuple[int, int], dst: tuple[int, int]) -> None:
        self.flows += 1
        self.emit("s", src[0], src[1], name, cat, id=self.flows)
        self.emit("f", dst[0], dst[1], name, cat, id=self.flows, bp="e")

    def instant(self, tid: int, ts: int, name: str, cat: str, args: dict) -> None:
        self.emit("i", tid, ts, name, cat, s="t", args=args)

    def counter(self, tid: int, ts: int, name: str, value: int) -> None:
        self.emit("C", tid, ts, name, "counter", args={"count": value})

    def result(self) -> dict:
        body = sorted(self.events, key=lambda e: e["ts"])  # stable: same-ts order is kept
        return {"traceEvents": self.meta + body, "displayTimeUnit": "ns"}


class _PerfettoBuilder:
    """Walks the (causally ordered) log once and turns it into trace events."""

    def __init__(self, events: list[dict], ncpus: int) -> None:
        self.evs = events
        self.t = _Trace(ncpus)
        self.rcu_tid = self.t.track(("rcu",))
        self.starts, self.senders = _deliveries(events)
        self.stamps = _timestamps(events)
        self.finding = _finding(events)
        self.rcu_depth: dict[int, int] = {}
        self.ipis: dict[tuple, list[tuple[int, int]]] = {}  # (sender, ipi, target) -> sends
        self.flushes: dict[object, tuple[int, int]] = {}  # sender -> its flush in flight
        self.rcu_next: list[tuple[int, int]] = []  # call_rcu flow starts for the next GP
        self.rcu_gp: list[tuple[int, int]] = []  # ... for the running GP
        self.gp_open = False
        self.batch_open = False
        self.alive = 0
        self.queued: set[str] = set()
        self.queued_anon = 0

    def build(self) -> dict:
        t = self.t
        if self.evs:
            first = self.stamps[0]
            t.counter(self.rcu_tid, first, _ALIVE, 0)
            t.counter(self.rcu_tid, first, _AWAITING, 0)
        for i, rec in enumerate(self.evs):
            self.event(i, rec, self.stamps[i])
        if self.finding is not None:
            t.close_all(self.stamps[-1])
        elif self.evs:
            t.close_all(self.stamps[-1] + _SLOT)
        return t.result()

    def _src(self, cpu: int, ts: int, rec: dict) -> tuple[int, int]:
        """A flow start on the CPU's function track, inside the slice of the running function."""
        tid = self.t.track(("cpu", cpu))
        self.t.anchor(tid, ts, str(rec.get("event")))
        return tid, ts + 1

    def event(self, i: int, rec: dict, ts: int) -> None:
        t = self.t
        ev = str(rec.get("event"))
        cpu = rec.get("cpu")
        if not isinstance(cpu, int):
            cpu = None
        if self.batch_open and (cpu is not None or ev in _GP_EVENTS):
            t.end(self.rcu_tid, ts)  # rcu_do_batch: its callbacks are done
            self.batch_open = False
        if cpu is not None:
            t.functions(cpu, ts, list(rec.get("stack") or ()))
        tid = self.rcu_tid if cpu is None else t.track(("cpu", cpu))
        if rec is self.finding:
            self.found(rec, tid, ts, cpu)
            return
        if cpu is not None and self.per_cpu(i, rec, ev, cpu, ts):
            return
        if cpu is None and self.rcu(rec, ev, ts):
            return
        self.counters(rec, ev, tid, ts)
        if cpu is not None:
            self.flows(i, rec, ev, cpu, ts)
        self.instant(rec, ev, tid, ts)

    def per_cpu(self, i: int, rec: dict, ev: str, cpu: int, ts: int) -> bool:
        """Locks, IRQ-off and RCU read-side sections, IPI handling: True when the event is
        shown by a slice (no instant)."""
        t = self.t
        lock = _lock_name(rec)
        if lock is not None and (ev in _ACQUIRE or (ev in _TRYLOCK and rec.get("ok"))):
            tid = t.track(("lock", cpu, lock))
            if t.top(tid) == "lock-wait":
                t.end(tid, ts)
            t.begin(tid, ts, lock, "lock", {"acquire": ev, "func": rec.get("func"),
                                            "step": rec.get("step")})
            return True
        if lock is not None and ev in _WAIT:
            tid = t.track(("lock", cpu, lock))
            if t.top(tid) != "lock-wait":
                t.begin(tid, ts, f"wait {lock}", "lock-wait",
                        {"owner": rec.get("owner"), "step": rec.get("step")})
            return True
        if lock is not None and ev in _RELEASE:
            key = ("lock", cpu, lock)
            if key in t.tids and t.top(t.tids[key]) == "lock":
                t.end(t.tids[key], ts)
            return True  # a release without an acquire is skipped
        if ev == "local_irq_save":
            t.begin(t.track(("irq", cpu)), ts, "irqs off", "irq", {"func": rec.get("func")})
            return True
        if ev == "local_irq_restore":
            if ("irq", cpu) in t.tids:
                t.end(t.tids[("irq", cpu)], ts)
            return True
        if ev == "rcu_read_lock":
            depth = self.rcu_depth[cpu] = self.rcu_depth.get(cpu, 0) + 1
            if depth == 1:
                t.begin(t.track(("rcu_cpu", cpu)), ts, "rcu read-side", "rcu",
                        {"func": rec.get("func")})
            return True
        if ev == "rcu_read_unlock":
            depth = self.rcu_depth.get(cpu, 0)
            if depth:
                self.rcu_depth[cpu] = depth - 1
                if depth == 1:
                    t.end(t.tids[("rcu_cpu", cpu)], ts)
            return True
        if ev == "ipi_handled":
            self.ipi_handled(i, rec, cpu, ts)
            return True
        return False

    def ipi_handled(self, i: int, rec: dict, cpu: int, ts: int) -> None:
        """The handler's run on the target as a slice on its IPI track, and the flow from the
        send to it."""
        t = self.t
        tid = t.track(("ipi", cpu))
        start = self.stamps[self.starts.get(i, i)]
        name = f"IPI {rec.get('ipi')}"
        args = {"sender": rec.get("sender"), "step": rec.get("step")}
        if rec.get("idle"):
            args["idle"] = True
        t.emit("X", tid, start, name, "ipi", dur=ts + 2 - start, args=args)
        sends = self.ipis.get((rec.get("sender"), rec.get("ipi"), cpu))
        if sends:
            t.flow("ipi", f"IPI {rec.get('ipi')}", sends.pop(0), (tid, ts + 1))

    def rcu(self, rec: dict, ev: str, ts: int) -> bool:
        """Grace periods on the RCU track, rcu_do_batch after each, and the call_rcu flows into
        the batch that runs their callbacks."""
        t = self.t
        if ev == "gp_start":
            if self.gp_open:
                t.end(self.rcu_tid, ts)
            self.rcu_gp, self.rcu_next = self.rcu_gp + self.rcu_next, []
            t.begin(self.rcu_tid, ts, f"grace period {rec.get('gp')}", "rcu",
                    {"gp": rec.get("gp")})
            self.gp_open = True
            return True
        if ev == "gp_end":
            if self.gp_open:
                t.end(self.rcu_tid, ts)
                self.gp_open = False
            cbs = rec.get("callbacks")
            if self.rcu_gp or (isinstance(cbs, int) and cbs > 0):
                t.begin(self.rcu_tid, ts + 1, "rcu_do_batch", "rcu",
                        {"gp": rec.get("gp"), "callbacks": cbs})
                self.batch_open = True
                for src in self.rcu_gp:
                    t.flow("rcu", "call_rcu", src, (self.rcu_tid, ts + 2))
                self.rcu_gp = []
            return True
        return False

    def flows(self, i: int, rec: dict, ev: str, cpu: int, ts: int) -> None:
        """Flow starts: an IPI's send, a TLB flush, call_rcu; and a flush's acknowledgement."""
        if ev == "smp_call_function":
            src = self._src(cpu, ts, rec)
            targets = rec.get("targets")
            for target in targets if isinstance(targets, list) else ():
                self.ipis.setdefault((cpu, rec.get("ipi"), target), []).append(src)
        elif ev == "flush_tlb_mm_range":
            self.flushes[cpu] = self._src(cpu, ts, rec)
        elif ev == "call_rcu":
            self.rcu_next.append(self._src(cpu, ts, rec))
        elif ev == "flush_tlb_func":
            sender = self.senders.get(i)
            src = self.flushes.get(sender)
            if src is None:  # not seen inside a delivery: any other CPU's flush of this mm
                src = next((s for c, s in self.flushes.items() if c != cpu), None)
            if src is not None:
                tid = self.t.track(("cpu", cpu))
                self.t.anchor(tid, ts, ev)
                self.t.flow("tlb", "flush_tlb", src, (tid, ts + 2))

    def counters(self, rec: dict, ev: str, tid: int, ts: int) -> None:
        """Page tables alive (allocated minus freed since the log began) and page tables queued
        for freeing (p?d_free_tlb, or call_rcu of a table free) but not yet freed."""
        before = (self.alive, len(self.queued) + self.queued_anon)
        pfn = str(rec.get("pfn"))
        if ev == "alloc_table":
            self.alive += 1
        elif ev == "free_table":
            self.alive -= 1
            if pfn in self.queued:
                self.queued.discard(pfn)
            elif self.queued_anon and rec.get("cpu") is None:
                self.queued_anon -= 1
        elif ev.endswith("_free_tlb") and "pfn" in rec:
            self.queued.add(pfn)
        elif ev == "call_rcu" and rec.get("cb") in _TABLE_FREE_CBS:
            self.queued_anon += 1
        after = (self.alive, len(self.queued) + self.queued_anon)
        if after[0] != before[0]:
            self.t.counter(tid, ts, _ALIVE, after[0])
        if after[1] != before[1]:
            self.t.counter(tid, ts, _AWAITING, after[1])

    def instant(self, rec: dict, ev: str, tid: int, ts: int) -> None:
        args = {k: v for k, v in rec.items() if k not in ("event", "stack")}
        if "table" in rec and "idx" in rec and "val" in rec:
            name, cat = describe(rec), "write" if "old" in rec else "read"
        else:
            name, cat = ev, "hazard" if ev == "hazard" else "event"
            args["what"] = describe(rec)
        self.t.instant(tid, ts, name, cat, args)

    def found(self, rec: dict, tid: int, ts: int, cpu: int | None) -> None:
        """The finding: the last instant; every slice still open ends with it."""
        kind = rec.get("kind") or rec.get("event")
        label = "BUG" if rec.get("event") == "bug" else "HAZARD"
        args = {"kind": kind, "step": rec.get("step"), "cpu": cpu, "func": rec.get("func"),
                "object": rec.get("object"), "access": rec.get("access"),
                "summary": rec.get("summary"), "token": rec.get("token")}
        self.t.instant(tid, ts, f"{label} {kind}", "finding", args)


def perfetto_trace(events: Iterable[dict], ncpus: int) -> dict:
    """Chrome trace-event JSON ({"traceEvents": [...]}), which ui.perfetto.dev opens.

    One process; per CPU c a track "CPUc" (tid c) of kernel function slices, drawn from the
    events' stacks, with the instants (entry writes and reads, other events) on it; per CPU
    and lock a track of lock holds (and spin waits), one of IRQ-off sections, one of RCU
    read-side sections and one of IPI handler runs; a track "RCU" (tid ncpus) of grace periods,
    rcu_do_batch and the RCU callbacks' events. Flows: an IPI's send to its handling on each
    target, a TLB flush to each flush_tlb_func, call_rcu to the batch that runs its callback.
    Counters: page tables alive (net of the log's allocs and frees) and awaiting free. The
    finding is the last instant; every slice still open ends at it. ts (us) comes from the
    step number and the event's position in its step, never from a clock."""
    evs = _causal_order(list(events))
    return _PerfettoBuilder(evs, _ncpus(evs, ncpus)).build()
