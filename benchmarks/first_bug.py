"""Schedules and seconds to the first bug, per strategy, over independent seed streams.

    python benchmarks/first_bug.py [SCENARIO[:VARIANT] ...] [--streams 10] [--cap 20000]

Stream s starts at seed s * 1_000_000 (run i of a stream uses seed base + i, as `stress
--seed base` does), so the ten streams share no schedule. Without arguments it measures every
buggy variant of the shipped catalogue. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ptsim.engine import Engine
from ptsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent


def targets(args: list[str]) -> list[tuple[str, str]]:
    if args:
        return [tuple(a.split(":", 1)) if ":" in a else (a, None) for a in args]
    out = []
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        sf = load_scenario(path)
        out += [(str(path.relative_to(ROOT)), v.name) for v in sf.variants if v.expect]
    return out


def first_bug(engine: Engine, base: int, strategy: str, cap: int) -> tuple[int | None, float]:
    start = time.perf_counter()
    results = engine.run_seeds(range(base, base + cap), strategy, stop_on_first=True)
    elapsed = time.perf_counter() - start
    last = results[-1]
    return (len(results) if last.bug else None), elapsed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="*")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--cap", type=int, default=20000)
    args = p.parse_args()
    table = Table(title=f"schedules to the first bug ({args.streams} seed streams, cap {args.cap})")
    for col in ("scenario", "variant", "strategy", "per stream", "median schedules", "median seconds"):
        table.add_column(col)
    for path, variant in targets(args.targets):
        engine = Engine(load_scenario(ROOT / path if not Path(path).exists() else path).resolve(variant))
        for strategy in ("random", "pct"):
            runs = [first_bug(engine, s * 1_000_000, strategy, args.cap) for s in range(args.streams)]
            counts = [n for n, _ in runs]
            shown = " ".join(str(n) if n is not None else f">{args.cap}" for n in counts)
            found = [n if n is not None else args.cap for n in counts]
            table.add_row(path, variant or "base", strategy, shown, f"{statistics.median(found):g}",
                          f"{statistics.median(t for _, t in runs):.3f}")
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
