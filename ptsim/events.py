"""The structured event log: structlog JSON lines, plus text and ftrace-style renderings.

Events carry the step, the CPU, the kernel function and what happened, never wall-clock times
or Python object ids: the same token gives the same bytes anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Callable, Iterable

import structlog

from ptsim.kernel_model.registry import Registry, first_line

_SKIP = ("step", "cpu", "func", "event")


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


@trace_format("ftrace", report=True)
def _ftrace_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """In the shape of /sys/kernel/tracing/trace; then the report."""
    fh.write("\n".join(ftrace_lines(events)) + "\n")


@trace_format("perfetto")
def _perfetto_format(events: list[dict], ncpus: int, fh: IO[str]) -> None:
    """Chrome trace-event JSON that ui.perfetto.dev opens: a track per CPU and one for RCU."""
    json.dump(perfetto_trace(events, ncpus), fh, sort_keys=True)
    fh.write("\n")


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
    trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": ncpus,
                  "args": {"name": "RCU"}})
    for rec in events:
        tid = ncpus if rec["cpu"] is None else rec["cpu"]
        trace.append({"name": f"{rec['func']}: {rec['event']}", "ph": "i", "s": "t", "pid": 0,
                      "tid": tid, "ts": rec["step"],
                      "args": {k: v for k, v in rec.items() if k not in ("cpu",)}})
    return {"traceEvents": trace, "displayTimeUnit": "ns"}
