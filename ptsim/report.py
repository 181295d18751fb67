"""Bug reports as linux-mm reads them: a KASAN/syzbot-style report and an object-centric race
diagram.

The report is rendered from a logged replay of the schedule (stress quietly, replay loudly):
its sections come from the finding and from the event log, in which every event carries the
CPU's kernel call stack.

The diagram follows the bug's objects through the whole schedule: the table (or page) it is
about, its split ptlock, the page-table entries that pointed at it, and the entries the
faulting CPU used that another CPU changed (how the racing CPU obtained the object: its
lockless pmd read, its pmd lock). Every CPU that touched them gets a column, RCU callbacks and
IPI handlers one more; the synchronisation of those CPUs between the first such step and the
bug (RCU read side, IRQs, IPIs, flushes, grace periods) is shown too; runs of similar steps are
folded. The BUG row is the log's last event, so it is never blank.
"""

from __future__ import annotations

import re

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ptsim.kernel_model.registry import CONFIG, kernel_file

from .events import describe
from .kernel_model.errors import Finding

# Synchronisation worth a row for a CPU that takes part in the race.
_SYNC = {"rcu_read_lock", "rcu_read_unlock", "local_irq_save", "local_irq_restore",
         "smp_call_function", "ipi_handled", "call_rcu", "gp_start", "gp_end",
         "flush_tlb_mm_range", "flush_tlb_func", "table_batch_alloc_failed", "need_resched",
         "page_fault", "spin_wait", "folio_lock_wait"}
_FREES = {"free_table", "free_folio"}
_ALLOCS = {"alloc_table", "alloc_folio"}
_PFN = re.compile(r"pfn (0x[0-9a-f]+)")
FOLD_AT = 3  # runs of this many similar steps, or more, are one row


def _pfns_in(rec: dict) -> set[str]:
    found = set()
    for key in ("val", "old"):
        if key in rec:
            found.update(_PFN.findall(str(rec[key])))
    return found


def _entry(rec: dict):
    return (rec["table"], rec["idx"]) if "table" in rec and "idx" in rec else None


class Objects:
    """What the bug is about, grown from the finding through the log."""

    def __init__(self, finding: Finding, events: list[dict]) -> None:
        self.pfns = {hex(p) for p in finding.pfns}
        self.locks = {w for w in re.findall(r"ptl\((?:PTE|PMD) 0x[0-9a-f]+\)|"
                                            r"[\w.\[\]]+page_table_lock",
                                            f"{finding.obj} {finding.access}")}
        tables = {r["table"] for r in events if "table" in r} | {
            r["pfn"] for r in events if r["event"] in ("alloc_table", "free_table")}
        racers = {finding.cpu} if finding.cpu is not None else {
            h["cpu"] for h in finding.history if h["cpu"] is not None}
        used = {_entry(r) for r in events if r["cpu"] in racers and _entry(r)}
        changed = {_entry(r): r for r in events if "old" in r and r["cpu"] not in racers}
        self.entries = {e for e in used if e in changed}
        for rec in events:
            if _entry(rec) and (_pfns_in(rec) & self.pfns):
                self.entries.add(_entry(rec))
        for rec in events:  # the tables those entries pointed at
            if _entry(rec) in self.entries:
                self.pfns |= _pfns_in(rec) & tables
        self.locks |= {f"ptl({lvl} {pfn})" for pfn in self.pfns for lvl in ("PTE", "PMD")}

    def touches(self, rec: dict) -> bool:
        if rec.get("table") in self.pfns or rec.get("pfn") in self.pfns:
            return True
        if _entry(rec) in self.entries or rec.get("lock") in self.locks:
            return True
        return bool(_pfns_in(rec) & self.pfns)


def _body(events: list[dict]) -> list[dict]:
    """The log without its closing finding."""
    return [r for r in events if r["event"] not in ("bug", "hazard")]


