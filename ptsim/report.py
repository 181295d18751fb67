"""Bug reports: what KASAN or lockdep would print, plus a per-CPU race diagram.

The diagram shows, in step order and one column per CPU, the steps that touched the object of
the bug (its table, its ptlock, the pmd that pointed at it) and the synchronisation around
them (RCU, IRQs, IPIs, flushes, frees): the same picture a developer draws on the list.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .events import describe
from .kernel_model.errors import Finding

# Synchronisation events worth a row whenever the CPU takes part in the race.
_SYNC = {"rcu_read_lock", "rcu_read_unlock", "local_irq_save", "local_irq_restore",
         "smp_call_function", "ipi_handled", "call_rcu", "gp_end", "flush_tlb_mm_range",
         "table_batch_alloc_failed", "pte_free_tlb", "free_table", "spin_wait", "need_resched",
         "page_fault"}

MAX_ROWS = 48


def _mentions(rec: dict, needles: tuple[str, ...]) -> bool:
    for key, value in rec.items():
        if key in ("step", "cpu"):
            continue
        text = str(value)
        if any(n in text for n in needles):
            return True
    return False


def race_rows(finding: Finding, events: list[dict]) -> list[dict]:
    needles = tuple(f"{pfn:#x}" for pfn in finding.pfns) or (finding.obj,)
    involved = {h["cpu"] for h in finding.history} | {finding.cpu}
    rows = []
    for rec in events:
        if _mentions(rec, needles):
            rows.append(rec)
        elif rec["event"] in _SYNC and (rec["cpu"] in involved or rec["cpu"] is None):
            rows.append(rec)
    return rows[-MAX_ROWS:]


def race_diagram(finding: Finding, events: list[dict]) -> Table:
    rows = race_rows(finding, events)
    cpus = sorted({r["cpu"] for r in rows if r["cpu"] is not None} | {finding.cpu} - {None})
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
    table.add_column("step", justify="right", style="dim")
    for cpu in cpus:
        table.add_column(f"CPU{cpu}", overflow="fold", ratio=1)
    if any(r["cpu"] is None for r in rows):
        table.add_column("RCU", overflow="fold")
    for rec in rows:
        cells = [str(rec["step"])]
        text = f"{rec['func']}: {describe(rec)}"
        for cpu in cpus:
            cells.append(text if rec["cpu"] == cpu else "")
        if any(r["cpu"] is None for r in rows):
            cells.append(text if rec["cpu"] is None else "")
        table.add_row(*cells)
    marker = [f"{finding.step}"] + [
        Text(f"{finding.func}: {finding.access + ' -> ' if finding.access else ''}"
             f"BUG {finding.kind}",
             style="bold red") if cpu == finding.cpu else ""
        for cpu in cpus]
    if any(r["cpu"] is None for r in rows):
        marker.append("")
    table.add_row(*marker)
    return table


def render_report(finding: Finding, events: list[dict] | None) -> Group:
    parts = [Text(f"BUG: {finding.kind}", style="bold red"), Text(finding.summary)]
    if finding.backtrace:
        parts.append(Text("call trace: " + " <- ".join(finding.backtrace), style="dim"))
    if finding.obj:
        parts.append(Text(f"object: {finding.obj}"))
    for line in finding.detail:
        parts.append(Text(f"  {line}"))
    if finding.history:
        parts.append(Text("freed or changed earlier by:"))
        for h in finding.history:
            who = "RCU callback" if h["cpu"] is None else f"CPU{h['cpu']}"
            parts.append(Text(f"  step {h['step']:>5}  {who} {h['func']}: {h['what']}"))
    if events:
        parts.append(Text(""))
        parts.append(Text("race diagram:", style="bold"))
        parts.append(race_diagram(finding, events))
    return Group(*parts)


def print_report(console: Console, finding: Finding, token: str, events: list[dict] | None,
                 replay_cmd: str) -> None:
    console.print(render_report(finding, events))
    # Tokens are printed unwrapped: they must survive a copy and paste.
    console.print()
    console.print(f"token: {token}", soft_wrap=True, highlight=False)
    console.print(f"replay: {replay_cmd}", soft_wrap=True, highlight=False, style="dim")
