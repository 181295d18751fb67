"""The ptsim command line (SPEC: "Command line").

Exit codes: 0 no bug (or every expectation met), 1 a bug (or an expectation failed), 2 bad
input or usage with a one-line message on stderr, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import parallel
from .engine import Engine, RunResult
from .explore import explore
from .events import ftrace_lines, perfetto_trace, text_lines, write_jsonl
from .interrupt import sigint_deferred
from .kernel_model.errors import NotModelled
from .progress import StressProgress
from .report import print_report
from .scenario import ScenarioError, STRATEGIES, load_scenario
from .shrink import shrink
from .statehash import StateCache
from .strategies import Divergence
from .token import TokenError, decode


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit 2."""


def _die(message: str) -> int:
    print(f"ptsim: {message}", file=sys.stderr)
    return 2


# -- building engines ---------------------------------------------------------------------------

def _engine(path: str, variant: str | None, overrides: list[str]) -> Engine:
    scn = load_scenario(path).resolve(variant, overrides)
    try:
        return Engine(scn)
    except NotModelled as exc:
        raise UsageError(f"{path}: not modelled yet: {exc}") from None


# -- aggregating runs ----------------------------------------------------------------------------

@dataclass
class Tally:
    """Results of many schedules, grouped per kind as SPEC's JSON has them."""

    runs: int = 0
    steps: int = 0
    bugs: dict = field(default_factory=dict)
    hazards: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)  # kind -> RunResult of its first schedule

    def add(self, index: int, result: RunResult, engine: Engine) -> None:
        self.runs += 1
        self.steps += result.steps
        findings = ([(self.bugs, result.bug)] if result.bug else []) + [
            (self.hazards, h) for h in {h.kind: h for h in result.hazards}.values()]
        for table, finding in findings:
            entry = table.get(finding.kind)
            if entry is None:
                table[finding.kind] = {"kind": finding.kind, "count": 1, "first_run": index,
                                       "seed": result.seed, "token": engine.token(result.choices),
                                       "summary": finding.summary}
                self.first[finding.kind] = result
            else:
                entry["count"] += 1

    def as_json(self, path: str, variant: str | None, strategy: str, elapsed: float) -> dict:
        return {"scenario": path, "variant": variant, "strategy": strategy, "runs": self.runs,
                "steps": self.steps, "elapsed_s": round(elapsed, 3),
                "bugs": sorted(self.bugs.values(), key=lambda b: (b["first_run"], b["kind"])),
                "hazards": sorted(self.hazards.values(), key=lambda b: (b["first_run"], b["kind"]))}


def _replay_cmd(path: str, token: str) -> str:
    return f"ptsim replay {shlex.quote(path)} {token}"


def _print_report(console: Console, engine: Engine, path: str, result: RunResult) -> None:
    """Stress quietly, replay loudly: the report's diagram comes from a logged replay."""
    token = engine.token(result.choices)
    events = result.log if result.log is not None else engine.replay(result.choices).log
    print_report(console, result.bug, token, events, _replay_cmd(path, token))


# -- commands ---------------------------------------------------------------------------------

