"""explore: the preemption-bounded depth-first search, its state cache, and the CLI."""

from __future__ import annotations

import json

import pytest

from ptsim.cli import main
from ptsim.engine import Engine
from ptsim.explore import explore
from ptsim.scenario import load_scenario
from ptsim.statehash import StateCache, terminal_hash
from ptsim.strategies import STRATEGIES
from ptsim.strategies.guided import GuidedStrategy

from conftest import D1, D10, ROOT, SCENARIOS

D7 = str(SCENARIOS / "d07_gup_fast_vs_collapse.toml")


def engine(path: str, variant: str, *overrides: str) -> Engine:
    return Engine(load_scenario(path).resolve(variant, list(overrides)))


def kinds_and_choices(eng: Engine, bound: int, cache=None, limit=None, reduce=True):
    kinds, schedules = set(), []

    def on_result(index, result):
        schedules.append(tuple(result.choices))
        if result.bug:
            kinds.add(result.bug.kind)
        kinds.update("hazard:" + h.kind for h in result.hazards)

    found = explore(eng, bound, limit, on_result, cache, reduce=reduce)
    return found, kinds, schedules


def preemptions_of(eng: Engine, choices) -> int:
    strategy = GuidedStrategy(tuple(choices))
    eng.run_schedule_sync(strategy)
    return strategy.preemptions


def test_fixed_d1_is_clean_within_two_preemptions_and_buggy_d1_is_not():
    found, kinds, _ = kinds_and_choices(engine(D1, "full-rcu"), 2, StateCache())
    assert found.complete and found.schedules > 0 and kinds == set()
    found, kinds, _ = kinds_and_choices(engine(D1, "semi-rcu"), 1, StateCache())
    assert found.complete and kinds == {"pt-use-after-free"}


def test_every_schedule_is_distinct_and_within_the_bound():
    eng = engine(D1, "semi-rcu")
    found, _, schedules = kinds_and_choices(eng, 1)
    assert found.complete and len(schedules) == len(set(schedules)) == found.schedules
    assert max(preemptions_of(eng, c) for c in schedules) == 1
    assert any(preemptions_of(eng, c) == 0 for c in schedules)


TINY = """
[scenario]
name = "a present page read while MADV_HUGEPAGE runs"
cpus = 2
max_steps = 2000

[[vma]]
start = 0x7f0000000000
size = "2M"
type = "anon"

[[setup]]
cpu = 0
op = "touch"
addr = 0x7f0000000000
len = "8K"
write = true

[[agent]]
cpu = 0
op = "madvise_hugepage"
addr = 0x7f0000000000
len = "2M"

[[agent]]
cpu = 1
op = "touch"
addr = 0x7f0000001000
"""


def test_unbounded_exploration_contains_every_random_schedule(tmp_path):
    """An independent check of completeness: with a bound no schedule reaches, the search must
    hold every schedule the random strategy produces."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    eng = Engine(load_scenario(str(path)).resolve(None))
    found, _, schedules = kinds_and_choices(eng, 1000, reduce=False)
    assert found.complete and len(set(schedules)) == found.schedules > 50
    randoms = {tuple(eng.run_seed(seed).choices) for seed in range(400)}
    assert randoms <= set(schedules) and len(randoms) > 20


def test_reduced_exploration_reaches_the_final_state_of_every_random_schedule(tmp_path):
    """The same check with partial-order reduction: it runs fewer schedules, but every final
    state a random schedule reaches is among the final states it reached."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    eng = Engine(load_scenario(str(path)).resolve(None))
    reached = set()
    found = explore(eng, 1000, None, None, None, None, True,
                    lambda m, r: reached.add(terminal_hash(m, r.bug and r.bug.kind)))
    plain = explore(eng, 1000, None, None, None, None, False)
    assert found.complete and found.reduced > 0 and found.schedules < plain.schedules

    class Keeping:  # the random strategy, keeping the machine it ran on
        def __init__(self, inner):
            self.inner, self.parks = inner, False

        def attach(self, sched):
            self.sched = sched
            self.inner.attach(sched)

        def pick(self, *args):
            return self.inner.pick(*args)

        def fault(self, *args):
            return self.inner.fault(*args)

    def final(seed):
        strategy = Keeping(STRATEGIES.get("random").cls.prepare(eng)(seed))
        result = eng.run_schedule_sync(strategy)
        return terminal_hash(strategy.sched.m, result.bug and result.bug.kind)

    randoms = {final(seed) for seed in range(200)}
    assert randoms <= reached


@pytest.mark.parametrize("path,variant", [(D1, "semi-rcu"), (D1, "full-rcu"),
                                          (D7, "broadcast-no-sync"), (D7, "broadcast-sync"),
                                          (D10, "page-broadcast"), (D10, "page-ipi")])
