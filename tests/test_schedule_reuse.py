"""The CPU tasks of a trio run are reused, schedule after schedule (sched.CpuPool).

A schedule run on the pool of a batch (Engine.run_seeds, explore: trio_run) must give exactly
what it gives on fresh tasks (a schedule outside trio_run makes its own pool), bugs, hazards,
logs and explore's state cache included; a schedule that ends while CPUs are parked inside
their agents unwinds them before the next one starts; Ctrl-C and the exceptions of the code
that runs the schedules still come out as they did.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import trio

from ptsim.engine import Engine, _forgets
from ptsim.explore import search
from ptsim.scenario import load_scenario
from ptsim.sched import _POOL, Sched, trio_run
from ptsim.statehash import StateCache
from ptsim.strategies.pct import PctStrategy
from ptsim.strategies.random import RandomStrategy
from ptsim.strategies.replay import ReplayStrategy

from conftest import D1, SCENARIOS, bare_machine, run_threads

CASES = [
    (D1, "semi-rcu", "pct"),  # a bug in some schedules: CPUs parked mid-agent are unwound
    (D1, "full-rcu", "random"),
    (str(SCENARIOS / "d04_retract_vs_reclaim.toml"), "no-recheck", "pct"),
    (str(SCENARIOS / "d09_mixed_tlb_sizes_after_reclaim.toml"), "no-flush-before-set-pmd",
     "random"),  # hazards
    (str(SCENARIOS / "d10_gup_fast_vs_page_free.toml"), "page-broadcast", "pct"),
]
SEEDS = range(30)


def _outcome(result) -> tuple:
    bug = result.bug
    return (result.seed, result.steps, tuple(result.choices),
            None if bug is None else (bug.kind, bug.cpu, bug.step, bug.summary, bug.backtrace),
            tuple((h.kind, h.cpu, h.step, h.summary) for h in result.hazards), result.stats)


def _engine(path: str, variant: str) -> Engine:
    return Engine(load_scenario(path).resolve(variant))


def _fresh_tasks(engine: Engine, strategy: str, seeds, log: bool = False) -> list:
    """Each schedule in a plain trio.run: no pool of the run, so Sched.run starts its own
    tasks, as every schedule did before the pool."""
    factory = engine._factory(strategy, 3)
    return [trio.run(engine.run_schedule, factory(seed), seed, log) for seed in seeds]


@pytest.mark.parametrize("path,variant,strategy", CASES)
def test_a_batch_on_the_pool_gives_what_fresh_tasks_give(path, variant, strategy):
    engine = _engine(path, variant)
    pooled = engine.run_seeds(SEEDS, strategy)
    fresh = _fresh_tasks(engine, strategy, SEEDS)
    assert [_outcome(r) for r in pooled] == [_outcome(r) for r in fresh]


@pytest.mark.parametrize("path,variant,strategy", CASES[:3])
def test_logged_runs_and_replays_agree(path, variant, strategy):
    engine = _engine(path, variant)
    fresh = _fresh_tasks(engine, strategy, range(8), log=True)
    for seed, expected in zip(range(8), fresh):
        logged = engine.run_seed(seed, strategy, log=True)
        assert logged.log == expected.log
        assert engine.replay(logged.choices).log == expected.log


def test_the_pool_keeps_one_task_per_cpu_and_ends_each_schedule_with_them_parked():
    engine = _engine(D1, "semi-rcu")
    factory = engine._factory("pct", 3)
    seen = []

    async def batch():
        pool = _POOL.get()
        for seed in range(60):
            result = await engine.run_schedule(factory(seed), seed)
            seen.append((result.bug is not None, tuple(pool.tasks), pool.busy,
                         tuple(pool.jobs)))

    trio_run(batch)
    assert any(bug for bug, *_ in seen) and not all(bug for bug, *_ in seen)
    tasks = {t for _, t, _, _ in seen}
    assert len(tasks) == 1 and len(next(iter(tasks))) == 2  # the same two tasks throughout
    assert all(not busy and jobs == (None, None) for _, _, busy, jobs in seen)


@pytest.mark.parametrize("runner", [trio_run, trio.run], ids=["run's pool", "own pool"])
def test_cpus_parked_inside_their_agents_are_unwound_when_another_ends_the_schedule(runner):
    for seed in range(20):
        m = bare_machine(ncpus=3, max_steps=40)
        unwound = []

        async def spinner(cpu):
            try:
                while True:
                    await m.point(cpu)
            finally:
                unwound.append(cpu.id)

        sched = runner(run_threads, m, {0: spinner, 1: spinner, 2: spinner}, seed)
        assert sched.bug is not None and sched.bug.kind == "livelock"
        # the CPU that went past max_steps, and the two parked inside their loops
        assert sorted(unwound) == [0, 1, 2] and not sched.live


def test_schedules_that_share_a_trio_run_do_not_share_a_pool_at_once():
    """Two schedules at the same time in one trio run: one holds the run's pool, the other
    makes its own; both give what they give alone."""
    engine = _engine(D1, "semi-rcu")
    factory = engine._factory("pct", 3)
    alone = [_outcome(r) for r in engine.run_seeds(range(10), "pct")]
    together = {}

    async def one(seed):
        together[seed] = _outcome(await engine.run_schedule(factory(seed), seed))

    async def both():
        for seed in range(0, 10, 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, seed)
                nursery.start_soon(one, seed + 1)

    trio_run(both)
    assert [together[s] for s in range(10)] == alone


@pytest.mark.parametrize("cache", [False, True])
def test_explore_on_the_pool_is_explore_on_fresh_tasks(cache):
    """explore's parking scheduler (the state cache reads its parked CPUs' frames): the same
    schedules, prunes and results on the run's pool as on a pool per schedule."""
    engine = _engine(D1, "semi-rcu")

    def run(runner):
        results = []
        found = runner(search, engine, 2, 300, lambda i, r: results.append(_outcome(r)),
                       StateCache() if cache else None, 2)
        return (found.schedules, found.pruned, found.steps, found.complete), results

    assert run(trio_run) == run(trio.run)


