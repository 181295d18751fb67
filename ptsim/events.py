"""The structured event log: structlog JSON lines, plus text and ftrace-style renderings.

Events carry the step, the CPU, the kernel function and what happened, never wall-clock times
or Python object ids: the same token gives the same bytes anywhere.
"""

from __future__ import annotations

import io
from typing import IO, Iterable

import structlog

_SKIP = ("step", "cpu", "func", "event")


def write_jsonl(events: Iterable[dict], fh: IO[str]) -> None:
    logger = structlog.wrap_logger(
        structlog.PrintLogger(fh),
        processors=[structlog.processors.JSONRenderer(sort_keys=True)],
    )
    for rec in events:
        fields = dict(rec)
        event = fields.pop("event")
        logger.msg(event, **fields)


def jsonl_text(events: Iterable[dict]) -> str:
    buf = io.StringIO()
    write_jsonl(events, buf)
    return buf.getvalue()


def describe(rec: dict) -> str:
    """One event as a short phrase a kernel developer reads: 'pmd_clear pmd 0x4[0]: pfn 0x5 -> none'."""
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


def text_lines(events: Iterable[dict]) -> list[str]:
    out = []
    for rec in events:
        cpu = "   -" if rec["cpu"] is None else f"CPU{rec['cpu']}"
        out.append(f"{rec['step']:6d} {cpu:>5} {rec['func']}: {describe(rec)}")
    return out


def ftrace_lines(events: Iterable[dict]) -> list[str]:
    """In the shape of /sys/kernel/tracing/trace: task-pid [cpu] flags timestamp: func: event.
    The 'timestamp' is the step number."""
    out = ["# tracer: ptsim", "#", "#           TASK  CPU#     STEP  FUNCTION: EVENT"]
    for rec in events:
        cpu = rec["cpu"]
        task = "rcu_do_batch" if cpu is None else f"cpu{cpu}-agent"
        out.append(f"{task:>16} [{0 if cpu is None else cpu:03d}] {rec['step']:8d}: "
                   f"{rec['func']}: {describe(rec)}")
    return out


def perfetto_trace(events: Iterable[dict], ncpus: int) -> dict:
    """Chrome trace-event JSON, which ui.perfetto.dev opens: one track per CPU (plus one for
    RCU callbacks), one instant event per step; the step number stands in for time (1 us)."""
    trace = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "ptsim"}}]
    for cpu in range(ncpus):
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": cpu,
                      "args": {"name": f"CPU{cpu}"}})
    trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": ncpus, "args": {"name": "RCU"}})
    for rec in events:
        tid = ncpus if rec["cpu"] is None else rec["cpu"]
        trace.append({"name": f"{rec['func']}: {rec['event']}", "ph": "i", "s": "t", "pid": 0,
                      "tid": tid, "ts": rec["step"],
                      "args": {k: v for k, v in rec.items() if k not in ("cpu",)}})
    return {"traceEvents": trace, "displayTimeUnit": "ns"}