def test_the_state_cache_finds_what_plain_search_finds(path, variant):
    plain, plain_kinds, _ = kinds_and_choices(engine(path, variant), 1)
    cache = StateCache()
    cached, cached_kinds, _ = kinds_and_choices(engine(path, variant), 1, cache)
    assert plain.complete and cached.complete
    assert cached_kinds == plain_kinds
    assert cached.schedules <= plain.schedules and cache.hits == cached.pruned


def test_fault_injection_outcomes_are_branches():
    """A fault with 0 < p < 1 costs no preemption: both outcomes are explored even at K = 0."""
    never = explore(engine(D1, "semi-rcu", "faults.table_batch_alloc_fail=0.0"), 0)
    maybe = explore(engine(D1, "semi-rcu", "faults.table_batch_alloc_fail=0.5"), 0)
    assert never.complete and maybe.complete and maybe.schedules > never.schedules


def test_max_schedules_stops_an_incomplete_search():
    found = explore(engine(D1, "full-rcu"), 3, 25)
    assert not found.complete and found.schedules == 25


def test_explore_cli_json_and_its_tokens_replay(capsys):
    code = main(["explore", D1, "--variant", "semi-rcu", "--preemptions", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["complete"] is True and data["strategy"] == "explore"
    assert data["runs"] == data["schedules"] > 0
    (bug,) = data["bugs"]
    assert bug["kind"] == "pt-use-after-free" and bug["seed"] is None
    assert main(["replay", D1, bug["token"]]) == 1
    assert "pt-use-after-free" in capsys.readouterr().out


def test_explore_cli_text_says_whether_it_finished(capsys):
    assert main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1"]) == 0
    assert capsys.readouterr().out.startswith("every schedule explored")
    assert main(["explore", D1, "--variant", "full-rcu", "--max-schedules", "3"]) == 0
    assert "stopped at --max-schedules 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--preemptions", "-1"], ["--max-schedules", "0"]])