def cmd_run(args, console: Console) -> int:
    engine = _engine(args.scenario, args.variant, args.set)
    start = time.perf_counter()
    result = engine.run_seed(args.seed, args.strategy, args.depth, log=bool(args.log))
    elapsed = time.perf_counter() - start
    if args.log:
        with open(args.log, "w") as fh:
            write_jsonl(result.log, fh)
    tally = Tally()
    tally.add(0, result, engine)
    if args.json:
        out = tally.as_json(args.scenario, engine.scn.variant, args.strategy, elapsed)
        out["stats"] = result.stats
        print(json.dumps(out))
    elif result.bug:
        _print_report(console, engine, args.scenario, result)
    else:
        console.print(f"no bug: seed {args.seed}, {result.steps} steps")
        for mm, stats in result.stats.items():
            console.print(f"  {mm}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 1 if result.bug else 0


def _run_record(result: RunResult, base: int, engine: Engine) -> dict:
    """One schedule of --out FILE.jsonl."""
    found = result.bug is not None or bool(result.hazards)
    return {"run": result.seed - base, "seed": result.seed, "steps": result.steps,
            "bugs": [result.bug.kind] if result.bug else [],
            "hazards": [h.kind for h in result.hazards],
            "token": engine.token(result.choices) if found else None}


def cmd_stress(args, console: Console) -> int:
    if args.jobs is not None and args.dask is not None:
        raise UsageError("--jobs and --dask exclude each other (--dask runs on the cluster's workers)")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    engine = _engine(args.scenario, args.variant, args.set)
    tally = Tally()
    start = time.perf_counter()
    base = args.seed

    out = open(args.out, "w") if args.out else None
    pool = None
    progress = StressProgress(args.runs, enabled=not args.json)

    def on_result(result: RunResult) -> None:
        with sigint_deferred():  # a schedule is in both the tally and --out, or in neither
            tally.add(result.seed - base, result, engine)
            if out is not None:
                out.write(json.dumps(_run_record(result, base, engine)) + "\n")
        progress.update(tally.runs, len(tally.bugs))

    interrupted = False
    try:
        pool = parallel.open_pool(args.jobs or 1, args.dask)
        with progress:
            if pool is None:
                engine.run_seeds(range(base, base + args.runs), args.strategy, args.depth,
                                 on_result, stop_on_first=args.stop_on_first)
            else:
                job = parallel.Job.of(engine, Path(args.scenario).read_text(encoding="utf-8"),
                                      args.strategy, args.depth, base)
                parallel.run_batch(pool, job, args.runs, on_result, args.stop_on_first)
    except KeyboardInterrupt:
        interrupted = True  # report the schedules that finished, then exit 130
    except parallel.ParallelError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if pool is not None:
            pool.close()
        if out is not None:
            out.close()
    elapsed = time.perf_counter() - start
    code = 130 if interrupted else (1 if tally.bugs else 0)
    if interrupted:
        print(f"ptsim: interrupted after {tally.runs} schedules", file=sys.stderr)
    if args.json:
        print(json.dumps(tally.as_json(args.scenario, engine.scn.variant, args.strategy, elapsed)))
        return code
    console.print(f"{tally.runs} schedules, {tally.steps} steps in {elapsed:.2f} s "
                  f"({tally.runs / max(elapsed, 1e-9):.0f} schedules/s, "
                  f"{tally.steps / max(elapsed, 1e-9):.0f} steps/s)")
    _print_findings(console, engine, args.scenario, tally)
    return code


def _token_engine(args):
    """The engine a token was made for: variant and overrides come from the token; options on
    the command line must agree with it (SPEC)."""
    try:
        token = decode(args.token)
    except TokenError as exc:
        raise UsageError(f"token: {exc}") from None
    if args.variant is not None and args.variant != token.variant:
        raise UsageError(f"--variant {args.variant}: the token was made with variant {token.variant!r}")
    if args.set and tuple(args.set) != token.overrides:
        raise UsageError(f"--set {' '.join(args.set)}: the token was made with overrides "
                         f"{list(token.overrides)!r}")
    engine = _engine(args.scenario, token.variant, list(token.overrides))
    if engine.digest != token.digest:
        raise UsageError(f"{args.scenario}: the token was made for another scenario "
                         f"(digest {token.digest}, this file gives {engine.digest})")
    return token, engine


def cmd_replay(args, console: Console) -> int:
    token, engine = _token_engine(args)
    try:
        result = engine.replay(list(token.choices))
    except Divergence as exc:
        raise UsageError(f"{args.scenario}: token diverges: {exc}") from None
    if args.log:
        with open(args.log, "w") as fh:
            write_jsonl(result.log, fh)
    if args.format == "json":
        write_jsonl(result.log, sys.stdout)
    elif args.format == "perfetto":
        json.dump(perfetto_trace(result.log, engine.scn.cpus), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        lines = ftrace_lines(result.log) if args.format == "ftrace" else text_lines(result.log)
        sys.stdout.write("\n".join(lines) + "\n")
        if result.bug:
            console.print()
            print_report(console, result.bug, args.token, result.log,
                         _replay_cmd(args.scenario, args.token))
        else:
            console.print(f"no bug: the schedule ran to the end ({result.steps} steps)")
    return 1 if result.bug else 0


def cmd_explore(args, console: Console) -> int:
    if args.preemptions < 0:
        raise UsageError("--preemptions must be at least 0")
    if args.max_schedules is not None and args.max_schedules < 1:
        raise UsageError("--max-schedules must be at least 1")
    engine = _engine(args.scenario, args.variant, args.set)
    tally = Tally()
    cache = None if args.no_state_cache else StateCache()
    start = time.perf_counter()
    interrupted = False
    try:
        found = explore(engine, args.preemptions, args.max_schedules,
                        lambda index, result: tally.add(index, result, engine), cache)
    except KeyboardInterrupt:
        interrupted, found = True, None
    elapsed = time.perf_counter() - start
    complete = found is not None and found.complete
    pruned = found.pruned if found is not None else 0
    code = 130 if interrupted else (1 if tally.bugs else 0)
    if interrupted:
        print(f"ptsim: interrupted after {tally.runs} schedules", file=sys.stderr)
    if args.json:
        out = tally.as_json(args.scenario, engine.scn.variant, "explore", elapsed)
        out.update(complete=complete, schedules=tally.runs, preemptions=args.preemptions,
                   pruned=pruned)
        print(json.dumps(out))
        return code
    how = ("every schedule explored" if complete else
           f"stopped at --max-schedules {args.max_schedules}" if not interrupted else "interrupted")
    console.print(f"{how}: {tally.runs} schedules with at most {args.preemptions} preemptions"
                  + (f" (and {pruned} cut short at states already explored)" if pruned else "")
                  + f", {tally.steps} steps in {elapsed:.2f} s")
    _print_findings(console, engine, args.scenario, tally)
    return code


def cmd_shrink(args, console: Console) -> int:
    token, engine = _token_engine(args)
    try:
        result = shrink(engine, list(token.choices))
    except Divergence as exc:
        raise UsageError(f"{args.scenario}: token diverges: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{args.scenario}: nothing to shrink: {exc}") from None
    before, after = result.before, result.after
    new_token = engine.token(after.result.choices)
    if args.json:
        print(json.dumps({"kind": result.kind, "token": new_token,
                          "steps_before": before.result.steps, "steps_after": after.result.steps,
                          "preemptions_before": before.preemptions,
                          "preemptions_after": after.preemptions}))
    else:
        console.print(f"shrunk {result.kind}: {before.result.steps} -> {after.result.steps} steps, "
                      f"{before.preemptions} -> {after.preemptions} preemptions, "
                      f"{before.switches} -> {after.switches} context switches")
        replayed = engine.replay(after.result.choices)
        if replayed.bug is not None:
            print_report(console, replayed.bug, new_token, replayed.log,
                         _replay_cmd(args.scenario, new_token))
        else:
            console.print(f"token: {new_token}")
    return 1 if after.result.bug is not None else 0


def _print_findings(console: Console, engine: Engine, path: str, tally: Tally) -> None:
    """The distinct findings of many schedules, then each bug's report from a logged replay
    (replayed here: runs from workers or explore come back without the finding's history)."""
    if not tally.bugs and not tally.hazards:
        console.print("no bug found")
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
        _print_report(console, engine, path, engine.replay(tally.first[kind].choices))


def cmd_validate(args, console: Console) -> int:
    for path in args.scenarios:
        sf = load_scenario(path)
        for name in sf.variant_names():
            sf.resolve(None if name == "base" and not sf.variants else name)
        console.print(f"ok {path}: {len(sf.variant_names())} variant(s), {len(sf.agents)} agent(s)")
    return 0


def _scenario_files(paths: list[str]) -> list[tuple[str, str]]:
    """(display path, file path) of every scenario to check; measure/ only when named."""
    if not paths:
        if Path("scenarios").is_dir():
            paths = ["scenarios"]
        else:
            root = resources.files("ptsim.scenarios")
            return [(p.name, str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
                    if p.name.endswith(".toml")]
    files = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            named_measure = path.name == "measure"
            for f in sorted(path.rglob("*.toml")):
                if "measure" in f.relative_to(path).parts[:-1] and not named_measure:
                    continue
                files.append((f.name, str(f)))
        elif path.is_file():
            files.append((path.name, p))
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def cmd_check(args, console: Console) -> int:
    files = _scenario_files(args.paths)
    table = Table(title="ptsim check")
    table.add_column("scenario", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    for col in ("expected", "found", "runs", "first bug at run", "verdict"):
        table.add_column(col, overflow="fold")
    all_ok = True
    start = time.perf_counter()
    for shown, path in files:
        sf = load_scenario(path)
        names = [None] if not sf.variants else sf.variant_names()
        for name in names:
            engine = _engine(path, name, [])
            expect = engine.scn.expect_kinds
            tally = Tally()
            results = engine.run_seeds(range(sf.expect.runs), sf.expect.strategy, sf.expect.depth)
            for i, result in enumerate(results):
                tally.add(i, result, engine)
            found = sorted(set(tally.bugs) | set(tally.hazards))
            unexpected = [k for k in tally.bugs if k not in expect]
            missing = [k for k in expect if k not in tally.bugs and k not in tally.hazards]
            ok = not unexpected and not missing
            all_ok &= ok
            firsts = [entry["first_run"] for kind, entry in (*tally.bugs.items(), *tally.hazards.items())
                      if kind in expect or kind in tally.bugs]
            verdict = "[green]holds[/]" if ok else "[red]FAILS[/]" + (
                f" (missing {', '.join(missing)})" if missing else "") + (
                f" (unexpected {', '.join(unexpected)})" if unexpected else "")
            table.add_row(shown.removesuffix(".toml"), name or "base", ", ".join(expect) or "no bug",
                          ", ".join(found) or "no bug", f"{sf.expect.runs} {sf.expect.strategy}",
                          str(min(firsts)) if firsts else "-", verdict)
    console.print(table)
    console.print(f"{'all expectations hold' if all_ok else 'some expectations FAIL'} "
                  f"({time.perf_counter() - start:.1f} s)")
    return 0 if all_ok else 1


# -- argument parsing ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptsim", description="Concurrency simulator for the Linux "
                                "kernel's page-table lifetime protocols.")
    sub = p.add_subparsers(dest="command", required=True)

    def schedule_opts(sp, runs: bool) -> None:
        sp.add_argument("scenario")
        if runs:
            sp.add_argument("--runs", type=int, required=True)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--strategy", choices=STRATEGIES, default="random")
        sp.add_argument("--depth", type=int, default=3, help="PCT bug depth (default 3)")
        sp.add_argument("--variant")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sp.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run one schedule")
    schedule_opts(run, runs=False)
    run.add_argument("--log", metavar="FILE", help="write the structured event log (JSON lines)")
    stress = sub.add_parser("stress", help="run many seeded schedules")
    schedule_opts(stress, runs=True)
    stress.add_argument("--stop-on-first", action="store_true")
    stress.add_argument("--out", metavar="FILE.jsonl", help="one JSON line per schedule")
    stress.add_argument("--jobs", type=int, metavar="J",
                        help="spread the schedules over J local processes (default 1: this one)")
    stress.add_argument("--dask", metavar="ADDRESS",
                        help="run the schedules on a Dask cluster, e.g. tcp://127.0.0.1:8786 "
                        "(needs ptsim[dask])")
    replay = sub.add_parser("replay", help="re-run the schedule a token names")
    replay.add_argument("scenario")
    replay.add_argument("token")
    replay.add_argument("--log", metavar="FILE")
    replay.add_argument("--format", choices=("text", "ftrace", "json", "perfetto"), default="text")
    replay.add_argument("--variant")
    replay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate = sub.add_parser("validate", help="parse and check scenario files")
    validate.add_argument("scenarios", nargs="+")
    check = sub.add_parser("check", help="run every variant against its expectations")
    check.add_argument("paths", nargs="*")
    explore_p = sub.add_parser("explore", help="every schedule within a preemption bound")
    explore_p.add_argument("scenario")
    explore_p.add_argument("--preemptions", type=int, default=2, metavar="K",
                           help="at most K switches away from a CPU that could go on (default 2)")
    explore_p.add_argument("--max-schedules", type=int, metavar="N", help="stop after N schedules")
    explore_p.add_argument("--no-state-cache", action="store_true",
                           help="explore without pruning at states already explored")
    explore_p.add_argument("--variant")
    explore_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    explore_p.add_argument("--json", action="store_true")
    shrink_p = sub.add_parser("shrink", help="a smaller schedule showing the same bug")
    shrink_p.add_argument("scenario")
    shrink_p.add_argument("token")
    shrink_p.add_argument("--variant")
    shrink_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    shrink_p.add_argument("--json", action="store_true")
    return p


COMMANDS = {"run": cmd_run, "stress": cmd_stress, "replay": cmd_replay,
            "validate": cmd_validate, "check": cmd_check, "explore": cmd_explore,
            "shrink": cmd_shrink}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("runs", "depth"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            return _die(f"--{name} must be at least 1")
    # Piped output gets a width a two- or three-CPU race diagram fits in.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        return COMMANDS[args.command](args, console)
    except (ScenarioError, UsageError) as exc:
        return _die(str(exc))
    except NotModelled as exc:
        return _die(f"{args.scenario if hasattr(args, 'scenario') else 'scenario'}: "
                    f"not modelled yet: {exc}")
    except OSError as exc:
        return _die(f"{exc.filename or ''}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("ptsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
