"""The replay trace writers: Perfetto (Chrome trace-event JSON) and trace-cmd report text.

Checked structurally against the trace-event format's rules (every event's fields; B/E
nested per thread with matching names; flows whose start and end sit in slices of their
tracks, start before end; thread-scoped instants; counters) and against what the schedules
did: IPIs, TLB flushes and call_rcu become flows, the finding is the last instant.
"""

from __future__ import annotations

import copy
import io
import json
import re
import tomllib
from collections import defaultdict
from functools import cache

import pytest

import ptsim
from ptsim.cli import main
from ptsim.events import FORMATS, ftrace_lines, perfetto_trace

from conftest import SCENARIOS

# name -> (scenario file, variant, seed, strategy, kind of the finding or None)
RUNS = {
    "d04": ("d04_retract_vs_reclaim.toml", "no-recheck", 41, "pct", "pt-use-after-free"),
    "d10": ("d10_gup_fast_vs_page_free.toml", "page-broadcast", 28, "pct", "pt-use-after-free"),
    "d12": ("d12_collapse_pte_mapped_thp_ptl_eq_pml.toml", "no-split-ptlocks", 4, "pct",
            "invalid-free"),
    "d01": ("d01_semi_rcu_single_free.toml", "semi-rcu", 7, "random", "pt-use-after-free"),
    # a hazard-only schedule: the finding is its first hazard, logged last with an earlier step
    "d09": ("d09_mixed_tlb_sizes_after_reclaim.toml", "no-flush-before-set-pmd", 1, "pct",
            "mixed-tlb-sizes"),
    # no finding: a grace period with its callback; an IPI to a CPU with IRQs off
    "d01-full-rcu": ("d01_semi_rcu_single_free.toml", "full-rcu", 7, "random", None),
    "d10-page-ipi": ("d10_gup_fast_vs_page_free.toml", "page-ipi", 28, "pct", None),
}
FOUND = [name for name, spec in RUNS.items() if spec[4]]

ALIVE = "page tables alive (net since start)"
AWAITING = "page tables awaiting free"
PHASES = {"M", "B", "E", "X", "i", "s", "f", "C"}

FTRACE_LINE = re.compile(
    r"^ *(?P<comm>\S+)-(?P<pid>\d+) +\[(?P<cpu>\d{3})\] (?P<flags>[d.][N.][hs.][0-9a-f.]\.)"
    r" +(?P<secs>\d+)\.(?P<usecs>\d{6}): (?P<event>\w+):(?: (?P<args>.*))?$")
