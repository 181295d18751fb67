"""Schedules and seconds to the first bug, random against pct, over independent seed streams.

    python benchmarks/first_bug.py [SCENARIO[:VARIANT] ...] [--streams 10] [--cap 5000] [--markdown]

A schedule counts when it shows a kind the variant's `expect` names (a bug, or a hazard for D9).
Stream s starts at seed s * 1_000_000 (run i of a stream uses seed base + i, as `stress
--seed base` does), so the ten streams share no schedule. Without arguments it measures every
buggy variant of the shipped catalogue. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import math
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


def first_bug(engine: Engine, base: int, strategy: str, cap: int,
              chunk: int = 50) -> tuple[int | None, float]:
    """Schedules until the first that shows an expected kind (None past the cap), and seconds."""
    expect = set(engine.scn.expect_kinds)
    start = time.perf_counter()
    for first in range(0, cap, chunk):
        seeds = range(base + first, base + min(first + chunk, cap))
        for i, result in enumerate(engine.run_seeds(seeds, strategy)):
            kinds = {h.kind for h in result.hazards} | ({result.bug.kind} if result.bug else set())
            if kinds & expect:
                return first + i + 1, time.perf_counter() - start
    return None, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("targets", nargs="*")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--cap", type=int, default=5000)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args()
    rows = []
    table = Table(title=f"schedules to the first bug ({args.streams} seed streams, cap {args.cap})")
    for col in ("scenario", "variant", "kind", "strategy", "per stream", "median schedules",
                "median seconds"):
        table.add_column(col)
    for path, variant in targets(args.targets):
        engine = Engine(load_scenario(ROOT / path if not Path(path).exists() else path)
                        .resolve(variant))
        for strategy in ("random", "pct"):
            runs = [first_bug(engine, s * 1_000_000, strategy, args.cap)
                    for s in range(args.streams)]
            counts = [n for n, _ in runs]
            shown = " ".join(str(n) if n is not None else f">{args.cap}" for n in counts)
            # A stream that never found it counts as "more than the cap": a median that falls
            # there is shown as such, not as the cap.
            found = [n if n is not None else math.inf for n in counts]
            median = statistics.median(found)
            rows.append((Path(path).stem, variant or "base", ", ".join(engine.scn.expect_kinds),
                         strategy, shown, f">{args.cap}" if median == math.inf else f"{median:g}",
                         f"{statistics.median(t for _, t in runs):.3f}"))
            table.add_row(*rows[-1])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    if args.markdown:
        print("| scenario | variant | kind | strategy | schedules per stream | median schedules "
              "| median s |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