@pytest.mark.parametrize("at", [1, 7, 30, 61, 150])
def test_ctrl_c_in_a_cpu_task_comes_out_as_keyboard_interrupt(monkeypatch, at):
    """Wherever it lands (the CPU the schedule's own task runs, or a pool task), a Ctrl-C
    leaves run_seeds as a plain KeyboardInterrupt; the next batch runs as usual."""
    engine = _engine(D1, "full-rcu")
    expected = [_outcome(r) for r in engine.run_seeds(range(5), "random")]
    choose = Sched.choose  # (asked at a CPU's steps, in whichever task runs that CPU)
    calls = [0]

    def interrupted(self, cur):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return choose(self, cur)

    monkeypatch.setattr(Sched, "choose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.run_seeds(range(100), "random")
    monkeypatch.setattr(Sched, "choose", choose)
    assert [_outcome(r) for r in engine.run_seeds(range(5), "random")] == expected


def test_exceptions_of_the_batch_come_out_unwrapped():
    engine = _engine(D1, "full-rcu")

    def stop(result):
        raise ValueError(f"stop at seed {result.seed}")

    with pytest.raises(ValueError, match="stop at seed 0"):
        engine.run_seeds(range(5), "random", on_result=stop)

    async def fails():
        raise LookupError("plain")

    with pytest.raises(LookupError, match="plain"):
        trio_run(fails)


def test_a_batch_frees_each_machine_without_the_cyclic_gc(monkeypatch):
    """run_seeds takes apart the machine of a schedule whose strategy forgets it (random and
    pct: Machine.release), so that reference counting frees it when the schedule is over; a
    schedule run_schedule runs keeps its machine whole (explore reads it afterwards)."""
    engine = _engine(D1, "semi-rcu")
    engine.strategy("pct", 0)  # PCT's calibration runs: run_schedule's, before the count
    fresh, made = engine.workload.fresh, []

    def tracked():
        m = fresh()
        made.append(weakref.ref(m))
        return m

    monkeypatch.setattr(engine.workload, "fresh", tracked)
    gc.disable()
    try:
        results = engine.run_seeds(range(20), "pct")
        assert len(made) == 20 and all(ref() is None for ref in made)
        assert any(r.bug is not None for r in results)  # a schedule that ends at a bug too
    finally:
        gc.enable()

    class Watching(RandomStrategy):
        def attach(self, sched) -> None:
            self.sched = sched

    watching = Watching(0)
    trio.run(engine.run_schedule, watching, 0)
    m = watching.sched.m
    assert all(cpu.m is m for cpu in m.cpus) and m.gp_end.m is m
    assert _forgets(RandomStrategy(0)) and _forgets(engine.strategy("pct", 0))
    assert not _forgets(watching) and not _forgets(ReplayStrategy([]))
    assert PctStrategy.forgets_schedule


@pytest.mark.parametrize("keys,k,depth", [([0, 1, 1000, 1001, 2000], 23, 3),
                                          ([0, 1, 2, 1000, 1001, 1002, 2000], 7, 3),
                                          ([0, 1], 1, 3), ([0, 1, 1000], 40, 8),
                                          ([0, 1, 1000, 1001, 2000], 4, 1)])
def test_pct_draws_what_random_shuffle_and_sample_draw(keys, k, depth):
    """PCT writes out Random.shuffle and Random.sample (cheaper): for every seed it must draw
    the priorities and change points they draw, and leave the generator where they leave it
    (its fault decisions come next)."""
    for seed in range(300):
        rng = random.Random(seed)
        order = list(keys)
        rng.shuffle(order)
        points = sorted(rng.sample(range(1, k + 1), min(depth - 1, k)))
        pct = PctStrategy(seed, depth, keys, k)
        assert pct.prio == {key: depth + rank for rank, key in enumerate(order)}
        assert pct.changes[:-1] == list(zip(points, range(depth - 1, 0, -1)))
        assert pct.rng.random() == rng.random()


def test_pct_factory_makes_what_the_constructor_makes():
    """run_seeds's PCT strategies come from the plan laid out once per scenario
    (PctStrategy.prepare), without calling PctStrategy.__init__: the same priorities, change
    points and generator state as the constructor gives, and a subclass with its own __init__
    is constructed as before."""
    engine = _engine(D1, "semi-rcu")
    factory = engine._factory("pct", 3)
    plan = factory.__self__
    for seed in range(50):
        made, built = factory(seed), PctStrategy(seed, 3, engine.option_keys, plan.k)
        assert type(made) is PctStrategy
        assert (made.prio, made.changes, made.next_change, made.steps) == (
            built.prio, built.changes, built.next_change, built.steps)
        assert made.rng.getstate() == built.rng.getstate()

    class Noted(PctStrategy):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.noted = True

    assert Noted.prepare(engine, 3)(0).noted


def test_the_owner_runs_a_cpu_first_chosen_after_its_own_cpu_is_done(monkeypatch):
    """When the CPU the owner runs ends its agents and the CPU chosen next has not started,
    the owner runs that one too (Sched._hand_on) instead of waking its pool task: the same
    schedules, with fewer trips through trio's run loop; and each CPU's agents still run on
    one task from start to end, and every pool task ends the schedule parked."""
    import ptsim.sched as sched_module

    engine = _engine(D1, "semi-rcu")
    engine._factory("pct", 3)  # PCT calibrates before anything is counted
    seeds = range(80)
    switches, runners = [0], []
    reschedule = sched_module._reschedule

    def counted(task, *args):
        switches[0] += 1
        return reschedule(task, *args)

    cpu_main = Sched.cpu_main

    async def noted(self, cpu):
        first = trio.lowlevel.current_task()
        await cpu_main(self, cpu)
        runners.append(first is trio.lowlevel.current_task())

    monkeypatch.setattr(sched_module, "_reschedule", counted)
    monkeypatch.setattr(Sched, "cpu_main", noted)
    taken = [_outcome(r) for r in engine.run_seeds(seeds, "pct")]
    with_takeover = switches[0]

    def hand_on_without(self, cpu):
        nxt = self.choose(cpu)
        if nxt is None:
            self._end()
        else:
            sched_module._reschedule(self.tasks[nxt.id])

    monkeypatch.setattr(Sched, "_hand_on", hand_on_without)
    switches[0] = 0
    assert [_outcome(r) for r in engine.run_seeds(seeds, "pct")] == taken
    assert with_takeover < switches[0]
    assert runners and all(runners)
