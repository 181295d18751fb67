"""The Python API: ``import ptsim``.

    sc = ptsim.load("scenarios/d01_semi_rcu_single_free.toml")
    v = sc.variant("semi-rcu")
    r = v.run(seed=7, strategy="pct")      # r.bug, r.hazards, r.steps, r.stats, r.token
    s = v.stress(runs=300, strategy="pct")  # s.bugs, s.hazards, s.as_json()
    e = v.explore(preemptions=2)            # the same summary, plus e.complete

Errors raise ScenarioError (bad input, with the one-line message the CLI prints) or TokenError.
Nothing here prints or exits. The command line is built on these same calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import coverage as _coverage
from . import parallel, usermods
from .engine import Engine, RunResult, token_mismatch
from .explore import explore as _explore
from .interrupt import sigint_deferred
from .kernel_model.errors import NotModelled
from .reporter import Reporter, replay_command
from .results import Tally
from .scenario import ScenarioError, ScenarioFile, kernel_override, load_scenario, loads_scenario
from .shrink import shrink as _shrink
from .statehash import StateCache
from .strategies import DEFAULT_STRATEGY, Divergence
from .token import TokenError, decode

__all__ = ["Finding", "Result", "Scenario", "ScenarioError", "Summary", "TokenError", "Variant",
           "load", "loads"]


def _imports(imports) -> list[str]:
    specs = list(imports or ())
    try:
        usermods.load_all(specs)
    except usermods.ImportFailed as exc:
        raise ScenarioError(str(exc)) from None
    return specs


def load(path: str | os.PathLike, imports=()) -> Scenario:
    """A scenario file, after loading the user modules ``imports`` (paths or module names)."""
    specs = _imports(imports)
    sf = load_scenario(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return Scenario(sf, text, specs)


def loads(text: str, name: str = "<string>", imports=()) -> Scenario:
    """A scenario given as TOML text; ``name`` names it in messages."""
    specs = _imports(imports)
    return Scenario(loads_scenario(text, name), text, specs)


class TimeUp(Exception):
    """The wall-time bound (time_s, --time) ran out."""


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


class Scenario:
    """A loaded scenario file: its variants are run through :meth:`variant`."""

    def __init__(self, sf: ScenarioFile, text: str, imports: list[str]) -> None:
        self.file = sf
        self.text = text
        self.imports = imports
        self.path = sf.path
        self.name = sf.name
        self.expect = sf.expect

    @property
    def variants(self) -> list[str]:
        return self.file.variant_names()

    def variant(self, name: str | None = None, *, faults: dict | None = None,
                overrides=(), kernel: str | None = None, **config) -> Variant:
        """One variant (the file's only one, or ``base``, when ``name`` is None), with config
        keys and faults overridden as ``--set`` would (``overrides`` takes --set's own
        "KEY=VALUE" strings); ``kernel`` starts it from a kernel profile as ``--kernel`` does
        (under [config], the variant and the overrides)."""
        names = self.variants
        if name is None:
            if len(names) > 1:
                raise ScenarioError(f"{self.path}: name a variant (have: {', '.join(names)})")
            name = names[0]
        overrides = ([kernel_override(kernel)] if kernel is not None else []) + list(overrides)
        overrides += [f"{key}={_toml(value)}" for key, value in config.items()]
        overrides += [f"faults.{key}={_toml(value)}" for key, value in (faults or {}).items()]
        chosen = None if name == "base" and not self.file.variants else name
        return Variant(self, chosen, overrides)


@dataclass
class Finding:
    """A bug or hazard one schedule showed."""

    kind: str
    summary: str
    token: str
    step: int
    cpu: int | None
    func: str | None
    _variant: Variant = field(repr=False)
    _report: str | None = field(default=None, repr=False)

    @property
    def report(self) -> str:
        """The text report (the race diagram comes from a logged replay of the schedule)."""
        if self._report is None:
            self._report = self._variant._report_text(self.token)
        return self._report


@dataclass
class Result:
    """One schedule."""

    bug: Finding | None
    hazards: list[Finding]
    steps: int
    stats: dict
    token: str
    seed: int | None
    _variant: Variant = field(repr=False)
    _choices: list[int] = field(repr=False)

    def events(self) -> list[dict]:
        """This schedule's structured event log (replayed with logging on)."""
        return self._variant._engine().replay(self._choices).log


@dataclass
class Entry:
    """One kind in a summary of many schedules."""

    kind: str
    count: int
    first_run: int
    seed: int | None
    token: str
    summary: str


@dataclass
class Summary:
    """Many schedules (stress, explore): one entry per kind, as `stress --json` has them."""

    scenario: str
    variant: str | None
    strategy: str
    runs: int
    steps: int
    elapsed_s: float
    bugs: list[Entry]
    hazards: list[Entry]
    complete: bool | None = None  # explore: every schedule within the bound was run
    interrupted: bool = False  # Ctrl-C: what finished is counted
    cut_short: bool = False  # time= ran out: runs is a prefix of the run indices
    pruned: int = 0  # explore: schedules cut short at states already explored
    reduced: int = 0  # explore: branches left out as equivalent (partial-order reduction)
    tally: Tally | None = field(default=None, repr=False)  # per kind, the first RunResult
    # The conflicting cross-CPU pairs seen ({"pairs", "both_orders", "one_order"}:
    # ptsim/coverage.py), or None when not measured (stress without coverage=True, or spread
    # over processes).
    coverage: dict | None = None
    kernel: str | None = None  # the kernel profile the variant started from
    counterfactual: list[str] = field(default_factory=list)  # why no released kernel has it

    def as_json(self) -> dict:
        """`stress --json`'s object (`explore --json`'s adds complete), elapsed_s included."""
        doc = {"scenario": self.scenario, "variant": self.variant, "strategy": self.strategy,
               "runs": self.runs, "steps": self.steps, "elapsed_s": self.elapsed_s,
               "bugs": [vars(e) for e in self.bugs], "hazards": [vars(e) for e in self.hazards]}
        if self.complete is not None:
            doc["complete"] = self.complete
            doc["pruned"] = self.pruned
            doc["reduced"] = self.reduced
        if self.cut_short:
            doc["cut_short"] = True
        if self.coverage is not None:
            doc["coverage"] = self.coverage
        if self.kernel is not None:
            doc["kernel"] = self.kernel
        if self.counterfactual:
            doc["counterfactual"] = self.counterfactual
        return doc


class Variant:
    """A scenario under one variant and overrides: what a schedule runs."""

    def __init__(self, scenario: Scenario, name: str | None, overrides: list[str]) -> None:
        self.scenario = scenario
        self.name = name
        self.overrides = overrides
        self.resolved = scenario.file.resolve(name, overrides)  # checks name and overrides
        self._built: Engine | None = None

    def _engine(self) -> Engine:
        if self._built is None:
            try:
                self._built = Engine(self.resolved)
            except NotModelled as exc:
                raise ScenarioError(f"{self.scenario.path}: not modelled yet: {exc}") from None
        return self._built

    @property
    def expect(self) -> tuple[str, ...]:
        return self.resolved.expect_kinds

    @property
    def kernel(self) -> str | None:
        """The kernel profile this variant starts from (None: the registry defaults)."""
        return self.resolved.kernel

    @property
    def counterfactual(self) -> list[str]:
        """Why no released kernel has this variant's configuration ([] if one has)."""
        return self.resolved.counterfactual

    def replay_command(self, token: str) -> str:
        return replay_command(self.scenario.path, token, self.scenario.imports)

    # -- results ----------------------------------------------------------------------------
    def _finding(self, f, token: str, report: str | None = None) -> Finding:
        return Finding(f.kind, f.summary, token, f.step, f.cpu, f.func, self, report)

    def _result(self, r: RunResult) -> Result:
        engine = self._engine()
        token = engine.token(r.choices)
        report = None
        if r.bug is not None and r.log is not None:
            report = self._render(r)
        return Result(self._finding(r.bug, token, report) if r.bug else None,
                      [self._finding(h, token) for h in r.hazards], r.steps, r.stats, token,
                      r.seed, self, list(r.choices))

    def _render(self, r: RunResult) -> str:
        reporter, buf = Reporter.to_text(self.scenario.imports)
        reporter.report(self._engine(), self.scenario.path, r)
        return buf.getvalue()

    def _report_text(self, token: str) -> str:
        r = self._engine().replay(list(self._choices_of(token)))
        if r.bug is None:
            return ""
        return self._render(r)

    def _summary(self, tally: Tally, strategy: str, elapsed: float, complete=None,
                 interrupted=False, pruned=0, reduced=0) -> Summary:
        doc = tally.as_json(self.scenario.path, self.name, strategy, elapsed)
        return Summary(doc["scenario"], doc["variant"], doc["strategy"], doc["runs"],
                       doc["steps"], doc["elapsed_s"], [Entry(**e) for e in doc["bugs"]],
                       [Entry(**e) for e in doc["hazards"]], complete=complete,
                       interrupted=interrupted, pruned=pruned, reduced=reduced, tally=tally,
                       kernel=self.kernel, counterfactual=self.counterfactual)

    # -- running ----------------------------------------------------------------------------
    def run(self, seed: int = 0, strategy: str = DEFAULT_STRATEGY, depth: int = 3) -> Result:
        """One schedule."""
        return self._result(self._engine().run_seed(seed, strategy, depth))

    def stress(self, runs: int, seed: int = 0, strategy: str = DEFAULT_STRATEGY, depth: int = 3,
               jobs: int = 1, dask: str | None = None, stop_on_first: bool = False,
               on_result=None, time_s: float | None = None, coverage: bool = False) -> Summary:
        """Runs seed .. seed + runs - 1 (in ``jobs`` local processes, or on the Dask cluster
        at ``dask``); the result is the same however they were spread. ``on_result(result)``
        sees each schedule in run order (the CLI's progress bar and --out). ``time_s`` bounds
        the wall time: the summary then says ``cut_short`` and counts a prefix of the runs
        (the one result that depends on the machine's speed). With ``coverage`` the summary
        says how many of the scenario's conflicting cross-CPU pairs the schedules exercised in
        both orders (it costs time; not measured when ``jobs`` > 1 or on Dask: then
        ``coverage`` stays None)."""
        engine = self._engine()
        tally = Tally()
        tracker = None
        start = time.perf_counter()
        deadline = None if time_s is None else start + time_s

        def record(result: RunResult) -> None:
            # A schedule is in the tally and in the caller's record (stress --out), or in
            # neither: a Ctrl-C between the two would make them disagree.
            with sigint_deferred():
                tally.add(result.seed - seed, result, engine)
                if on_result is not None:
                    on_result(result, tally)
            if deadline is not None and time.perf_counter() >= deadline:
                raise TimeUp()

        interrupted = cut_short = False
        pool = None
        try:
            pool = parallel.open_pool(jobs, dask)
            if pool is None and coverage:
                tracker = _coverage.CoverageTracker(_coverage.profile_pairs(engine))
                _coverage.run_seeds_covered(engine, range(seed, seed + runs), strategy, depth,
                                            record, tracker, stop_on_first)
            elif pool is None:
                engine.run_seeds(range(seed, seed + runs), strategy, depth, record,
                                 stop_on_first=stop_on_first)
            else:
                job = parallel.Job.of(engine, self.scenario.text, strategy, depth, seed)
                parallel.run_batch(pool, job, runs, record, stop_on_first)
        except TimeUp:
            cut_short = True
        except KeyboardInterrupt:
            if on_result is None:
                raise
            interrupted = True  # the CLI reports what finished
        finally:
            if pool is not None:
                pool.close()
        summary = self._summary(tally, strategy, round(time.perf_counter() - start, 3),
                                interrupted=interrupted)
        summary.cut_short = cut_short
        summary.coverage = tracker.figure() if tracker is not None else None
        return summary

    def explore(self, preemptions: int = 2, max_schedules: int | None = None,
                state_cache: bool = True, faults: int = 2, reduction: bool = True,
                coverage: bool = True) -> Summary:
        """Every schedule with at most ``preemptions`` preemptions and ``faults`` injected
        faults firing (depth first); with ``reduction``, one order of independent steps. With
        ``coverage``, the summary says how many of the scenario's conflicting cross-CPU pairs
        the schedules explored exercised in both orders."""
        engine = self._engine()
        tally = Tally()
        start = time.perf_counter()
        searched, on_end, tracker = _coverage.explore_coverage(engine, coverage)
        cache = StateCache(preemptions) if state_cache else None
        found = _explore(searched, preemptions, max_schedules,
                         lambda index, result: tally.add(index, result, engine),
                         cache, faults, reduction, on_end)
        summary = self._summary(tally, "explore", round(time.perf_counter() - start, 3),
                                complete=found.complete, pruned=found.pruned,
                                reduced=found.reduced)
        summary.coverage = tracker.figure() if tracker is not None else None
        return summary

    def _choices_of(self, token: str) -> tuple[int, ...]:
        t = decode(token)
        why = token_mismatch(t)
        if why is None and (t.variant, list(t.overrides)) != (self.name, self.overrides):
            why = (f"made for variant {t.variant!r} with overrides {list(t.overrides)!r}, not "
                   f"{self.name!r} with {self.overrides!r}")
        why = why or token_mismatch(t, self._engine().digest)
        if why:
            raise TokenError(why.replace("--import", "imports=[...]"))
        return t.choices

    def replay(self, token: str) -> Result:
        """Exactly the schedule ``token`` names (raises TokenError if it does not fit)."""
        try:
            return self._result(self._engine().replay(list(self._choices_of(token))))
        except Divergence as exc:
            raise TokenError(f"the token diverges: {exc}") from None

    def shrink(self, token: str) -> Result:
        """A shorter schedule showing the same kind as ``token``'s."""
        try:
            shrunk = _shrink(self._engine(), list(self._choices_of(token)))
        except Divergence as exc:
            raise TokenError(f"the token diverges: {exc}") from None
        except ValueError as exc:
            raise TokenError(f"nothing to shrink: {exc}") from None
        return self._result(self._engine().replay(shrunk.after.result.choices))
