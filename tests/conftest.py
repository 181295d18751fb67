from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ptsim.build import OpCall
from ptsim.kernel_model.machine import Machine
from ptsim.scenario import config_defaults, fault_defaults
from ptsim.sched import Sched
from ptsim.strategies.random import RandomStrategy

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
D1 = str(SCENARIOS / "d01_semi_rcu_single_free.toml")
D10 = str(SCENARIOS / "d10_gup_fast_vs_page_free.toml")


def bare_machine(ncpus: int = 2, max_steps: int = 10_000, **cfg) -> Machine:
    config = config_defaults()
    config.update(cfg)
    return Machine(ncpus, config, fault_defaults(), max_steps)


async def run_threads(m: Machine, threads: dict, seed: int) -> Sched:
    """Run hand-written kernel threads (cpu -> coroutine function taking the cpu) as one
    schedule of the real scheduler."""
    calls = [[] for _ in m.cpus]
    for cpu, fn in threads.items():
        calls[cpu].append(OpCall(fn.__name__, fn, None, {}))
    sched = Sched(m, RandomStrategy(seed), calls)
    m.attach_runtime(sched)
    m.log = []
    await sched.run()
    return sched


@pytest.fixture(autouse=True)
def _forget_user_modules():
    """A user module a test loads (--import, imports=[...]) is gone after it, declarations and
    all, as it would be in the next ptsim process."""
    from ptsim import usermods
    from ptsim.kernel_model.registry import forget_module

    before = set(usermods.LOADED)
    yield
    for name in set(usermods.LOADED) - before:
        forget_module(name)
        usermods.LOADED.pop(name)
        sys.modules.pop(name, None)


@pytest.fixture
def d1() -> str:
    return D1


@pytest.fixture
def d10() -> str:
    return D10


@pytest.fixture
def terminal(monkeypatch):
    """What rich sees as an interactive terminal on every stream, as a user's shell would be
    (TTY_* for rich >= 14, FORCE_COLOR before it)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "160")


pytest_plugins = ["pytester"]