def race_rows(finding: Finding, events: list[dict], objects: Objects | None = None) -> list[dict]:
    """The diagram's rows: the objects' steps, the involved CPUs' synchronisation between the
    first of them and the bug, and the finding."""
    body = _body(events)
    objects = objects or Objects(finding, body)
    touching = [r for r in body if objects.touches(r)]
    involved = {r["cpu"] for r in touching} | {finding.cpu}
    first = touching[0]["step"] if touching else finding.step
    rows = [r for r in body if objects.touches(r) or (
        r["event"] in _SYNC and r["step"] >= first
        and (r["cpu"] in involved or r["cpu"] is None or r.get("sender") in involved))]
    last = events[-1] if events and events[-1]["event"] in ("bug", "hazard") else None
    rows.append(last or {"step": finding.step, "cpu": finding.cpu, "func": finding.func or "-",
                         "event": "bug", "kind": finding.kind, "access": finding.access})
    return rows


def _fold_key(rec: dict):
    return (rec["cpu"], rec["func"], rec["event"], rec.get("table"), "old" in rec)


def fold(rows: list[dict]) -> list[tuple[dict, str]]:
    """(first row, text) pairs, runs of similar steps of one CPU folded into one."""
    out: list[tuple[dict, str]] = []
    i = 0
    while i < len(rows):
        j = i + 1
        if rows[i]["event"] not in ("bug", "hazard"):
            while j < len(rows) and _fold_key(rows[j]) == _fold_key(rows[i]):
                j += 1
        run = rows[i:j]
        if len(run) >= FOLD_AT and "idx" in run[0]:
            text = (f"{run[0]['event']} {run[0]['table']}[{run[0]['idx']}..{run[-1]['idx']}] "
                    f"({len(run)}x)")
            out.append((run[0], text))
        elif len(run) >= FOLD_AT and "pfn" in run[0]:
            text = f"{run[0]['event']} pfn {run[0]['pfn']}..{run[-1]['pfn']} ({len(run)}x)"
            out.append((run[0], text))
        else:
            out.extend((r, describe(r)) for r in run)
            j = i + len(run)
        i = j
    return out


def _column(rec: dict) -> str:
    if rec["cpu"] is None or rec["event"] in ("ipi_handled", "flush_tlb_func"):
        return "RCU/IPI"
    return f"CPU{rec['cpu']}"


def race_diagram(finding: Finding, events: list[dict], objects: Objects | None = None) -> Table:
    rows = fold(race_rows(finding, events, objects))
    columns = sorted({_column(r) for r, _ in rows if _column(r) != "RCU/IPI"},
                     key=lambda c: int(c[3:]))
    if any(_column(r) == "RCU/IPI" for r, _ in rows):
        columns.append("RCU/IPI")
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
    table.add_column("step", justify="right", style="dim")
    for col in columns:
        table.add_column(col, overflow="fold", ratio=1)
    for rec, text in rows:
        if rec["event"] in ("bug", "hazard"):
            func = rec["func"] if rec["func"] != "-" else "RCU callback"
            cell = Text(f"{func}: {rec.get('access') or rec.get('summary', '')} -> "
                        f"{'BUG' if rec['event'] == 'bug' else 'hazard'} {rec['kind']}",
                        style="bold red")
        else:
            prefix = f"CPU{rec['cpu']} " if _column(rec) == "RCU/IPI" and rec["cpu"] is not None \
                else ""
            func = rec["func"] if rec["func"] != "-" else "RCU"
            cell = Text(f"{prefix}{func}: {text}")
        table.add_row(str(rec["step"]), *[cell if _column(rec) == c else "" for c in columns])
    return table


# -- the report's sections ---------------------------------------------------------------------

def _who(rec: dict) -> str:
    if rec["cpu"] is None:
        return f"RCU callback ({rec.get('by', rec['func'])})"
    return f"CPU{rec['cpu']}"


def _trace(stack: list[str]) -> list[Text]:
    """A call trace, innermost first, each function with its kernel source file."""
    lines = []
    for name in reversed(stack):
        file = kernel_file(name)
        lines.append(Text(f"  {name}" + (f" ({file})" if file else "")))
    return lines


