"""The ptsim command line (SPEC: "Command line"): argument parsing and one small function per
command, over the engine's public API; what they print is the reporter's.

Exit codes: 0 no bug (or every expectation met), 1 a bug (or an expectation failed), 2 bad
input or usage with a one-line message on stderr, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from . import __version__, api, coverage, faildb, listing, parallel, usermods
from .engine import Engine, RunResult, token_mismatch
from .events import FORMATS, write_jsonl
from .explore import Exploration, explore
from .kernel_model.errors import NotModelled
from .progress import StressProgress
from .report import print_report
from .reporter import Reporter, interrupted, kernel_fields
from .results import Tally, run_record, verdict
from .scenario import ScenarioError, kernel_override, load_scenario
from .shrink import DEFAULT_BUDGET, shrink
from .statehash import StateCache
from .strategies import DEFAULT_STRATEGY, STRATEGIES, Divergence
from .token import TokenError, decode


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit 2."""


def duration(text: str) -> float:
    """--time: "90", "90s", "5m", "1h" -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 5m)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r}")
    return seconds


def _die(message: str) -> int:
    print(f"ptsim: {message}", file=sys.stderr)
    return 2


def _overrides(args) -> list[str]:
    """--kernel NAME and the --set items, as the overrides a token records."""
    kernel = getattr(args, "kernel", None)
    return ([kernel_override(kernel)] if kernel is not None else []) + list(args.set)


def _variant(path: str, variant: str | None, overrides: list[str]) -> api.Variant:
    try:
        return api.Variant(api.load(path), variant, list(overrides))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _engine(path: str, variant: str | None, overrides: list[str]) -> Engine:
    scn = load_scenario(path).resolve(variant, overrides)
    try:
        return Engine(scn)
    except NotModelled as exc:
        raise UsageError(f"{path}: not modelled yet: {exc}") from None


def _known(args, engine: Engine):
    """--db: the failure database, and its findings for this scenario replayed first."""
    if getattr(args, "db", None) is None:
        return None, None
    db = faildb.FailureDb(args.db)
    return db, faildb.replay_known(db, engine)


def _record(db, engine: Engine, tally: Tally, known, out: Reporter) -> None:
    """Record this run's findings; say what the known ones did (the seeded result is the same
    with or without the database)."""
    if db is None:
        return
    faildb.record_tally(db, engine, tally)
    for entry in known:
        out.say(f"known {entry['kind']}: {'reproduces' if entry['reproduces'] else 'gone'} "
                f"({entry['token'][:24]}...)")


def _known_json(known) -> dict:
    return {} if known is None else {"known": known}


def _at_least(args, **limits) -> None:
    for name, low in limits.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}")


# -- commands ---------------------------------------------------------------------------------

def cmd_run(args, out: Reporter) -> int:
    engine = _engine(args.scenario, args.variant, _overrides(args))
    start = time.perf_counter()
    result = engine.run_seed(args.seed, args.strategy, args.depth, log=bool(args.log))
    elapsed = time.perf_counter() - start
    if args.log:
        with open(args.log, "w") as fh:
            write_jsonl(result.log, fh)
    tally = Tally()
    tally.add(0, result, engine)
    if not args.no_shrink:
        tally.shrink(engine, args.shrink_budget)
    if out.json:
        doc = tally.as_json(args.scenario, engine.scn.variant, args.strategy, elapsed)
        doc["stats"] = result.stats
        doc.update(kernel_fields(engine.scn))
        out.emit(doc)
    elif result.bug:
        out.report(engine, args.scenario, result, tally.shrunk.get(result.bug.kind))
    else:
        out.say(f"no bug: seed {args.seed}, {result.steps} steps")
        for mm, stats in result.stats.items():
            out.say(f"  {mm}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    for hazard in result.hazards:  # counted, never fatal: said, so that no one misses it
        out.say(f"hazard {hazard.kind} at step {hazard.step}: {hazard.summary}")
    return 1 if result.bug else 0


def cmd_stress(args, out: Reporter) -> int:
    if args.jobs is not None and args.dask is not None:
        raise UsageError("--jobs and --dask exclude each other "
                         "(--dask runs on the cluster's workers)")
    _at_least(args, jobs=1)
    variant = _variant(args.scenario, args.variant, _overrides(args))
    engine = variant._engine()
    db, known = _known(args, engine)
    lines = open(args.out, "w") if args.out else None
    progress = StressProgress(args.runs, enabled=not out.json)

    def on_result(result: RunResult, tally: Tally) -> None:
        if lines is not None:  # inside stress's deferred-SIGINT block, with the tally
            lines.write(json.dumps(run_record(result, args.seed, engine)) + "\n")
        progress.update(tally.runs, len(tally.bugs))

    try:
        with progress:
            summary = variant.stress(args.runs, args.seed, args.strategy, args.depth,
                                     args.jobs or 1, args.dask, args.stop_on_first, on_result,
                                     args.time, coverage=args.coverage)
    except parallel.ParallelError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if lines is not None:
            lines.close()
    tally, elapsed = summary.tally, summary.elapsed_s
    if summary.interrupted:
        interrupted(tally.runs)
    elif not args.no_shrink:
        tally.shrink(engine, args.shrink_budget)
    _record(db, engine, tally, known, out)
    if summary.cut_short:
        out.say(f"cut short by --time after {tally.runs} of {args.runs} schedules: this result "
                "depends on the machine's speed")
    from .coverage import describe

    cov_line, cov_json = "", {}
    if summary.coverage is not None:
        cov_line, cov_json = "\n" + describe(summary.coverage), {"coverage": summary.coverage}
    elif args.coverage:
        cov_line = "\ncoverage: not measured when the schedules run in other processes"
    out.summary(engine, args.scenario, tally, args.strategy, elapsed,
                f"{tally.runs} schedules, {tally.steps} steps in {elapsed:.2f} s "
                f"({tally.runs / max(elapsed, 1e-9):.0f} schedules/s, "
                f"{tally.steps / max(elapsed, 1e-9):.0f} steps/s)" + cov_line,
                stronger=f"that is {tally.runs} {args.strategy} schedules: a stronger search is "
                + ("--strategy pct, " if args.strategy != "pct" else "")
                + f"more --runs, or ptsim explore {args.scenario}", **_known_json(known),
                **({"cut_short": True} if summary.cut_short else {}), **cov_json)
    return 130 if summary.interrupted else (1 if tally.bugs else 0)


def _token_engine(args):
    """The engine a token was made for: variant and overrides come from the token; options on
    the command line must agree with it (SPEC)."""
    try:
        token = decode(args.token)
    except TokenError as exc:
        raise UsageError(f"token: {exc}") from None
    why = token_mismatch(token)
    if why:
        raise UsageError(f"token: {why}")
    if args.variant is not None and args.variant != token.variant:
        raise UsageError(f"--variant {args.variant}: the token was made with variant "
                         f"{token.variant!r}")
    given = _overrides(args)
    if given and tuple(given) != token.overrides:
        flags = " ".join([f"--kernel {args.kernel}"] * (args.kernel is not None)
                         + [f"--set {item}" for item in args.set])
        raise UsageError(f"{flags}: the token was made with overrides "
                         f"{list(token.overrides)!r}")
    engine = _engine(args.scenario, token.variant, list(token.overrides))
    why = token_mismatch(token, engine.digest)
    if why:
        raise UsageError(f"{args.scenario}: token: {why}")
    return token, engine


def cmd_replay(args, out: Reporter) -> int:
    token, engine = _token_engine(args)
    try:
        result = engine.replay(list(token.choices))
    except Divergence as exc:
        raise UsageError(f"{args.scenario}: token diverges: {exc}") from None
    if args.log:
        with open(args.log, "w") as fh:
            write_jsonl(result.log, fh)
    FORMATS[args.format].write(result.log, engine.scn.cpus, sys.stdout)
    sys.stdout.flush()
    # The text format is for reading: the report follows it. Any other format is a trace for a
    # tool, so stdout carries the trace alone and the report goes to stderr.
    console = out.console if args.format == "text" else Console(
        file=sys.stderr, highlight=False, width=None if sys.stderr.isatty() else 160)
    if result.bug:
        console.print()
        print_report(console, result.bug, args.token, result.log,
                     out.replay_command(args.scenario, args.token), engine.scn)
    else:
        console.print(f"no bug: the schedule ran to the end ({result.steps} steps)")
    return 1 if result.bug else 0


def cmd_explore(args, out: Reporter) -> int:
    _at_least(args, preemptions=0, max_schedules=1, faults=0)
    engine = _engine(args.scenario, args.variant, _overrides(args))
    db, known = _known(args, engine)
    tally = Tally()
    cache = None if args.no_state_cache else StateCache(args.preemptions)
    start = time.perf_counter()
    stopped = False
    progress = StressProgress(args.max_schedules, enabled=not out.json, label="explore")

    deadline = None if args.time is None else start + args.time
    searched, on_end, tracker = coverage.explore_coverage(engine, not args.no_coverage)

    def on_result(index: int, result: RunResult) -> None:
        tally.add(index, result, engine)
        progress.update(tally.runs, len(tally.bugs))
        if deadline is not None and time.perf_counter() >= deadline:
            raise api.TimeUp()

    cut_short = False
    found = Exploration()
    try:
        with progress:
            explore(searched, args.preemptions, args.max_schedules, on_result, cache,
                    args.faults, not args.no_reduction, on_end, found)
    except api.TimeUp:
        cut_short = True
    except KeyboardInterrupt:
        stopped = True
    elapsed = time.perf_counter() - start
    complete, pruned, reduced = found.complete, found.pruned, found.reduced
    if stopped:
        interrupted(tally.runs)
    _record(db, engine, tally, known, out)
    how = ("every schedule explored" if complete else
           "cut short by --time (this result depends on the machine's speed)" if cut_short else
           f"stopped at --max-schedules {args.max_schedules}" if not stopped else "interrupted")
    out.summary(engine, args.scenario, tally, "explore", elapsed,
                f"{how}: {tally.runs} schedules with at most {args.preemptions} preemptions "
                f"and {args.faults} injected faults"
                + (f" (and {pruned} cut short at states already explored)" if pruned else "")
                + (f"; {reduced} branches left out as equivalent to schedules explored "
                   "(partial-order reduction)" if reduced else "")
                + f", {tally.steps} steps in {elapsed:.2f} s"
                + ("\n" + coverage.describe(tracker.figure()) if tracker is not None else ""),
                stronger=f"a stronger search is --preemptions {args.preemptions + 1}"
                if complete else "the search did not finish: raise --max-schedules",
                complete=complete, schedules=tally.runs, preemptions=args.preemptions,
                faults=args.faults, pruned=pruned, reduced=reduced, **_known_json(known),
                **({"cut_short": True} if cut_short else {}),
                **({"coverage": tracker.figure()} if tracker is not None else {}))
    return 130 if stopped else (1 if tally.bugs else 0)


def cmd_shrink(args, out: Reporter) -> int:
    token, engine = _token_engine(args)
    progress = StressProgress(None, enabled=not out.json, label="shrink")
    try:
        with progress:
            result = shrink(engine, list(token.choices),
                            on_schedule=lambda n: progress.update(n, 0))
    except Divergence as exc:
        raise UsageError(f"{args.scenario}: token diverges: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{args.scenario}: nothing to shrink: {exc}") from None
    before, after = result.before, result.after
    new_token = engine.token(after.result.choices)
    if out.json:
        out.emit({"kind": result.kind, "token": new_token,
                  "steps_before": before.result.steps, "steps_after": after.result.steps,
                  "preemptions_before": before.preemptions,
                  "preemptions_after": after.preemptions})
    else:
        out.say(f"shrunk {result.kind}: {before.result.steps} -> {after.result.steps} steps, "
                f"{before.preemptions} -> {after.preemptions} preemptions, "
                f"{before.switches} -> {after.switches} context switches")
        replayed = engine.replay(after.result.choices)
        if replayed.bug is not None:
            out.report(engine, args.scenario, replayed)
        else:
            out.say(f"token: {new_token}")
    return 1 if after.result.bug is not None else 0


def cmd_validate(args, out: Reporter) -> int:
    for path in args.scenarios:
        sf = load_scenario(path)
        warnings = []
        for name in sf.variant_names():
            scn = sf.resolve(None if name == "base" and not sf.variants else name,
                             _overrides(args))
            why = scn.counterfactual
            if why:  # allowed (a buggy variant reverts a fix), but said: one line per variant
                warnings.append(f"ptsim: warning: {path}: variant {name}: counterfactual, it "
                                f"matches no kernel profile (kernel "
                                f"{scn.kernel or 'not named'}): " + "; ".join(why))
        out.say(f"ok {path}: {len(sf.variant_names())} variant(s), {len(sf.agents)} agent(s)")
        for line in warnings:
            print(line, file=sys.stderr)
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


def cmd_check(args, out: Reporter) -> int:
    verdicts = []
    start = time.perf_counter()
    for shown, path in _scenario_files(args.paths):
        sf = load_scenario(path)
        for name in [None] if not sf.variants else sf.variant_names():
            engine = _engine(path, name, _overrides(args))
            db, known = _known(args, engine)
            tally = Tally()
            progress = StressProgress(sf.expect.runs, label=f"check {shown} {name or 'base'}")

            def on_result(result: RunResult, tally=tally, engine=engine, progress=progress) -> None:
                tally.add(result.seed, result, engine)
                progress.update(tally.runs, len(tally.bugs))

            with progress:
                engine.run_seeds(range(sf.expect.runs), sf.expect.strategy, sf.expect.depth,
                                 on_result)
            _record(db, engine, tally, known, out)
            verdicts.append(verdict(shown.removesuffix(".toml"), name or "base", engine, tally,
                                    sf.expect.runs, sf.expect.strategy))
    out.check(verdicts, time.perf_counter() - start)
    return 0 if all(v.holds for v in verdicts) else 1


def cmd_bench(args, out: Reporter) -> int:
    from .bench import bench, render

    result = bench()
    if out.json:
        out.emit(result)
    else:
        out.say(render(result))
    return 0


def cmd_list(args, out: Reporter) -> int:
    _rows, columns = listing.LISTS[args.what]
    out.listing(args.what, listing.rows(args.what), columns)
    return 0


# -- argument parsing ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    scenario = argparse.ArgumentParser(add_help=False)
    scenario.add_argument("scenario")
    variant = argparse.ArgumentParser(add_help=False)
    variant.add_argument("--variant")
    variant.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    variant.add_argument("--kernel", metavar="NAME",
                         help="start from a kernel profile (ptsim list kernels); [config], the "
                         "variant and --set still override it")
    kernel = argparse.ArgumentParser(add_help=False)
    kernel.add_argument("--kernel", metavar="NAME",
                        help="start every variant from a kernel profile (ptsim list kernels)")
    kernel.set_defaults(set=[])
    schedule = argparse.ArgumentParser(add_help=False)
    schedule.add_argument("--seed", type=int, default=0)
    schedule.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                          help=f"default {DEFAULT_STRATEGY}")
    schedule.add_argument("--depth", type=int, default=3, help="PCT bug depth (default 3)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true")
    timed = argparse.ArgumentParser(add_help=False)
    timed.add_argument("--time", type=duration, metavar="DURATION",
                       help="stop after this wall time (60s, 5m): the result then says cut_short "
                       "and depends on the machine")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument("--db", nargs="?", const=faildb.DEFAULT_DIR, metavar="DIR",
                          help="replay the findings recorded for this scenario first, and record "
                          f"this run's (default {faildb.DEFAULT_DIR}/)")
    shrinking = argparse.ArgumentParser(add_help=False)
    shrinking.add_argument("--shrink-budget", type=int, default=DEFAULT_BUDGET, metavar="N",
                           help=f"schedules shrinking may run per bug kind (default "
                           f"{DEFAULT_BUDGET})")
    shrinking.add_argument("--no-shrink", action="store_true",
                           help="report the schedules as found, not shrunk")
    token = argparse.ArgumentParser(add_help=False)
    token.add_argument("token")
    imports = argparse.ArgumentParser(add_help=False)
    imports.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE_OR_FILE.py",
                         help="load a user module (ops, patched kernel functions, strategies) "
                         "first; repeatable")

    p = argparse.ArgumentParser(prog="ptsim", description="Concurrency simulator for the Linux "
                                "kernel's page-table lifetime protocols.")
    p.add_argument("--version", action="version", version=f"ptsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help, parents=()):
        sp = sub.add_parser(name, help=help, parents=list(parents))
        sp.set_defaults(fn=fn)
        return sp

    run = command("run", cmd_run, "run one schedule",
                  (scenario, schedule, variant, as_json, imports, shrinking))
    run.add_argument("--log", metavar="FILE", help="write the structured event log (JSON lines)")
    stress = command("stress", cmd_stress, "run many seeded schedules",
                     (scenario, schedule, variant, as_json, imports, shrinking, database,
                      timed))
    stress.add_argument("--runs", type=int, required=True)
    stress.add_argument("--stop-on-first", action="store_true")
    stress.add_argument("--out", metavar="FILE.jsonl", help="one JSON line per schedule")
    stress.add_argument("--jobs", type=int, metavar="J",
                        help="spread the schedules over J local processes (default 1: this one)")
    stress.add_argument("--dask", metavar="ADDRESS",
                        help="run the schedules on a Dask cluster, e.g. tcp://127.0.0.1:8786 "
                        "(needs ptsim[dask])")
    stress.add_argument("--coverage", action="store_true",
                        help="report how many of the scenario's conflicting cross-CPU step pairs "
                        "the schedules saw in both orders (slower: 10-150 %%; not with --jobs "
                        "or --dask)")
    replay = command("replay", cmd_replay, "re-run the schedule a token names",
                     (scenario, token, variant, imports))
    replay.add_argument("--log", metavar="FILE")
    replay.add_argument("--format", choices=FORMATS, default="text")
    validate = command("validate", cmd_validate, "parse and check scenario files; warn on "
                       "stderr about variants no released kernel has", (imports, kernel))
    validate.add_argument("scenarios", nargs="+")
    check = command("check", cmd_check, "run every variant against its expectations",
                    (imports, database, kernel))
    check.add_argument("paths", nargs="*")
    explore_p = command("explore", cmd_explore, "every schedule within a preemption bound",
                        (scenario, variant, as_json, imports, database, timed))
    explore_p.add_argument("--preemptions", type=int, default=2, metavar="K",
                           help="at most K switches away from a CPU that could go on, or "
                                "steps run while an IPI waits to be taken (default 2)")
    explore_p.add_argument("--max-schedules", type=int, metavar="N", help="stop after N schedules")
    explore_p.add_argument("--faults", type=int, default=2, metavar="F",
                           help="at most F injected faults fire in one schedule (default 2)")
    explore_p.add_argument("--no-state-cache", action="store_true",
                           help="explore without pruning at states already explored")
    explore_p.add_argument("--no-reduction", action="store_true",
                           help="explore without partial-order reduction (every order of "
                                "independent steps is run)")
    explore_p.add_argument("--no-coverage", action="store_true",
                           help="do not report how many of the scenario's conflicting cross-CPU "
                                "step pairs the schedules saw in both orders")
    command("shrink", cmd_shrink, "a smaller schedule showing the same bug",
            (scenario, token, variant, as_json, imports))
    command("bench", cmd_bench, "the engine's speed: a simulated step against a bare trio "
            "hand-off, and schedules per second on the catalogue", (as_json,))
    list_p = command("list", cmd_list, "what ptsim knows: ops, kernel functions, config keys, "
                     "faults, bug kinds, strategies, trace formats, kernel profiles",
                     (as_json, imports))
    list_p.add_argument("what", choices=listing.LISTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Piped output gets a width a two- or three-CPU race diagram fits in.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    try:
        _at_least(args, runs=1, depth=1, shrink_budget=1)
        imports = getattr(args, "imports", [])
        usermods.load_all(imports)
        return args.fn(args, Reporter(console, getattr(args, "json", False), imports))
    except (ScenarioError, UsageError, usermods.ImportFailed) as exc:
        return _die(str(exc))
    except NotModelled as exc:
        return _die(f"{getattr(args, 'scenario', 'scenario')}: not modelled yet: {exc}")
    except OSError as exc:
        return _die(f"{exc.filename or ''}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        print("ptsim: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