def test_explore_bad_bounds_exit_2(capsys, argv):
    assert main(["explore", D1, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be at least" in err


def test_the_state_cache_turns_itself_off_where_states_do_not_come_back():
    """On the yardstick (a 2M zap against GUP-fast) hashing does not pay: after its probe the
    cache stops, from counts alone, and the search is the plain one; on D1 it pays and stays."""
    yardstick = ROOT / "benchmarks" / "scenarios" / "user_gup_2m.toml"
    eng = Engine(load_scenario(yardstick).resolve("rcu-broadcast"))
    cache = StateCache()
    cached = explore(eng, 1, None, None, cache, reduce=False)
    plain = explore(eng, 1, None, None, None, reduce=False)
    assert not cache.active and cache.visits == StateCache.PROBE and cache.hits == 0
    assert cached.complete and cached.schedules == plain.schedules == 648
    d1 = Engine(load_scenario(D1).resolve("full-rcu"))
    cache = StateCache()
    found = explore(d1, 2, None, None, cache)
    assert cache.active and found.pruned == cache.hits > 0
    assert not StateCache(4).active and StateCache(StateCache.FROM_BOUND).active


def test_faults_are_bounded_like_preemptions():
    """D2's need_resched fires at every zap iteration with probability 0.3: unbounded, K = 1
    does not finish; with at most one fault per schedule it does, and finds the race."""
    d2 = SCENARIOS / "d02_nonempty_reclaim_after_break.toml"
    buggy = Engine(load_scenario(d2).resolve("before-fix"))
    kinds = set()
    found = explore(buggy, 1, None, lambda i, r: kinds.add(r.bug.kind) if r.bug else None,
                    None, faults=1)
    assert found.complete and "nonempty-table-freed" in kinds
    none = explore(buggy, 1, None, None, None, faults=0)
    assert none.complete and none.schedules < found.schedules
    fixed = Engine(load_scenario(d2).resolve("rescan-after-break"))
    bugs = []
    clean = explore(fixed, 1, None, lambda i, r: bugs.append(r.bug) if r.bug else None, None,
                    faults=1)
    assert clean.complete and bugs == []


def test_explore_json_states_both_bounds(capsys):
    assert main(["explore", D1, "--variant", "full-rcu", "--preemptions", "1", "--faults", "0",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preemptions"] == 1 and data["faults"] == 0 and data["complete"] is True


D9 = str(SCENARIOS / "d09_mixed_tlb_sizes_after_reclaim.toml")


def test_what_each_option_costs():
    from ptsim.strategies.guided import cost
    cpus_only = ()
    assert cost(None, 1, cpus_only) == 0  # nobody could go on: a free choice
    assert cost(0, 0, cpus_only) == 0 and cost(0, 1, cpus_only) == 1  # a preemption
    ipi_due = [False, False, True]  # two CPUs, then an IPI a CPU can take now
    assert cost(0, 2, ipi_due) == 0  # taken at once: the default
    assert cost(0, 0, ipi_due) == 1 and cost(None, 1, ipi_due) == 1  # any step delays it
    # a grace period's end (option 2) is not prompt: no flags, so it costs what a CPU would
    assert cost(0, 2, ()) == 1 and cost(None, 2, ()) == 0


def test_an_ipi_is_taken_at_once_so_d9_needs_its_window_preempted():
    """D9's hazard needs CPU0 stopped between reclaim's pmd_clear and its flush while CPU1
    installs the huge pmd and CPU2 walks: one preemption. With IPIs taken when a CPU could
    take them, no schedule without a deviation holds CPU2's flush back for the whole THP
    fault (the kernel's IPI lands in about a microsecond; the fault zeroes 2 MB)."""
    found, kinds, _ = kinds_and_choices(engine(D9, "no-flush-before-set-pmd"), 0)
    assert found.complete and kinds == set()
    found, kinds, _ = kinds_and_choices(engine(D9, "no-flush-before-set-pmd"), 1)
    assert found.complete and "hazard:mixed-tlb-sizes" in kinds


def test_a_cpu_starting_asks_twice_and_only_the_first_choice_branches():
    """A CPU chosen before its first step asks again at that step with nothing in between: the
    second choice point repeats the first, so explore branches at the first only."""
    from ptsim.explore import branches
    eng = engine(D9, "rfc-flush-before-set-pmd")
    strategy = GuidedStrategy((), None, {}, True)
    eng.run_schedule_sync(strategy)
    echoes = [i for i in range(len(strategy.points)) if strategy.echoes(i)]
    # CPU0 at the start, then CPU1 (the grace period ends when CPU0 is done, so CPU2, alone
    # after CPU1, starts with nothing to choose)
    assert 1 in echoes and len(echoes) >= 2
    assert all(strategy.steps[i] == strategy.steps[i - 1] for i in echoes)
    out, _ = branches(strategy, 0, 2)
    assert out and not any(len(prefix) - 1 in echoes for prefix, _, _ in out)


class Watching:
    """An engine for search() that shows each run's strategy to ``before`` (as it starts) and
    ``after`` (once it ended without raising)."""

    def __init__(self, eng, before=None, after=None) -> None:
        self.eng, self.before, self.after = eng, before, after

    def __getattr__(self, name):
        return getattr(self.eng, name)

    async def run_schedule(self, strategy, seed=None, log=False):
        if self.before is not None:
            self.before(strategy)
        result = await self.eng.run_schedule(strategy, seed, log)
        if self.after is not None:
            self.after(strategy)
        return result


def test_a_branch_inherits_what_recording_its_prefix_again_would_give():
    """A branch copies its parent's choice points and footprints up to its branch point and
    records nothing before it: what it ends with must be what a run of the same prefix that
    records every step ends with (a primitive that kept ``m.fp`` across a scheduling point
    would miss the switch at the branch point)."""
    from ptsim.explore import search
    from ptsim.sched import trio_run

    eng = engine(D9, "rfc-flush-before-set-pmd")
    runs = []
    trio_run(search, Watching(eng, before=runs.append), 2, 150, None, None, 2, True)
    inherited = [s for s in runs if s.lineage is not None and s.replaying > 0]
    assert len(inherited) > 50
    for branch in inherited[::7]:
        fresh = GuidedStrategy(branch.prefix, None, branch.entry_sleep, True)
        try:
            eng.run_schedule_sync(fresh)
        except Exception:  # noqa: BLE001  (asleep, as the branch may have ended too)
            pass
        mine, theirs = branch.footprints, fresh.footprints
        last = min(branch.end_step, fresh.sched.m.step)  # (search released the branch's machine)
        assert {n: f for n, f in mine.steps.items() if n <= last} == \
            {n: f for n, f in theirs.steps.items() if n <= last}
        assert {n for n in mine.pinned if n <= last} == {n for n in theirs.pinned if n <= last}
        points = min(len(branch.points), len(fresh.points))
        assert branch.points[:points] == fresh.points[:points]
        assert branch.sleeps[len(branch.prefix) - 1:points] == \
            fresh.sleeps[len(branch.prefix) - 1:points]
        assert branch.preemptions == fresh.preemptions or branch.blocked or fresh.blocked


def test_search_frees_each_machine_once_its_run_is_done():
    """A run stays on explore's stack while its subtree is searched (its children read its
    points and footprints), but its machine is released as soon as its branches are laid out:
    reference counting frees it, and the cyclic GC never walks it again."""
    import gc
    import weakref

    from ptsim.explore import search
    from ptsim.sched import trio_run

    eng = engine(D9, "rfc-flush-before-set-pmd")
    machines = []

    def note(strategy):  # a run that ended normally: no traceback holds its machine
        machines.append(weakref.ref(strategy.sched.m))

    gc.collect()
    gc.disable()
    try:
        found = trio_run(search, Watching(eng, after=note), 1, 200, None, None, 2, True)
        alive = sum(1 for ref in machines if ref() is not None)
    finally:
        gc.enable()
    assert found.schedules == len(machines) > 100
    assert alive <= 1  # at most the last run's, if the search stopped at its cap there