def lifetime_sections(finding: Finding, events: list[dict]) -> list[Text]:
    """Allocated by / Queued for freeing by / Freed by, for each object frame of the bug (the
    last of each before the bug), with the trace at that step."""
    out: list[Text] = []
    for pfn in (hex(p) for p in finding.pfns):
        before = [r for r in events if r["step"] <= finding.step and r.get("pfn") == pfn
                  and r["event"] not in ("bug", "hazard")]
        allocs = [r for r in before if r["event"] in _ALLOCS]
        frees = [r for r in before if r["event"] in _FREES]
        queued = [r for r in before if r["event"].endswith("_free_tlb")
                  or r["event"] == "pte_free_defer"]
        for title, recs in (("Allocated by", allocs), ("Queued for freeing by", queued),
                            ("Freed by", frees)):
            if recs:
                rec = recs[-1]
                out.append(Text(""))
                out.append(Text(f"{title} {_who(rec)} at step {rec['step']} (pfn {pfn}):"))
                out.extend(_trace(rec.get("stack") or [rec["func"]]))
    if not out and finding.history:  # no log: what the shadow state remembered
        out.append(Text(""))
        out.append(Text("Freed or changed earlier by:"))
        for h in finding.history:
            who = "RCU callback" if h["cpu"] is None else f"CPU{h['cpu']}"
            out.append(Text(f"  step {h['step']:>5}  {who} {h['func']}: {h['what']}"))
    return out


def value_changes(finding: Finding, events: list[dict], objects: Objects) -> list[Text]:
    """Entries that pointed at the bug's objects and were changed by a CPU other than the one
    that made the bad access: the value a reader had may have changed under it."""
    out = []
    for rec in events:
        if "old" in rec and _entry(rec) in objects.entries and rec["cpu"] != finding.cpu \
                and rec["step"] <= finding.step and rec["old"] != rec["val"]:
            out.append(Text(f"value changed: {rec['table']}[{rec['idx']}]: {rec['old']} -> "
                            f"{rec['val']} ({_who(rec)} in {rec['func']}, step {rec['step']})"))
    return out


def configuration(scn) -> list[Text]:
    """The kernel configuration as CONFIG_ options, settings, and the fixes reverted or patches
    applied (config keys at their non-default values)."""
    if scn is None:
        return []
    cfg = dict(scn.config)
    options = []
    for key in sorted(CONFIG.values(), key=lambda k: not k.kconfig):
        value = cfg.get(key.name, key.default)
        if key.kconfig:
            options.append(f"{key.kconfig}={'y' if value else 'n'}")
        elif not isinstance(key.default, bool):
            options.append(f"{key.name}={value}")
    lines = [Text("Configuration: " + " ".join(options))]
    for key in CONFIG.values():
        value = cfg.get(key.name, key.default)
        if key.kconfig or not isinstance(key.default, bool) or value == key.default:
            continue
        what = "fix reverted" if key.default else "patch applied"
        lines.append(Text(f"  {what}: {key.name} = {str(value).lower()} ({key.commit})"))
    faults = [f"{k}={v}" for k, v in scn.faults if v]
    if faults:
        lines.append(Text("  faults: " + " ".join(faults)))
    for target, name in scn.replace:
        lines.append(Text(f"  replaced: {target} by {name}"))
    if scn.fixed_by:
        lines.append(Text(f"Fixed upstream by: {scn.fixed_by}"))
    kernel = getattr(scn, "kernel", None)
    why = scn.counterfactual if hasattr(scn, "counterfactual") else []
    if kernel is not None or why:
        lines.append(Text(f"Kernel: {kernel or 'none named (the registry defaults)'}"
                          + (", counterfactual: this configuration matches no kernel profile ("
                             + "; ".join(why) + ")" if why else ", as released")))
    return lines


LAST_STEPS = 6  # per CPU, in a livelock report


def _shape(rec: dict) -> tuple:
    """An event without its step: what repeats in a loop."""
    return (rec["cpu"], rec["func"], describe(rec))