FTRACE_ARG = re.compile(r'(?P<key>\w+)=(?P<value>"(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


@cache
def run(name: str):
    path, variant, seed, strategy, _ = RUNS[name]
    result = ptsim.load(SCENARIOS / path).variant(variant).run(seed=seed, strategy=strategy)
    return result, result.events()


def cpus_of(name: str) -> int:
    return tomllib.loads((SCENARIOS / RUNS[name][0]).read_text())["scenario"]["cpus"]


def events_of(name: str) -> list[dict]:
    return copy.deepcopy(run(name)[1])


def finding_of(name: str) -> tuple[str, str] | None:
    """(BUG or HAZARD, kind) of the run's finding, checked against the result."""
    result, events = run(name)
    if events[-1]["event"] not in ("bug", "hazard"):
        assert result.bug is None and not result.hazards
        return None
    label = "BUG" if events[-1]["event"] == "bug" else "HAZARD"
    kind = result.bug.kind if result.bug else result.hazards[0].kind
    assert kind == events[-1]["kind"] == RUNS[name][4]
    return label, kind


# -- Perfetto ------------------------------------------------------------------------------------

def check_trace(trace: dict) -> dict:
    """The trace-event format's rules; returns the slices' intervals per (pid, tid)."""
    assert set(trace) == {"traceEvents", "displayTimeUnit"} and trace["displayTimeUnit"] == "ns"
    assert json.loads(json.dumps(trace)) == trace
    events = trace["traceEvents"]
    for ev in events:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(ev), ev
        assert ev["ph"] in PHASES, ev
        assert isinstance(ev["name"], str) and ev["name"], ev
        assert isinstance(ev["ts"], int) and ev["ts"] >= 0, ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
    meta = [ev for ev in events if ev["ph"] == "M"]
    body = [ev for ev in events if ev["ph"] != "M"]
    assert events[:len(meta)] == meta  # metadata first, then the body in time order
    assert [ev["ts"] for ev in body] == sorted(ev["ts"] for ev in body)
    named = {(ev["pid"], ev["tid"]) for ev in meta if ev["name"] == "thread_name"}
    assert any(ev["name"] == "process_name" for ev in meta)
    assert {(ev["pid"], ev["tid"]) for ev in body if ev["ph"] != "C"} <= named

    stacks: dict[tuple, list[dict]] = defaultdict(list)
    intervals: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for ev in body:
        track = (ev["pid"], ev["tid"])
        if ev["ph"] == "B":
            stacks[track].append(ev)
        elif ev["ph"] == "E":
            assert stacks[track], f"E without its B: {ev}"
            begin = stacks[track].pop()
            assert begin["name"] == ev["name"], (begin, ev)
            assert begin["ts"] <= ev["ts"], (begin, ev)
            intervals[track].append((begin["ts"], ev["ts"]))
        elif ev["ph"] == "X":
            assert isinstance(ev["dur"], int) and ev["dur"] >= 0, ev
            intervals[track].append((ev["ts"], ev["ts"] + ev["dur"]))
        elif ev["ph"] == "i":
            assert ev["s"] == "t", ev
        elif ev["ph"] == "C":
            assert ev["args"] and all(isinstance(v, int) for v in ev["args"].values()), ev
    assert not any(stacks.values()), "slices left open"
    for track, spans in intervals.items():  # X slices nest with the B/E ones too
        open_: list[tuple[int, int]] = []
        for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
            while open_ and open_[-1][1] <= start:
                open_.pop()
            assert not open_ or end <= open_[-1][1], (track, (start, end), open_[-1])
            open_.append((start, end))

    flows: dict[int, dict[str, dict]] = defaultdict(dict)
    for ev in body:
        if ev["ph"] in "sf":
            assert ev["ph"] not in flows[ev["id"]], f"flow id {ev['id']} twice: {ev}"
            flows[ev["id"]][ev["ph"]] = ev
            track = (ev["pid"], ev["tid"])
            assert any(start <= ev["ts"] < end for start, end in intervals[track]), \
                f"flow event outside any slice of its track: {ev}"
    for fid, ends in flows.items():
        assert set(ends) == {"s", "f"}, f"flow {fid}: {ends}"
        start, finish = ends["s"], ends["f"]
        assert (start["cat"], start["name"]) == (finish["cat"], finish["name"])
        assert finish["bp"] == "e" and start["ts"] < finish["ts"]
    return intervals


def flows(trace: dict, cat: str) -> list[tuple[dict, dict]]:
    ends: dict[int, dict[str, dict]] = defaultdict(dict)
    for ev in trace["traceEvents"]:
        if ev["ph"] in "sf" and ev["cat"] == cat:
            ends[ev["id"]][ev["ph"]] = ev
    return [(pair["s"], pair["f"]) for _, pair in sorted(ends.items())]


def track_names(trace: dict) -> dict[int, str]:
    return {ev["tid"]: ev["args"]["name"] for ev in trace["traceEvents"]
            if ev["ph"] == "M" and ev["name"] == "thread_name"}


def counter(trace: dict, name: str) -> list[int]:
    return [ev["args"]["count"] for ev in trace["traceEvents"]
            if ev["ph"] == "C" and ev["name"] == name]


@pytest.mark.parametrize("name", list(RUNS))
def test_perfetto_structure_and_determinism(name):
    result, events = run(name)
    cpus = cpus_of(name)
    trace = perfetto_trace(events_of(name), cpus)
    check_trace(trace)
    assert perfetto_trace(events_of(name), cpus) == trace
    assert perfetto_trace(result.events(), cpus) == trace  # a second replay: the same bytes
    names = track_names(trace)
    assert [names[tid] for tid in range(cpus + 1)] == [f"CPU{c}" for c in range(cpus)] + ["RCU"]
    assert counter(trace, ALIVE) and counter(trace, AWAITING)
    assert counter(trace, ALIVE)[0] == counter(trace, AWAITING)[0] == 0
    instants = [ev for ev in trace["traceEvents"] if ev["ph"] == "i"]
    writes = [ev for ev in events if "old" in ev]
    assert len([ev for ev in instants if ev["cat"] == "write"]) == len(writes)


@pytest.mark.parametrize("name", FOUND)
def test_perfetto_finding_is_the_last_instant(name):
    result, events = run(name)
    label, kind = finding_of(name)
    cpus = cpus_of(name)
    trace = perfetto_trace(events_of(name), cpus)
    body = [ev for ev in trace["traceEvents"] if ev["ph"] != "M"]
    last = [ev for ev in body if ev["ph"] == "i"][-1]
    assert last["name"] == f"{label} {kind}" and last["cat"] == "finding"
    assert last["args"]["token"] == result.token
    assert last["args"]["kind"] == kind
    assert last["args"]["step"] == events[-1]["step"]
    assert last["args"]["cpu"] == events[-1]["cpu"]
    assert last["args"]["object"] == events[-1]["object"]
    assert last["tid"] == (cpus if events[-1]["cpu"] is None else events[-1]["cpu"])
    # nothing after it, and every slice still open ends with it
    assert max(ev["ts"] for ev in body) == last["ts"]
    assert body[-1]["ph"] == "E" and body[-1]["ts"] == last["ts"]


def test_perfetto_without_a_finding_closes_every_slice():
    for name in ("d01-full-rcu", "d10-page-ipi"):
        trace = perfetto_trace(events_of(name), 2)
        check_trace(trace)
        assert not [ev for ev in trace["traceEvents"] if ev.get("cat") == "finding"]


def test_perfetto_ipi_and_flush_flows_d01():
    """Semi-RCU frees the table after a flush IPI and a tlb_remove_table_smp_sync IPI."""
    trace = perfetto_trace(events_of("d01"), 2)
    names = track_names(trace)
    ipis = flows(trace, "ipi")
    assert [s["name"] for s, _ in ipis] == ["IPI flush_tlb_func",
                                            "IPI tlb_remove_table_smp_sync"]
    for start, end in ipis:
        assert names[start["tid"]] == "CPU0" and names[end["tid"]] == "CPU1 IPI"
    ((start, end),) = flows(trace, "tlb")
    assert names[start["tid"]] == "CPU0" and names[end["tid"]] == "CPU1"
    assert "CPU1 ptl(PTE 0x5)" in names.values()
    assert counter(trace, AWAITING) == [0, 1, 0] and counter(trace, ALIVE) == [0, -1]


def test_perfetto_d10_broadcast_sends_no_ipi():
    """The point of D10: the broadcast flush interrupts no one, so there is no IPI flow; the
    GUP-fast CPU's IRQ-off section runs until the finding."""
    trace = perfetto_trace(events_of("d10"), 2)
    assert not flows(trace, "ipi") and not flows(trace, "tlb")
    names = track_names(trace)
    irq = next(tid for tid, name in names.items() if name == "CPU1 irqs off")
    finding = [ev for ev in trace["traceEvents"] if ev.get("cat") == "finding"][0]
    (end,) = [ev for ev in trace["traceEvents"] if ev["tid"] == irq and ev["ph"] == "E"]
    assert end["ts"] == finding["ts"]


def test_perfetto_d10_ipi_waits_for_irqs_on():
    """With IPIs, the flush is handled only after the GUP-fast CPU re-enables IRQs."""
    trace = perfetto_trace(events_of("d10-page-ipi"), 2)
    names = track_names(trace)
    irq = next(tid for tid, name in names.items() if name == "CPU1 irqs off")
    (irqs_on,) = [ev for ev in trace["traceEvents"] if ev["tid"] == irq and ev["ph"] == "E"]
    ((start, end),) = flows(trace, "ipi")
    assert start["ts"] < irqs_on["ts"] <= end["ts"]
    assert names[end["tid"]] == "CPU1 IPI"


def test_perfetto_rcu_flows_into_the_batch_after_the_grace_period():
    for name, count in (("d12", 2), ("d01-full-rcu", 1)):
        trace = perfetto_trace(events_of(name), 2)
        names = track_names(trace)
        rcu = flows(trace, "rcu")
        assert len(rcu) == count, name
        gp_ends = [ev["ts"] for ev in trace["traceEvents"]
                   if ev["ph"] == "E" and ev["name"].startswith("grace period")]
        for start, end in rcu:
            assert start["name"] == "call_rcu" and names[end["tid"]] == "RCU"
            assert any(start["ts"] < ts < end["ts"] for ts in gp_ends)
        batches = [ev for ev in trace["traceEvents"]
                   if ev["ph"] == "B" and ev["name"] == "rcu_do_batch"]
        assert len(batches) == count


def test_perfetto_idle_ipi_is_sent_before_it_is_handled():
    """D12: an idle CPU runs the handler inside the send, which the model logs after it."""
    events = events_of("d12")
    idle = [ev for ev in events if ev["event"] == "ipi_handled" and ev.get("idle")]
    assert idle
    trace = perfetto_trace(events, 2)
    assert len(flows(trace, "ipi")) == 2  # check_trace: every start before its end


def test_perfetto_locks_waits_and_rcu_sections_d04():
    trace = perfetto_trace(events_of("d04"), 2)
    names = track_names(trace)
    assert {"CPU0 ptl(PMD 0x4)", "CPU1 ptl(PMD 0x4)", "CPU0 rcu", "CPU0 mm0.mmap_lock"} \
        <= set(names.values())
    assert any(ev["name"] == "wait ptl(PMD 0x4)" and ev["ph"] == "B"
               for ev in trace["traceEvents"])
    assert flows(trace, "ipi") and flows(trace, "tlb")


def test_perfetto_is_robust_to_odd_logs():
    def ev(step, cpu, event, stack=(), **fields):
        return {"step": step, "cpu": cpu, "func": stack[-1] if stack else "-", "event": event,
                **fields, "stack": list(stack)}

    odd = [
        ev(1, 0, "spin_unlock", ["f"], lock="L"),  # release without acquire
        ev(1, 0, "up_read", ["f"], lock="S"),
        ev(2, 1, "rcu_read_unlock", ["g"]),
        ev(2, 1, "local_irq_restore", ["g"]),
        ev(3, None, "gp_end", gp=1, callbacks=0),  # without its start
        ev(3, 1, "ipi_handled", ["g"], ipi="x", sender=0),  # never sent
        ev(4, 5, "something_new", ["h", "i"], what=[1, 2]),  # a CPU beyond ncpus
        ev(4, 0, "smp_call_function", [], ipi="y", targets=[1], pending=[1]),  # never handled
        ev(5, 0, "spin_lock", ["f"], lock="L"),  # held to the end
        ev(2, 0, "flush_tlb_func", ["flush_tlb_func"], mm="mm0"),  # steps going back
        ev(6, None, "free_table", pfn="0x9"),
    ]
    for events in (odd, [], odd[:1]):
        trace = perfetto_trace(copy.deepcopy(events), 2)
        check_trace(trace)
        assert perfetto_trace(copy.deepcopy(events), 2) == trace
        lines = ftrace_lines(copy.deepcopy(events))
        assert len(lines) == len(events) + 1
        assert all(FTRACE_LINE.match(line) for line in lines[1:])
    assert "CPU5" in track_names(perfetto_trace(odd, 2)).values()
    assert ftrace_lines(odd)[0] == "cpus=6"


# -- trace-cmd report ----------------------------------------------------------------------------

def parse_ftrace(lines: list[str]) -> list[dict]:
    """Every line after the header in the trace-cmd report shape, its args key=value pairs."""
    assert re.fullmatch(r"cpus=\d+", lines[0])
    parsed = []
    for line in lines[1:]:
        match = FTRACE_LINE.match(line)
        assert match, line
        row = match.groupdict()
        args, pos, text = {}, 0, row["args"] or ""
        while pos < len(text):
            arg = FTRACE_ARG.match(text, pos)
            assert arg, (line, text[pos:])
            value = arg["value"]
            args[arg["key"]] = json.loads(value) if value.startswith('"') else value
            pos = arg.end()
        row["args"] = args
        row["time"] = int(row["secs"]) * 1_000_000 + int(row["usecs"])
        parsed.append(row)
    times = [row["time"] for row in parsed]
    assert times == sorted(times)
    return parsed


@pytest.mark.parametrize("name", list(RUNS))
def test_ftrace_lines_parse(name):
    result, events = run(name)
    cpus = cpus_of(name)
    lines = ftrace_lines(events_of(name), cpus)
    assert lines == ftrace_lines(events_of(name), cpus) == ftrace_lines(result.events(), cpus)
    assert lines[0] == f"cpus={cpus}" == ftrace_lines(events_of(name))[0]
    rows = parse_ftrace(lines)
    assert len(rows) == len(events)
    found = finding_of(name)
    for i, (row, ev) in enumerate(zip(rows, events)):
        assert row["time"] == max(e["step"] for e in events[:i + 1])
        if ev["cpu"] is None:
            assert row["cpu"] == "000" and row["comm"] in ("rcu_preempt", "rcuc/0")
        else:
            assert (row["comm"], int(row["pid"]), int(row["cpu"])) == \
                (f"cpu{ev['cpu']}-agent", 1000 + ev["cpu"], ev["cpu"])
        if ev is not events[-1] or not found:
            assert row["event"] == ev["event"]
            for key in ("lock", "table", "idx", "val", "old", "ipi", "pfn"):
                if key in ev:
                    assert row["args"][key] == str(ev[key]), (key, row, ev)
        if ev["event"] == "ipi_handled" or ev["event"] == "flush_tlb_func":
            assert row["flags"][0] == "d" and row["flags"][2] == "h"
    if found:
        last = rows[-1]
        assert last["event"] == found[1].replace("-", "_")
        assert last["args"]["token"] == result.token
        assert last["args"]["summary"] == events[-1]["summary"]
        if events[-1]["step"] != last["time"]:
            assert last["args"]["step"] == str(events[-1]["step"])


def test_ftrace_flags_follow_irqs_and_spinlocks():
    rows = parse_ftrace(ftrace_lines(events_of("d10-page-ipi")))
    events = events_of("d10-page-ipi")
    irqs_off = False
    for row, ev in zip(rows, events):
        if ev["cpu"] == 1:
            if ev["event"] == "local_irq_save":
                irqs_off = True
            if irqs_off:
                assert row["flags"][0] == "d", row
            if ev["event"] == "local_irq_restore":
                irqs_off = False
    held = 0
    for row, ev in zip(parse_ftrace(ftrace_lines(events_of("d01"))), events_of("d01")):
        if ev["cpu"] == 0:
            before = held
            held += {"spin_lock": 1, "spin_unlock": -1}.get(ev["event"], 0)
            held += 1 if ev["event"] == "spin_trylock" and ev.get("ok") else 0
            depth = max(before, held)
            assert row["flags"][3] == (f"{depth:x}" if depth else "."), (row, ev)


def test_format_registry_writes_both():
    events = events_of("d12")
    out = io.StringIO()
    FORMATS["ftrace"].write(events, 2, out)
    assert out.getvalue() == "\n".join(ftrace_lines(events, 2)) + "\n"
    out = io.StringIO()
    FORMATS["perfetto"].write(events, 2, out)
    assert out.getvalue().startswith('{"traceEvents": [{')  # how trace processors spot JSON
    assert json.loads(out.getvalue()) == perfetto_trace(events, 2)


# -- the command line ----------------------------------------------------------------------------

def test_cli_replay_perfetto_and_ftrace(capsys):
    result, _ = run("d01")
    path = str(SCENARIOS / RUNS["d01"][0])
    assert main(["replay", path, result.token, "--format", "perfetto"]) == 1
    out, _ = capsys.readouterr()
    trace = json.loads(out)
    check_trace(trace)
    last = [ev for ev in trace["traceEvents"] if ev["ph"] == "i"][-1]
    assert last["name"] == "BUG pt-use-after-free" and last["args"]["token"] == result.token
    assert trace == perfetto_trace(events_of("d01"), 2)

    assert main(["replay", path, result.token, "--format", "ftrace"]) == 1
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines == ftrace_lines(events_of("d01"), 2)
    rows = parse_ftrace(lines)
    assert rows[-1]["event"] == "pt_use_after_free"
    assert rows[-1]["args"]["token"] == result.token
