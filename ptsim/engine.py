"""The engine: runs schedules of one resolved scenario.

It ties the pieces together: the workload (the post-setup machine and the agents, build.py),
the scheduler (sched.py), the strategies (registered in ptsim.strategies) and tokens. Every
schedule starts from the same post-setup state and nothing carries over between schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptsim.kernel_model import MODEL_VERSION
from ptsim.kernel_model.errors import BugFound, Finding
from ptsim.kernel_model.machine import unwind_root

from . import usermods
from .build import Workload
from .replace import Patch, nothing
from .scenario import Scenario
from .sched import ParkingSched, Sched, trio_run
from .strategies import STRATEGIES, Divergence, Strategy
from .strategies.replay import ReplayStrategy
from .token import Token

# The unwinder (Cpu.func) stops at the frame each CPU's agents are called from: the scheduler's.
unwind_root(Sched.cpu_main.__code__)


def token_mismatch(token: Token, digest: str | None = None) -> str | None:
    """Why ``token`` cannot replay here, or None: another model version, a user module missing
    or changed since, or (given this scenario's ``digest``) another scenario."""
    if token.model != MODEL_VERSION:
        return (f"made by model version {token.model}, this ptsim runs model version "
                f"{MODEL_VERSION}; replay it with the ptsim that made it")
    why = usermods.check_token_modules(token.modules)
    if why:
        return why
    if digest is not None and token.digest != digest:
        return f"made for another scenario (digest {token.digest}, this one gives {digest})"
    return None


def _forgets(strategy) -> bool:
    """Whether ``strategy`` keeps nothing of its schedule once it is over: its class says so
    (``forgets_schedule = True``: no option, scheduler or machine kept; random and pct do) and
    it does not look at its scheduler (``attach``). Then run_seeds, which made the strategy
    and hands out only the RunResult, may take the machine apart (Machine.release)."""
    return (getattr(strategy, "forgets_schedule", False)
            and type(strategy).attach is Strategy.attach)


@dataclass
class RunResult:
    seed: int | None
    bug: Finding | None
    hazards: list[Finding]
    steps: int
    choices: list[int]
    stats: dict
    log: list[dict] | None = None
    leftover: int = 0  # a replay's choices that the schedule did not use


class Engine:
    """Runs schedules of one resolved scenario."""

    __state_ref_always__ = True  # no state of a schedule: explore's state cache names it

    def __state_ref__(self):
        return "Engine"

    def __init__(self, scn: Scenario, fast_path: bool = True) -> None:
        self.scn = scn
        # Sched's lean single-CPU path; False forces every step through Sched.choose (the
        # results are the same either way: tests/test_engine_speed_paths.py).
        self.fast_path = fast_path
        self.digest = scn.digest()
        self.modules = scn.user_modules()
        # A variant's replacements are installed only while this engine builds its machine or
        # runs a schedule; without any, nothing is installed and nothing costs anything (not
        # even entering a context manager per schedule: self.patched is False).
        self.patched = bool(scn.replace)
        self.installed = Patch(scn.replace).installed if scn.replace else nothing
        with self.installed():
            self.workload = Workload(scn)
        self.option_keys = self.workload.option_keys
        self._factories: dict[tuple[str, int], object] = {}

    def fresh(self):
        return self.workload.fresh()

    def token(self, choices: list[int]) -> str:
        return Token(self.digest, MODEL_VERSION, self.scn.variant, tuple(self.scn.overrides),
                     tuple(choices), self.modules).encode()

    def _factory(self, name: str, depth: int):
        """A registered strategy, prepared for this scenario once (PCT calibrates here)."""
        factory = self._factories.get((name, depth))
        if factory is None:
            entry = STRATEGIES.get(name)
            if entry is None:
                raise ValueError(f"unknown strategy {name!r} (registered: "
                                 f"{', '.join(STRATEGIES)})")
            factory = self._factories[(name, depth)] = entry.cls.prepare(self, depth)
        return factory

    def strategy(self, name: str, seed: int, depth: int = 3):
        """A registered strategy's instance for one schedule."""
        return self._factory(name, depth)(seed)

    async def run_schedule(self, strategy, seed: int | None = None,
                           log: bool = False) -> RunResult:
        """One schedule under ``strategy``, inside the caller's trio run. Raises what ends a
        schedule without a finding (Divergence, NotModelled, explore's Pruned)."""
        return await self._schedule(strategy, seed, log, False)

    async def _schedule(self, strategy, seed: int | None, log: bool,
                        release: bool) -> RunResult:
        """run_schedule; with ``release`` the machine is taken apart once the result is made
        (Machine.release), for a caller that knows no one else can reach it (run_seeds)."""
        if self.patched:
            with self.installed():
                m, sched, bug = await self._run(strategy, log)
        else:
            m, sched, bug = await self._run(strategy, log)
        if m.log is not None:
            finding = bug if bug is not None else (m.hazards[0] if m.hazards else None)
            if finding is not None:
                m.log.append(self.finding_event(finding, sched.choices, bug is not None))
        leftover = strategy.leftover() if isinstance(strategy, ReplayStrategy) else 0
        result = RunResult(seed=seed, bug=bug, hazards=list(m.hazards),
                           steps=min(m.step, m.max_steps), choices=sched.choices,
                           stats=m.stats(), log=m.log, leftover=leftover)
        if release:
            m.release()
        return result

    async def _run(self, strategy, log: bool):
        m = self.workload.fresh()
        sched_class = ParkingSched if strategy.parks else Sched
        sched = sched_class(m, strategy, self.workload.calls(m), fast=self.fast_path)
        m.attach_runtime(sched)
        if log:
            m.log = []
        await sched.run()
        if sched.abort is not None:
            raise sched.abort
        bug = sched.bug
        if bug is None:
            try:
                m.end_of_run()
            except BugFound as found:
                bug = found.finding
        return m, sched, bug

    def finding_event(self, finding: Finding, choices: list[int], is_bug: bool) -> dict:
        """The last event of every log: the bug (or a hazard-only schedule's first hazard),
        with what a reader needs to find it again, its token included."""
        return {"step": finding.step, "cpu": finding.cpu, "func": finding.func or "-",
                "event": "bug" if is_bug else "hazard", "kind": finding.kind,
                "summary": finding.summary, "object": finding.obj, "access": finding.access,
                "token": self.token(choices), "stack": list(reversed(finding.backtrace))}

    def run_schedule_sync(self, strategy, seed: int | None = None,
                          log: bool = False) -> RunResult:
        """run_schedule in a trio run of its own."""
        return trio_run(self.run_schedule, strategy, seed, log)

    def run_seeds(self, seeds, strategy: str = "random", depth: int = 3, on_result=None,
                  stop_on_first: bool = False) -> list[RunResult]:
        """Many schedules inside one trio.run (cheaper than one trio.run each). With on_result
        each result goes there and is not kept: a long stress holds no memory per schedule."""
        factory = self._factory(strategy, depth)  # PCT calibrates outside the batch's run

        async def batch():
            results = []
            for seed in seeds:
                chosen = factory(seed)
                result = await self._schedule(chosen, seed, False, _forgets(chosen))
                if on_result is not None:
                    on_result(result)
                else:
                    results.append(result)
                if stop_on_first and result.bug is not None:
                    break
            return results

        return trio_run(batch)

    def run_seed(self, seed: int, strategy: str = "random", depth: int = 3,
                 log: bool = False) -> RunResult:
        return self.run_schedule_sync(self.strategy(strategy, seed, depth), seed, log)

    def replay(self, choices: list[int], log: bool = True) -> RunResult:
        """Re-run exactly the schedule the choices name. Raises Divergence if they do not fit."""
        result = self.run_schedule_sync(ReplayStrategy(list(choices)), None, log)
        if result.leftover:
            raise Divergence(f"the run ended at step {result.steps} with {result.leftover} "
                             "of the token's choices unused")
        return result