def repeated_loop(events: list[dict]) -> tuple[list[dict], int] | None:
    """The shortest run of events that repeats back to back at the end of ``events`` (one
    CPU's), at least three times, and how often; None when the tail does not loop."""
    tail = events[-600:]
    shapes = [_shape(r) for r in tail]
    for period in range(1, len(shapes) // 3 + 1):
        times = 1
        while (times + 1) * period <= len(shapes) and \
                shapes[-(times + 1) * period:-times * period] == shapes[-period:]:
            times += 1
        if times >= 3:
            return tail[-period:], times
    return None


def livelock_sections(events: list[dict]) -> list[Text]:
    """What each CPU did last, and the loop each CPU that was looping repeated."""
    out = [Text(""), Text("Last steps of each CPU:")]
    cpus = sorted({r["cpu"] for r in events if r["cpu"] is not None})
    loops = []
    for cpu in cpus:
        mine = [r for r in events if r["cpu"] == cpu and r["event"] not in ("bug", "hazard")]
        out.append(Text(f"  CPU{cpu}:"))
        for rec in mine[-LAST_STEPS:]:
            out.append(Text(f"    step {rec['step']:>6}  {rec['func']}: {describe(rec)}"))
        loop = repeated_loop(mine)
        if loop is not None:
            loops.append((cpu, *loop))
    for cpu, body, times in loops:
        out.append(Text(""))
        out.append(Text(f"The loop that repeated on CPU{cpu} ({times} times at the end, "
                        f"{len(body)} events each):"))
        for rec in body:
            out.append(Text(f"    {rec['func']}: {describe(rec)}"))
    if not loops:
        out.append(Text("No CPU was repeating a loop at the end: max_steps may simply be too "
                        "small for this scenario."))
    return out


def render_report(finding: Finding, events: list[dict] | None, scn=None) -> Group:
    events = events or []
    who = "RCU callback" if finding.cpu is None else f"CPU{finding.cpu}"
    parts = [Text(f"BUG: {finding.kind} in {finding.func or 'an RCU callback'}",
                  style="bold red"),
             Text(f"{who} {finding.access or finding.summary}")]
    if finding.access:
        parts.append(Text(finding.summary))
    if finding.obj and finding.obj not in finding.summary:
        parts.append(Text(f"object: {finding.obj}"))
    for line in finding.detail:
        parts.append(Text(f"  {line}"))
    if finding.backtrace:
        parts.append(Text(""))
        parts.append(Text("Call trace:"))
        parts.extend(_trace(list(reversed(finding.backtrace))))
    if finding.kind == "livelock" and events:
        parts.extend(livelock_sections(events))
    parts.extend(lifetime_sections(finding, events))
    objects = Objects(finding, _body(events)) if events else None
    changes = value_changes(finding, events, objects) if events else []
    if changes:
        parts.append(Text(""))
        parts.extend(changes)
    config = configuration(scn)
    if config:
        parts.append(Text(""))
        parts.extend(config)
    if events:
        parts.append(Text(""))
        parts.append(Text("Race diagram:", style="bold"))
        parts.append(race_diagram(finding, events, objects))
    return Group(*parts)


def print_report(console: Console, finding: Finding, token: str, events: list[dict] | None,
                 replay_cmd: str, scn=None, shrunk: tuple[str, str, str] | None = None) -> None:
    """The report, then the token and replay command (unwrapped: they must survive a copy and
    paste); ``shrunk`` is (what got smaller, the shrunk token, its replay command)."""
    console.print(render_report(finding, events, scn))
    console.print()
    if shrunk is not None:
        summary, small_token, small_cmd = shrunk
        console.print(f"shrunk: {summary}", soft_wrap=True, highlight=False)
        console.print(f"token: {small_token}", soft_wrap=True, highlight=False)
        console.print(f"replay: {small_cmd}", soft_wrap=True, highlight=False, style="dim")
        console.print(f"original token: {token}", soft_wrap=True, highlight=False)
        console.print(f"original replay: {replay_cmd}", soft_wrap=True, highlight=False,
                      style="dim")
        return
    console.print(f"token: {token}", soft_wrap=True, highlight=False)
    console.print(f"replay: {replay_cmd}", soft_wrap=True, highlight=False, style="dim")
