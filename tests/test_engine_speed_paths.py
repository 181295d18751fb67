"""The engine's lean single-CPU path changes no result.

Sched.point() skips choose() when the running CPU is the only one not idle, has no IPI pending
and no grace period can end. These tests run the same schedules with the lean path on and forced
off (Engine(fast_path=False)) and require identical choices, steps, bugs and hazards; and they
run a scaled-down copy of the seed-002 VmPTE measurement. No timing is asserted here: speed is
reported by benchmarks/measure_vmpte.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ptsim.engine import Engine
from ptsim.kernel_model.errors import NotModelled
from ptsim.scenario import load_scenario
from ptsim.sched import Sched

from conftest import D1, SCENARIOS

MEASURE = SCENARIOS / "measure" / "seed002_vmpte.toml"
SEEDS = range(50)
G = 1 << 30
M2 = 2 << 20


def _cases():
    """(scenario file, variant) for every shipped catalogue scenario (not measure/)."""
    cases = []
    for path in sorted(SCENARIOS.glob("*.toml")):
        sf = load_scenario(path)
        for name in ([None] if not sf.variants else sf.variant_names()):
            cases.append(pytest.param(path, name, id=f"{path.stem}-{name or 'base'}"))
    return cases


def _engines(path: Path, variant: str | None, overrides=()):
    scn = load_scenario(path).resolve(variant, list(overrides))
    try:
        return Engine(scn, fast_path=True), Engine(scn, fast_path=False)
    except NotModelled as exc:
        pytest.skip(f"not modelled yet: {exc}")


def _outcome(result) -> tuple:
    bug = result.bug
    return (result.steps, tuple(result.choices),
            None if bug is None else (bug.kind, bug.cpu, bug.step, bug.summary),
            tuple((h.kind, h.cpu, h.step) for h in result.hazards),
            result.stats)


class _CountChoose:
    """Counts Sched.choose calls (how often the full path ran) without touching the engine."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = Sched.choose

        def choose(sched, cur):
            self.calls += 1
            return original(sched, cur)

        monkeypatch.setattr(Sched, "choose", choose)


@pytest.mark.parametrize("strategy", ["random", "pct"])
@pytest.mark.parametrize("path,variant", _cases())
def test_lean_path_gives_the_same_schedules(path, variant, strategy, monkeypatch):
    fast, slow = _engines(path, variant)
    counter = _CountChoose(monkeypatch)
    fast_results = fast.run_seeds(SEEDS, strategy)
    fast_calls, counter.calls = counter.calls, 0
    slow_results = slow.run_seeds(SEEDS, strategy)
    slow_calls = counter.calls
    assert len(fast_results) == len(slow_results) == len(SEEDS)
    for seed, a, b in zip(SEEDS, fast_results, slow_results):
        assert _outcome(a) == _outcome(b), f"seed {seed} differs with the lean path"
    assert fast_calls <= slow_calls


def test_lean_path_is_taken_when_one_cpu_is_left(monkeypatch):
    """D1's two CPUs: once one is done, the other steps alone and choose() is skipped."""
    fast, slow = _engines(Path(D1), "full-rcu")
    counter = _CountChoose(monkeypatch)
    fast.run_seeds(range(10))
    fast_calls, counter.calls = counter.calls, 0
    slow.run_seeds(range(10))
    assert fast_calls < counter.calls


def test_replayed_tokens_agree_across_paths():
    """A schedule recorded with the lean path replays with it forced off, and back."""
    for path in sorted(SCENARIOS.glob("*.toml")):
        sf = load_scenario(path)
        for name in ([None] if not sf.variants else sf.variant_names()):
            try:
                fast, slow = (Engine(load_scenario(path).resolve(name), fast_path=f)
                              for f in (True, False))
            except NotModelled:
                continue
            for seed in range(5):
                a = fast.run_seed(seed)
                b = slow.replay(a.choices, log=False)
                c = fast.replay(slow.run_seed(seed).choices, log=False)
                assert _outcome(a)[:3] == _outcome(b)[:3] == _outcome(c)[:3]


