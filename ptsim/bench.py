"""``ptsim bench``: what a simulated step costs, against what trio's own task hand-off costs.

Three figures, all measured in this process (the call takes several seconds by default):

``step_us``
    Microseconds per simulated step: schedules of two catalogue scenarios (D1's ``semi-rcu``
    variant and D10's first variant) run by the engine under the ``random`` strategy, timed with
    ``time.perf_counter`` and divided by the steps they took (``RunResult.steps``). A step is
    everything the simulator does per memory access: the choice (the option list, the
    strategy), the trio hand-off when another CPU is chosen, and the kernel model's own work.
    Not every step hands off: the same CPU may be chosen again, and a CPU running alone steps
    on without asking anyone (Sched.point's lean path).

``handoff_us``
    Microseconds per bare trio hand-off: three trio tasks parked in
    ``trio.lowlevel.wait_task_rescheduled``; the running one picks another with a seeded
    ``random.Random.randrange``, reschedules it and parks itself. This is the floor of any
    simulator built as ptsim is (one trio task per CPU, exactly one runnable): trio's run
    loop plus one seeded choice, and nothing else.

``ratio`` = ``step_us / handoff_us``
    What one simulated step costs in bare hand-offs: the engine's overhead over trio's own
    hand-off. A ratio near 1 would say that trio's switch is the whole cost of a step and
    that only a cheaper switch (another runtime) could make ptsim faster. The larger it is,
    the more of a step is ptsim's own Python (choosing, bookkeeping, the kernel model), and
    the less a faster switch could ever win: at most about one hand-off per step, i.e. a
    fraction ``1 / ratio`` of the step. Both times scale with the machine's speed; their
    quotient much less so.

``schedule_us``
    Microseconds per schedule of each catalogue scenario file (``scenarios/d*.toml``), under
    its first variant and its ``[expect]`` strategy and depth: what ``ptsim stress`` pays per
    run, the median over ``rounds`` rounds of the same seeds (every file once per round).
    Schedules that find a bug stop there, so a buggy variant's figure includes short runs.

Everything but the times is deterministic: fixed seeds (schedules use seeds ``0..N-1``, the
hand-off loop ``random.Random(0)``). Engines are built, PCT calibrated and each scenario run once
before its clock starts. ``step_us``, ``handoff_us`` and each ``schedule_us`` are the median
over ``rounds`` rounds (the same seeds every round), each round measuring all of them in turn,
so that a burst of load from another process moves no figure much and a schedule and a step
are set against a hand-off timed on the same machine; ``ratio`` is their quotient.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import trio

from .engine import Engine
from .scenario import load_scenario

# The scenarios step_us is measured on: (catalogue file name, variant; None = its first).
STEP_SCENARIOS: tuple[tuple[str, str | None], ...] = (
    ("d01_semi_rcu_single_free.toml", "semi-rcu"),
    ("d10_gup_fast_vs_page_free.toml", None),
)
STEP_STRATEGY = "random"
HANDOFF_TASKS = 3
HANDOFF_SEED = 0
WARMUP_SCHEDULES = 3


def catalogue_dir():
    """The scenario catalogue: ``scenarios/`` beside the package in a source tree, else the
    installed ``ptsim.scenarios`` (a Path or an importlib.resources Traversable)."""
    here = Path(__file__).resolve().parent.parent / "scenarios"
    if here.is_dir() and any(here.glob("d*.toml")):
        return here
    return resources.files("ptsim.scenarios")


def catalogue() -> list[str]:
    """Every catalogue scenario file (``d*.toml``), in name order."""
    root = catalogue_dir()
    files = [p for p in root.iterdir() if p.name.startswith("d") and p.name.endswith(".toml")]
    return [str(p) for p in sorted(files, key=lambda p: p.name)]


def _first_variant(sf) -> str | None:
    return sf.variants[0].name if sf.variants else None


def _timed_run(engine: Engine, seeds: range, strategy: str, depth: int = 3) -> tuple[float, int]:
    """Seconds and total steps of ``seeds`` run in one batch."""
    gc.collect()
    start = time.perf_counter()
    results = engine.run_seeds(seeds, strategy, depth)
    seconds = time.perf_counter() - start
    return seconds, sum(r.steps for r in results)


def _ready(path: str, variant: str | None, strategy: str, depth: int = 3) -> Engine:
    """An engine with its strategy prepared (PCT calibrates here) and a few schedules run, so
    that the clock sees neither."""
    engine = Engine(load_scenario(path).resolve(variant))
    engine.strategy(strategy, 0, depth)
    engine.run_seeds(range(WARMUP_SCHEDULES), strategy, depth)
    return engine


def _abort(_raise_cancel):
    return trio.lowlevel.Abort.SUCCEEDED


def handoff_seconds(handoffs: int, tasks: int = HANDOFF_TASKS, seed: int = HANDOFF_SEED) -> float:
    """Seconds for ``handoffs`` bare trio hand-offs among ``tasks`` parked tasks, each to a
    task chosen by ``random.Random(seed)`` among the others (the clock runs inside the trio
    run: its start-up and shutdown are not counted)."""
    if tasks < 2:
        raise ValueError("a hand-off needs at least two tasks")
    rng = random.Random(seed)
    parked: list = []
    state = {"left": handoffs, "start": 0.0, "end": 0.0, "stop": False}

    async def worker(me: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        parked.append(trio.lowlevel.current_task())
        task_status.started()
        await trio.lowlevel.wait_task_rescheduled(_abort)
        if not state["start"]:
            state["start"] = time.perf_counter()
        while not state["stop"]:
            if not state["left"]:
                state["end"] = time.perf_counter()
                state["stop"] = True
                for i, task in enumerate(parked):  # wake the others: they see stop and return
                    if i != me:
                        trio.lowlevel.reschedule(task)
                return
            state["left"] -= 1
            nxt = rng.randrange(tasks - 1)
            if nxt >= me:
                nxt += 1
            trio.lowlevel.reschedule(parked[nxt])
            await trio.lowlevel.wait_task_rescheduled(_abort)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                await nursery.start(worker, i)
            trio.lowlevel.reschedule(parked[0])

    gc.collect()
    trio.run(main)
    return state["end"] - state["start"]


def bench(scenarios: Iterable[str | os.PathLike] | None = None, schedules: int = 200,
          handoffs: int = 20000, *, rounds: int = 5) -> dict:
    """Measure ``step_us``, ``handoff_us``, their ``ratio`` and ``schedule_us`` (see the
    module's docstring).

    ``scenarios``: the files ``schedule_us`` covers (default: the whole catalogue, d*.toml),
    keyed by file name. ``schedules``: schedules per file for ``schedule_us``, and per step
    scenario per round for ``step_us``. ``handoffs``: hand-offs per round for ``handoff_us``.
    ``rounds``: the rounds ``step_us``, ``handoff_us`` and ``schedule_us`` are the medians
    of."""
    if schedules < 1 or handoffs < 1 or rounds < 1:
        raise ValueError("schedules, handoffs and rounds must be at least 1")
    paths = catalogue() if scenarios is None else [str(p) for p in scenarios]
    names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two scenario files share a name: {', '.join(names)}")

    root = catalogue_dir()
    step_engines = [_ready(str(root / name), variant, STEP_STRATEGY)
                    for name, variant in STEP_SCENARIOS]
    runs = []  # (name, engine, strategy, depth)
    for path, name in zip(paths, names):
        sf = load_scenario(path)
        strategy, depth = sf.expect.strategy, sf.expect.depth
        runs.append((name, _ready(path, _first_variant(sf), strategy, depth), strategy, depth))
    handoff_seconds(min(handoffs, 1000))  # warm up trio itself
    seeds = range(schedules)
    step_rounds, handoff_rounds = [], []
    schedule_rounds: dict[str, list[float]] = {name: [] for name in names}
    # Each round measures everything once, the hand-off between the steps and the schedules:
    # on a shared VM the cost of trio's hand-off (a syscall per trip through its run loop)
    # drifts by half between minutes, and a schedule divided by a hand-off timed minutes apart
    # moved with it.
    for _ in range(rounds):
        seconds = steps = 0
        for engine in step_engines:
            s, n = _timed_run(engine, seeds, STEP_STRATEGY)
            seconds += s
            steps += n
        step_rounds.append(seconds / steps * 1e6)
        handoff_rounds.append(handoff_seconds(handoffs) / handoffs * 1e6)
        for name, engine, strategy, depth in runs:  # every file once per round
            seconds, _ = _timed_run(engine, seeds, strategy, depth)
            schedule_rounds[name].append(seconds / schedules * 1e6)
    step_us = float(statistics.median(step_rounds))
    handoff_us = float(statistics.median(handoff_rounds))
    schedule_us = {name: float(statistics.median(us)) for name, us in schedule_rounds.items()}

    return {"step_us": step_us, "handoff_us": handoff_us, "ratio": step_us / handoff_us,
            "schedule_us": schedule_us}


def render(result: dict) -> str:
    """The text output of ``ptsim bench``."""
    step_on = ", ".join(f"{name.split('_', 1)[0]} {variant or 'first variant'}"
                        for name, variant in STEP_SCENARIOS)
    lines = [
        f"step      {result['step_us']:9.2f} us   one simulated step ({step_on}; "
        f"{STEP_STRATEGY} strategy)",
        f"hand-off  {result['handoff_us']:9.2f} us   one bare trio hand-off among "
        f"{HANDOFF_TASKS} parked tasks, seeded choice",
        f"ratio     {result['ratio']:9.2f}      a step costs {result['ratio']:.2f} bare "
        "hand-offs: the engine's overhead over trio's switch",
    ]
    if result["schedule_us"]:
        lines.append("per schedule (first variant, [expect] strategy):")
        width = max(len(name) for name in result["schedule_us"])
        lines += [f"  {name:<{width}}  {us:10.1f} us"
                  for name, us in result["schedule_us"].items()]
    return "\n".join(lines)
