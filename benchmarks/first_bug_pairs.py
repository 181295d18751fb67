"""Schedules and seconds to the first bug, pct against pairs, over independent seed streams.

    python benchmarks/first_bug_pairs.py [SCENARIO[:VARIANT] ...] [--streams 10] [--cap 5000]
        [--strategies pct,pairs] [--stream-base 1000000]

As benchmarks/first_bug.py (stream s starts at seed s * 1_000_000; a schedule counts when it
shows a kind the variant's `expect` names), except that ``pairs`` is charged its profiling
schedules (one per CPU with agents, PairsFactory.profiling_runs): its count to the first bug is
profiling runs + schedules, and its seconds include the profiling. PCT's calibration runs are
not charged, as first_bug.py does not charge them. Prints a Markdown table with a verdict
against the issue's targets: pairs' median at most a third of pct's where pct's exceeds 10,
and at most 1.25 times pct's elsewhere. A benchmark, not a test: it prints figures.

``--stream-base B`` starts stream s at seed s * B instead. The ``pairs`` strategy aims schedule
n at a target by n (its seed) in a cycle whose period (10, or less where a class of targets is
empty) divides 1,000,000 when it is 10, so by default every stream starts at the same slot of
the cycle, and where a scenario has few targets the streams repeat each other; a base such as
1000003 spreads the streams over the cycle.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from first_bug import ROOT, targets  # noqa: E402
from first_bug import first_bug as schedules_to_first_bug  # noqa: E402

from ptsim import coverage  # noqa: E402,F401  (registers pairs)
from ptsim.engine import Engine  # noqa: E402
from ptsim.scenario import load_scenario  # noqa: E402


def first_bug(path: str, variant: str | None, base: int, strategy: str, cap: int,
              chunk: int = 25) -> tuple[int | None, float]:
    """first_bug.py's count for one stream, charging pairs' profiling runs, and seconds (a
    fresh engine: each stream pays for its preparation)."""
    start = time.perf_counter()
    engine = Engine(load_scenario(ROOT / path if not Path(path).exists() else path)
                    .resolve(variant))
    extra = getattr(engine._factory(strategy, 3), "profiling_runs", 0)
    count, _ = schedules_to_first_bug(engine, base, strategy, cap, chunk)
    return (None if count is None else extra + count), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="*")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--cap", type=int, default=5000)
    p.add_argument("--strategies", default="pct,pairs")
    p.add_argument("--stream-base", type=int, default=1_000_000)
    args = p.parse_args()
    names = args.strategies.split(",")
    print(f"schedules to the first bug ({args.streams} seed streams from s * {args.stream_base}, "
          f"cap {args.cap}; pairs includes its profiling runs)\n")
    print("| scenario | variant | kind | " + " | ".join(
        f"{s} per stream | {s} median | {s} median s" for s in names) + " | target |")
    print("|---|---|---|" + "---|---|---|" * len(names) + "---|")
    misses = 0
    for path, variant in targets(args.targets):
        cells = []
        medians = {}
        kinds = ""
        for strategy in names:
            runs = [first_bug(path, variant, s * args.stream_base, strategy, args.cap)
                    for s in range(args.streams)]
            counts = [n for n, _ in runs]
            found = [n if n is not None else math.inf for n in counts]
            median = medians[strategy] = statistics.median(found)
            cells += [" ".join(str(n) if n is not None else f">{args.cap}" for n in counts),
                      f">{args.cap}" if median == math.inf else f"{median:g}",
                      f"{statistics.median(t for _, t in runs):.3f}"]
        kinds = ", ".join(load_scenario(ROOT / path).resolve(variant).expect_kinds)
        verdict = "-"
        if "pct" in medians and "pairs" in medians:
            pct, pairs = medians["pct"], medians["pairs"]
            if pct > 10:
                ok = pairs <= pct / 3
                verdict = ("met" if ok else "MISSED") + " (<= 1/3)"
            else:
                ok = pairs <= 1.25 * pct
                verdict = ("met" if ok else "MISSED") + " (<= 1.25x)"
            misses += not ok
        print(f"| {Path(path).stem} | {variant or 'base'} | {kinds} | " + " | ".join(cells)
              + f" | {verdict} |", flush=True)
    print(f"\ntargets missed: {misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
