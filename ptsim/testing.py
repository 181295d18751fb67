"""Assertions for tests written in Python (pytest or not): they fail with ptsim's report.

    import ptsim, ptsim.testing
    v = ptsim.load("scenarios/d10_gup_fast_vs_page_free.toml").variant("page-ipi")
    ptsim.testing.assert_clean(v, runs=300, strategy="pct")
    ptsim.testing.assert_finds(ptsim.load(...).variant("page-broadcast"), "pt-use-after-free")
"""

from __future__ import annotations

from .api import Summary, Variant
from .reporter import Reporter
from .results import verdict
from .shrink import DEFAULT_BUDGET


class PtsimFailure(AssertionError):
    """A variant did not meet an expectation; the message is ptsim's report."""


def _budget(variant: Variant, runs: int | None, strategy: str | None) -> tuple[int, str, int]:
    expect = variant.scenario.expect
    return (runs or expect.runs, strategy or expect.strategy, expect.depth)


def _found(variant: Variant, summary: Summary, kind: str) -> str:
    """The report of the first schedule that showed ``kind`` (shrunk first, when it is a bug,
    as run and stress do), with its tokens and replay commands: the CLI's own reporter."""
    engine, tally = variant._engine(), summary.tally
    tally.shrink(engine, DEFAULT_BUDGET)
    first = tally.first[kind]
    reporter, buf = Reporter.to_text(variant.scenario.imports)
    entry = next(e for e in (*summary.bugs, *summary.hazards) if e.kind == kind)
    if first.bug is not None and first.bug.kind == kind:
        reporter.report(engine, variant.scenario.path, engine.replay(first.choices),
                        tally.shrunk.get(kind))
    else:
        buf.write(f"{entry.kind}: {entry.summary}\ntoken: {entry.token}\n"
                  f"replay: {variant.replay_command(entry.token)}\n")
    return (f"{buf.getvalue().rstrip()}\n\nfirst run {entry.first_run} (seed {entry.seed}) of "
            f"{summary.runs}, {entry.count} schedule(s) in all\n")


def assert_clean(variant: Variant, runs: int | None = None, strategy: str | None = None,
                 seed: int = 0) -> Summary:
    """No bug in ``runs`` schedules (default: the file's [expect] budget)."""
    runs, strategy, depth = _budget(variant, runs, strategy)
    summary = variant.stress(runs, seed, strategy, depth)
    if summary.bugs:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name or 'base'}]: expected no "
                           f"bug, found {', '.join(e.kind for e in summary.bugs)}\n\n"
                           + _found(variant, summary, summary.bugs[0].kind))
    return summary


def assert_finds(variant: Variant, kind: str, runs: int | None = None,
                 strategy: str | None = None, seed: int = 0) -> Summary:
    """``kind`` (a bug or hazard) shows within ``runs`` schedules, and no other bug does."""
    runs, strategy, depth = _budget(variant, runs, strategy)
    summary = variant.stress(runs, seed, strategy, depth)
    kinds = {e.kind for e in (*summary.bugs, *summary.hazards)}
    if kind not in kinds:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name or 'base'}]: {kind} not "
                           f"found in {runs} {strategy} schedules (seeds {seed}..{seed + runs - 1})"
                           "; a stronger search: more runs, strategy pct, or ptsim explore")
    others = [e.kind for e in summary.bugs if e.kind != kind]
    if others:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name or 'base'}]: found "
                           f"{', '.join(others)} besides {kind}\n\n"
                           + _found(variant, summary, others[0]))
    return summary


def check_expectation(variant: Variant, runs: int | None = None) -> Summary:
    """The variant's own expectation (its ``expect`` list), as `ptsim check` judges it."""
    if not variant.expect:
        return assert_clean(variant, runs)
    runs, strategy, depth = _budget(variant, runs, None)
    summary = variant.stress(runs, 0, strategy, depth)
    judged = verdict(variant.scenario.path, variant.name, variant._engine(), summary.tally, runs,
                     strategy)
    if judged.missing:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name}]: expected "
                           f"{', '.join(judged.missing)}, not found in {runs} {strategy} "
                           "schedules; a stronger search: more runs (--ptsim-runs), strategy pct, "
                           "or ptsim explore")
    if judged.unexpected:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name}]: unexpected "
                           f"{', '.join(judged.unexpected)}\n\n"
                           + _found(variant, summary, judged.unexpected[0]))
    return summary
