"""What many schedules add up to: findings per kind (SPEC's --json shape) and check's verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import Engine, RunResult


@dataclass
class Tally:
    """Results of many schedules, grouped per kind as SPEC's JSON has them."""

    runs: int = 0
    steps: int = 0
    bugs: dict = field(default_factory=dict)
    hazards: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)  # kind -> RunResult of its first schedule
    shrunk: dict = field(default_factory=dict)  # kind -> Shrunk of its first schedule

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

    def shrink(self, engine: Engine, budget: int) -> None:
        """Shrink the first schedule of each bug kind, within ``budget`` schedules each."""
        from .shrink import shrink

        for kind, entry in self.bugs.items():
            if kind not in self.shrunk:
                done = self.shrunk[kind] = shrink(engine, self.first[kind].choices,
                                                  budget=budget)
                entry["shrunk"] = {"token": engine.token(done.after.result.choices),
                                   "steps": done.after.result.steps,
                                   "preemptions": done.after.preemptions}

    def as_json(self, path: str, variant: str | None, strategy: str, elapsed: float) -> dict:
        return {"scenario": path, "variant": variant, "strategy": strategy, "runs": self.runs,
                "steps": self.steps, "elapsed_s": round(elapsed, 3),
                "bugs": sorted(self.bugs.values(), key=lambda b: (b["first_run"], b["kind"])),
                "hazards": sorted(self.hazards.values(), key=lambda b: (b["first_run"], b["kind"]))}


def run_record(result: RunResult, base: int, engine: Engine) -> dict:
    """One schedule as a line of stress --out FILE.jsonl."""
    found = result.bug is not None or bool(result.hazards)
    return {"run": result.seed - base, "seed": result.seed, "steps": result.steps,
            "bugs": [result.bug.kind] if result.bug else [],
            "hazards": [h.kind for h in result.hazards],
            "token": engine.token(result.choices) if found else None}


@dataclass
class Verdict:
    """One variant checked against its expectation."""

    scenario: str  # as shown
    variant: str
    expect: tuple[str, ...]
    found: list[str]
    missing: list[str]
    unexpected: list[str]
    runs: int
    strategy: str
    first_bug: int | None

    @property
    def holds(self) -> bool:
        return not self.missing and not self.unexpected


def verdict(shown: str, variant: str, engine: Engine, tally: Tally, runs: int,
            strategy: str) -> Verdict:
    """A variant holds when every expected kind showed (bug or hazard) and no other bug did."""
    expect = engine.scn.expect_kinds
    found = sorted(set(tally.bugs) | set(tally.hazards))
    unexpected = [k for k in tally.bugs if k not in expect]
    missing = [k for k in expect if k not in tally.bugs and k not in tally.hazards]
    firsts = [entry["first_run"] for kind, entry in (*tally.bugs.items(), *tally.hazards.items())
              if kind in expect or kind in tally.bugs]
    return Verdict(shown, variant, tuple(expect), found, missing, unexpected, runs, strategy,
                   min(firsts) if firsts else None)
