"""Assertions for tests written in Python (pytest or not): they fail with ptsim's report.

    import ptsim, ptsim.testing
    v = ptsim.load("scenarios/d10_gup_fast_vs_page_free.toml").variant("page-ipi")
    ptsim.testing.assert_clean(v, runs=300, strategy="pct")
    ptsim.testing.assert_finds(ptsim.load(...).variant("page-broadcast"), "pt-use-after-free")
"""

from __future__ import annotations

from .api import Summary, Variant


class PtsimFailure(AssertionError):
    """A variant did not meet an expectation; the message is ptsim's report."""


def _budget(variant: Variant, runs: int | None, strategy: str | None) -> tuple[int, str, int]:
    expect = variant.scenario.expect
    return (runs or expect.runs, strategy or expect.strategy, expect.depth)


def _found(variant: Variant, summary: Summary, kind: str) -> str:
    """The report of the first schedule that showed ``kind``, with its token and replay."""
    entry = next(e for e in (*summary.bugs, *summary.hazards) if e.kind == kind)
    result = variant.replay(entry.token)
    report = result.bug.report if result.bug is not None and result.bug.kind == kind else (
        f"{entry.kind}: {entry.summary}\n")
    return (f"{report.rstrip()}\n\nfirst run {entry.first_run} (seed {entry.seed}) of "
            f"{summary.runs}, {entry.count} schedule(s) in all\n"
            f"token: {entry.token}\nreplay: {variant.replay_command(entry.token)}\n")


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
    expect = variant.expect
    if not expect:
        return assert_clean(variant, runs)
    runs, strategy, depth = _budget(variant, runs, None)
    summary = variant.stress(runs, 0, strategy, depth)
    kinds = {e.kind for e in (*summary.bugs, *summary.hazards)}
    missing = [k for k in expect if k not in kinds]
    if missing:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name}]: expected "
                           f"{', '.join(missing)}, not found in {runs} {strategy} schedules; "
                           "a stronger search: more runs (--ptsim-runs), strategy pct, or "
                           "ptsim explore")
    unexpected = [e.kind for e in summary.bugs if e.kind not in expect]
    if unexpected:
        raise PtsimFailure(f"{variant.scenario.path} [{variant.name}]: unexpected "
                           f"{', '.join(unexpected)}\n\n" + _found(variant, summary, unexpected[0]))
    return summary
