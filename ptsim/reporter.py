"""What the commands print: one reporter, text (rich) or JSON, shared by every command.

Stress quietly, replay loudly: a bug's report and race diagram come from a logged replay of its
schedule, made here only when a report is printed.
"""

from __future__ import annotations

import io
import json
import shlex
import sys

from rich.console import Console
from rich.table import Table

from .engine import Engine, RunResult
from .report import print_report
from .results import Tally, Verdict


def kernel_fields(scn) -> dict:
    """What a --json result adds about the kernel: ``kernel`` (the profile named, if any) and
    ``counterfactual`` (why no released kernel has the configuration, if none has)."""
    out = {}
    if scn.kernel is not None:
        out["kernel"] = scn.kernel
    why = scn.counterfactual
    if why:
        out["counterfactual"] = why
    return out


def counterfactual_line(scn) -> str:
    """One line for a text result whose configuration no released kernel has ("" otherwise)."""
    why = scn.counterfactual
    return ("counterfactual: this configuration matches no kernel profile: " + "; ".join(why)
            if why else "")


def replay_command(path: str, token: str, imports=()) -> str:
    flags = "".join(f" --import {shlex.quote(spec)}" for spec in imports)
    return f"ptsim replay {shlex.quote(path)} {token}{flags}"


class Reporter:
    @classmethod
    def to_text(cls, imports=()) -> tuple[Reporter, io.StringIO]:
        """A reporter writing plain text into a buffer (reports returned as strings: the API's
        Finding.report, pytest's failure messages)."""
        buf = io.StringIO()
        console = Console(file=buf, width=160, color_system=None, highlight=False)
        return cls(console, imports=imports), buf

    def __init__(self, console: Console, as_json: bool = False, imports=()) -> None:
        self.console = console
        self.json = as_json
        self.imports = list(imports)  # --import flags: every printed replay command carries them

    def replay_command(self, path: str, token: str) -> str:
        return replay_command(path, token, self.imports)

    def emit(self, doc: dict) -> None:
        """The one JSON object a --json command prints on stdout."""
        print(json.dumps(doc))

    def say(self, text: str) -> None:
        """Plain text (no rich markup: "[expect]" is a TOML table, not a style)."""
        if not self.json:
            self.console.print(text, markup=False)

    # -- bugs ------------------------------------------------------------------------------
    def report(self, engine: Engine, path: str, result: RunResult, shrunk=None) -> None:
        """A bug's report, with its diagram from a logged replay of the schedule; when it was
        shrunk, of the shrunk schedule, with both tokens."""
        token = engine.token(result.choices)
        if shrunk is not None and shrunk.after.result.choices != result.choices:
            small = engine.replay(shrunk.after.result.choices)
            small_token = engine.token(small.choices)
            print_report(self.console, small.bug, token, small.log,
                         self.replay_command(path, token), engine.scn,
                         (shrunk.summary(), small_token, self.replay_command(path, small_token)))
            return
        events = result.log if result.log is not None else engine.replay(result.choices).log
        print_report(self.console, result.bug, token, events, self.replay_command(path, token),
                     engine.scn)

    def findings(self, engine: Engine, path: str, tally: Tally, stronger: str = "") -> None:
        """The distinct findings of many schedules, then each bug's report (replayed here:
        runs from workers or explore come back without the finding's history). ``stronger``:
        what a clean result says a stronger search would be."""
        console = self.console
        if not tally.bugs and not tally.hazards:
            console.print("no bug found" + (f"; {stronger}" if stronger else ""))
            return
        table = Table(title="distinct findings")
        for col in ("kind", "where", "count", "first run", "seed", "token"):
            table.add_column(col, overflow="fold")
        for entry in (*tally.bugs.values(), *tally.hazards.values()):
            first = tally.first[entry["kind"]]
            finding = first.bug if first.bug and first.bug.kind == entry["kind"] else None
            where = finding.func if finding else "-"
            table.add_row(entry["kind"], str(where), str(entry["count"]), str(entry["first_run"]),
                          "-" if entry["seed"] is None else str(entry["seed"]), entry["token"])
        console.print(table)
        for kind in tally.bugs:
            console.print()
            self.report(engine, path, engine.replay(tally.first[kind].choices),
                        tally.shrunk.get(kind))

    # -- many schedules ----------------------------------------------------------------------
    def summary(self, engine: Engine, path: str, tally: Tally, strategy: str, elapsed: float,
                headline: str, stronger: str = "", **extra) -> None:
        """stress's and explore's result: the JSON object, or a headline, the findings table
        and each bug's report."""
        if self.json:
            doc = tally.as_json(path, engine.scn.variant, strategy, elapsed)
            doc.update(extra)
            doc.update(kernel_fields(engine.scn))
            self.emit(doc)
            return
        self.console.print(headline)
        line = counterfactual_line(engine.scn)
        if line:
            self.console.print(line, markup=False)
        self.findings(engine, path, tally, stronger)

    def check(self, verdicts: list[Verdict], elapsed: float) -> None:
        table = Table(title="ptsim check")
        table.add_column("scenario", no_wrap=True)
        table.add_column("variant", no_wrap=True)
        for col in ("expected", "found", "runs", "first bug at run", "verdict"):
            table.add_column(col, overflow="fold")
        for v in verdicts:
            text = "[green]holds[/]" if v.holds else "[red]FAILS[/]" + (
                f" (missing {', '.join(v.missing)})" if v.missing else "") + (
                f" (unexpected {', '.join(v.unexpected)})" if v.unexpected else "")
            table.add_row(v.scenario, v.variant, ", ".join(v.expect) or "no bug",
                          ", ".join(v.found) or "no bug", f"{v.runs} {v.strategy}",
                          "-" if v.first_bug is None else str(v.first_bug), text)
        self.console.print(table)
        ok = all(v.holds for v in verdicts)
        self.console.print(f"{'all expectations hold' if ok else 'some expectations FAIL'} "
                           f"({elapsed:.1f} s)")

    # -- listings ---------------------------------------------------------------------------
    def listing(self, title: str, rows: list[dict], columns: list[str]) -> None:
        """`ptsim list`: a table, or the rows as one JSON list."""
        if self.json:
            print(json.dumps(rows))
            return
        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row.get(col)) for col in columns))
        self.console.print(table)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict) and "name" in value and "type" in value:  # an op's parameter
        text = f"{value['name']}: {value['type']}"
        return text + (f" = {_cell(value['default'])}" if "default" in value else "")
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def interrupted(runs: int) -> None:
    print(f"ptsim: interrupted after {runs} schedules", file=sys.stderr)
