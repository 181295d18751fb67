"""explore at K preemptions and F faults on every fixed catalogue variant and the yardstick.

    python benchmarks/explore_table.py [--preemptions 2] [--faults 2] [--time 60] [--markdown]

Each row is one whole `ptsim explore --json --time T` command (state cache and partial-order
reduction on, as by default): schedules run, branches left out by reduction, schedules cut at a
state already explored, whether the search finished, and its seconds. A benchmark, not a test:
it prints figures (and `--time` makes a row depend on the machine's speed: an unfinished row
says how far it got in that time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ptsim.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
YARDSTICK = ROOT / "benchmarks" / "scenarios" / "user_gup_2m.toml"


def targets():
    for path in sorted((ROOT / "scenarios").glob("d*.toml")) + [YARDSTICK]:
        for v in load_scenario(path).variants:
            if not v.expect:  # the fixed variants: expected clean
                yield path, v.name


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preemptions", type=int, default=2)
    p.add_argument("--faults", type=int, default=2)
    p.add_argument("--time", type=int, default=60)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    print("| scenario | variant | schedules | reduced | cut at known states | finished | seconds |")
    print("|---|---|---|---|---|---|---|")
    for path, variant in targets():
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ptsim", "explore", str(path), "--variant",
                              variant, "--preemptions", str(args.preemptions), "--faults",
                              str(args.faults), "--time", f"{args.time}s", "--json"],
                             capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        try:
            doc = json.loads(out.stdout)
        except json.JSONDecodeError:
            print(f"| {path.stem} | {variant} | failed: {out.stderr.strip()[-200:]} |||||")
            continue
        print(f"| {path.stem} | {variant} | {doc['runs']} | {doc.get('reduced', 0)} | "
              f"{doc.get('pruned', 0)} | {'yes' if doc.get('complete') else 'no'} | "
              f"{seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