# -- the seed-002 measurement -------------------------------------------------------------------

def _scaled(tmp_path: Path, repeat: int) -> Path:
    text = MEASURE.read_text()
    assert "repeat = 25600" in text
    out = tmp_path / f"seed002_vmpte_{repeat}.toml"
    out.write_text(text.replace("repeat = 25600", f"repeat = {repeat}"))
    return out


def test_measurement_file_spans_50_pmd_tables_and_one_pud():
    scn = load_scenario(MEASURE).resolve("before")
    (vma,) = scn.vmas
    (agent,) = scn.agents
    assert scn.cpus == 1 and agent.cpu == 0
    assert vma.start % G == 0 and vma.end - vma.start == 50 * G
    assert vma.start >> 39 == (vma.end - 1) >> 39  # one PUD table
    assert agent.repeat == 25600 and agent.stride == M2
    assert agent.repeat * agent.stride == vma.end - vma.start
    assert [op.op for op in agent.ops] == ["touch", "madvise_dontneed"]
    assert scn.cfg["pt_reclaim"] is False
    assert load_scenario(MEASURE).resolve("after").cfg["pt_reclaim"] is True
    faults = agent.repeat * (agent.stride // 4096)
    assert faults == 13_107_200
    # every fault takes well over one step: max_steps must not cut the run short
    assert scn.max_steps >= 40 * faults


@pytest.mark.parametrize("variant,nr_ptes", [("before", 20), ("after", 0)])
def test_scaled_measurement_vmpte(tmp_path, variant, nr_ptes):
    fast, slow = _engines(_scaled(tmp_path, 20), variant)
    result = fast.run_seed(0)
    assert result.bug is None and not result.hazards
    assert result.stats["mm0"] == {"vm_pte_kb": 4 * (nr_ptes + 1 + 1), "nr_ptes": nr_ptes,
                                   "nr_pmds": 1, "nr_puds": 1, "rss_kb": 0}
    assert _outcome(slow.run_seed(0)) == _outcome(result)


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_scaled_measurement_grace_period_ends_stay_choices(tmp_path, strategy):
    """With one CPU and RCU-freed PTE tables, a grace-period end competes with the CPU: a real
    choice in both paths, recorded the same way."""
    fast, slow = _engines(_scaled(tmp_path, 8), "after")
    for seed in range(10):
        a = fast.run_seed(seed, strategy)
        b = slow.run_seed(seed, strategy)
        assert _outcome(a) == _outcome(b)
        assert a.choices  # the grace-period ends were choices, not silent
        assert a.stats["mm0"]["nr_ptes"] == 0


def test_cpu_func_sees_kernel_functions_declared_and_forgotten_after_a_walk():
    """Cpu.func() looks each frame's code up by id in the unwinder's table (KFUNC_IDS), which
    the registry keeps: declaring a kernel function after a walk, or forgetting it, must show at
    the next walk all the same."""
    from ptsim.kernel_model.registry import forget_module, kfunc

    m = Engine(load_scenario(D1).resolve("semi-rcu")).fresh()
    cpu = m.cpus[0]
    m.running = cpu
    cpu.op = "the_op"
    seen = []

    async def speed_paths_inner():
        seen.append((cpu.func(), cpu.backtrace()))

    async def speed_paths_outer():
        await speed_paths_inner()

    def walk():
        coro = speed_paths_outer()
        with pytest.raises(StopIteration):
            coro.send(None)

    walk()  # neither is a kernel function: the op
    kfunc(speed_paths_outer)
    try:
        walk()
        kfunc(speed_paths_inner)
        walk()
    finally:
        forget_module(speed_paths_outer.__module__)
    walk()
    assert [func for func, _ in seen] == ["the_op", "speed_paths_outer", "speed_paths_inner",
                                         "the_op"]
    assert [trace for _, trace in seen] == [
        ("the_op",), ("speed_paths_outer", "the_op"),
        ("speed_paths_inner", "speed_paths_outer", "the_op"), ("the_op",)]
