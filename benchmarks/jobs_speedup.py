"""Wall time of one stress batch in one process and with --jobs J, and the speed-up.

    python benchmarks/jobs_speedup.py [--runs 36000] [--jobs 2] [--scenario PATH] [--variant NAME]
                                      [--strategy random]

The default batch (D9's fixed variant: no bug, so every schedule runs to its end, about 125
steps each) takes 30 s or more in one process on a 2-core machine. Both runs are whole
`ptsim stress --json` commands, interpreter start and worker start included: the time a user
waits. The JSON results must be identical but for elapsed_s (SPEC: "Command line"); the script
says so and exits 1 when they are not. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stress(argv: list[str]) -> tuple[float, dict]:
    """Wall seconds and the JSON of one `ptsim stress --json` command."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptsim", "stress", *argv, "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"ptsim stress {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return wall, json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="scenarios/d09_mixed_tlb_sizes_after_reclaim.toml")
    p.add_argument("--variant", default="rfc-flush-before-set-pmd")
    p.add_argument("--strategy", default="random")
    p.add_argument("--runs", type=int, default=36000)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    argv = [args.scenario, "--variant", args.variant, "--strategy", args.strategy,
            "--runs", str(args.runs)]
    serial_s, serial = stress(argv)
    print(f"1 process:  {serial_s:7.2f} s  ({args.runs / serial_s:,.0f} schedules/s)")
    jobs_s, jobs = stress([*argv, "--jobs", str(args.jobs)])
    print(f"--jobs {args.jobs}:   {jobs_s:7.2f} s  ({args.runs / jobs_s:,.0f} schedules/s)")
    print(f"speed-up:   {serial_s / jobs_s:7.2f}x")
    serial.pop("elapsed_s")
    jobs.pop("elapsed_s")
    same = serial == jobs
    print(f"results:    {'identical' if same else 'DIFFERENT'} "
          f"({serial['runs']} runs, {serial['steps']} steps, {len(serial['bugs'])} bug kind(s), "
          f"{len(serial['hazards'])} hazard kind(s))")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
