"""What one short schedule costs: microseconds and CPU instructions per D1 schedule.

    python benchmarks/measure_schedule.py [--scenario PATH] [--variant NAME] [--strategy S]
                                          [--schedules N] [--rounds R] [--instructions]

By default it measures what `ptsim bench` calls schedule_us for D1: the catalogue's
scenarios/d01_semi_rcu_single_free.toml under its first variant (semi-rcu) and its [expect]
strategy and depth (pct, 3), seeds 0..N-1 run by Engine.run_seeds in one trio run, as `ptsim
stress` runs them (schedules that find the bug end there: ~37 steps each on average).

Without --instructions it prints microseconds per schedule: the median of R rounds of the same
N seeds, timed with time.perf_counter after the engine is built, PCT calibrated and a few
schedules run. Wall time on a shared VM drifts by tens of per cent; the instruction count does
not.

--instructions counts CPU instructions per schedule instead, under valgrind's callgrind, as
benchmarks/measure_vmpte.py counts them per fault: two runs of a child process (N schedules,
default 20, and N + 200), so that start-up, imports, building the engine and PCT's calibration
cancel out; the difference divided by 200 is the figure to compare two versions of the
schedule path by. A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D1 = ROOT / "scenarios" / "d01_semi_rcu_single_free.toml"
EXTRA = 200  # schedules the large callgrind run has on top of the small one
WARMUP = 3


def _engine(path: str, variant: str | None, strategy: str | None):
    """The engine, the strategy name and its depth: the file's [expect] unless given."""
    from ptsim.engine import Engine
    from ptsim.scenario import load_scenario

    sf = load_scenario(path)
    if variant is None and sf.variants:
        variant = sf.variants[0].name
    engine = Engine(sf.resolve(variant))
    return engine, variant, strategy or sf.expect.strategy, sf.expect.depth


def _child(path: str, variant: str | None, strategy: str | None, schedules: int) -> dict:
    """Runs in the process callgrind watches: build, calibrate, run ``schedules`` seeds."""
    engine, variant, strategy, depth = _engine(path, variant, strategy)
    results = engine.run_seeds(range(schedules), strategy, depth)
    return {"schedules": len(results), "steps": sum(r.steps for r in results),
            "bugs": sum(1 for r in results if r.bug is not None)}


def _callgrind(path: str, variant: str | None, strategy: str | None, schedules: int) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           sys.executable, __file__, "--scenario", path, "--child", str(schedules)]
    cmd += ["--variant", variant] if variant else []
    cmd += ["--strategy", strategy] if strategy else []
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return int(re.search(r"Collected : (\d+)", err).group(1))


def _named(path: str, variant: str | None, strategy: str | None) -> tuple[str, str]:
    """The variant and strategy a run uses, for the printout (no engine is built here)."""
    from ptsim.scenario import load_scenario

    sf = load_scenario(path)
    if variant is None:
        variant = sf.variants[0].name if sf.variants else "base"
    return variant, strategy or sf.expect.strategy


def instructions(path: str, variant: str | None, strategy: str | None, schedules: int) -> int:
    if shutil.which("valgrind") is None:
        print("--instructions needs valgrind", file=sys.stderr)
        return 2
    small = _callgrind(path, variant, strategy, schedules)
    large = _callgrind(path, variant, strategy, schedules + EXTRA)
    shown, strategy_shown = _named(path, variant, strategy)
    print(f"{Path(path).name} {shown} {strategy_shown}: {(large - small) // EXTRA} "
          f"instructions per schedule (callgrind, {schedules + EXTRA} schedules minus "
          f"{schedules})", flush=True)
    return 0


def timed(path: str, variant: str | None, strategy: str | None, schedules: int,
          rounds: int) -> int:
    import gc

    engine, variant, strategy, depth = _engine(path, variant, strategy)
    engine.run_seeds(range(WARMUP), strategy, depth)  # PCT calibrates here, outside the clock
    per, steps, bugs = [], 0, 0
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        results = engine.run_seeds(range(schedules), strategy, depth)
        per.append((time.perf_counter() - start) / schedules * 1e6)
        steps = sum(r.steps for r in results)
        bugs = sum(1 for r in results if r.bug is not None)
    print(f"{Path(path).name} {variant or ''} {strategy}: {statistics.median(per):8.1f} us per "
          f"schedule (median of {rounds} rounds of {schedules}; min {min(per):.1f}, max "
          f"{max(per):.1f}), {steps / schedules:.1f} steps per schedule, {bugs} bugs",
          flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default=str(D1))
    p.add_argument("--variant", help="default: the file's first variant")
    p.add_argument("--strategy", help="default: the file's [expect] strategy")
    p.add_argument("--schedules", type=int,
                   help="schedules per round (default 2000; 20 with --instructions)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--instructions", action="store_true",
                   help="instructions per schedule under valgrind")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.scenario, args.variant, args.strategy, args.child)))
        return 0
    if args.instructions:
        return instructions(args.scenario, args.variant, args.strategy, args.schedules or 20)
    return timed(args.scenario, args.variant, args.strategy, args.schedules or 2000, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
