"""The seed-002 VmPTE measurement: run time, steps, cost per step and per fault, peak RSS.

    python benchmarks/measure_vmpte.py [--repeat N] [--variant before|after ...] [--slow]
                                       [--profile FILE] [--instructions]

--repeat scales the loop down (the default, 25600, is the full 13.1M faults); --slow forces
the engine's lean single-CPU path off, for comparison; --profile writes a cProfile dump of the
run. Each variant runs in its own process so that its peak RSS is its own. A benchmark, not a
test: it prints figures and asserts nothing. For the full scale the reference command is

    /usr/bin/time -v ptsim run scenarios/measure/seed002_vmpte.toml --variant before --json

--instructions counts CPU instructions per fault instead, under valgrind's callgrind: two runs
(--repeat N, default 2, and N + 10 iterations), so that start-up and imports cancel out. Wall
time on a shared VM drifts by tens of per cent within an hour; the instruction count of the same
code varies by less than 0.1 % (string hash seeds), so it is the figure to compare two versions
of the fault path by.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURE = ROOT / "scenarios" / "measure" / "seed002_vmpte.toml"


def _scenario(repeat: int, tmpdir: str) -> Path:
    if repeat == 25600:
        return MEASURE
    text = MEASURE.read_text().replace("repeat = 25600", f"repeat = {repeat}")
    path = Path(tmpdir) / f"seed002_vmpte_{repeat}.toml"
    path.write_text(text)
    return path


def _one(path: str, variant: str, slow: bool, profile: str | None) -> dict:
    """Runs in a child process: one variant, one schedule (seed 0, random)."""
    from ptsim.engine import Engine
    from ptsim.scenario import load_scenario

    scn = load_scenario(path).resolve(variant)
    engine = Engine(scn, fast_path=not slow)
    start = time.perf_counter()
    if profile:
        import cProfile
        prof = cProfile.Profile()
        result = prof.runcall(engine.run_seed, 0)
        prof.dump_stats(profile)
    else:
        result = engine.run_seed(0)
    elapsed = time.perf_counter() - start
    agent = scn.agents[0]
    faults = agent.repeat * (agent.stride // 4096)
    return {"variant": variant, "repeat": agent.repeat, "faults": faults, "steps": result.steps,
            "choices": len(result.choices), "bug": result.bug.kind if result.bug else None,
            "elapsed_s": round(elapsed, 2),
            "ns_per_step": round(elapsed / max(result.steps, 1) * 1e9),
            "us_per_fault": round(elapsed / faults * 1e6, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "stats": result.stats["mm0"]}


def _callgrind_total(path: Path, variant: str) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           sys.executable, __file__, "--child", str(path), variant]
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return int(re.search(r"Collected : (\d+)", err).group(1))


def _instructions(repeat: int, variants: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("--instructions needs valgrind", file=sys.stderr)
        return 2
    extra = 10
    with tempfile.TemporaryDirectory() as tmpdir:
        small, large = _scenario(repeat, tmpdir), _scenario(repeat + extra, tmpdir)
        for variant in variants:
            diff = _callgrind_total(large, variant) - _callgrind_total(small, variant)
            print(f"{variant:6}  {diff // (extra * 512):8} instructions per fault "
                  f"(callgrind, repeat {repeat + extra} minus repeat {repeat})", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int,
                   help="iterations (default: the full 25600; 2 with --instructions)")
    p.add_argument("--variant", action="append", choices=["before", "after"])
    p.add_argument("--slow", action="store_true", help="force the lean single-CPU path off")
    p.add_argument("--profile", help="write a cProfile dump (suffixed with the variant)")
    p.add_argument("--instructions", action="store_true",
                   help="instructions per fault under valgrind")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.instructions:
        return _instructions(args.repeat or 2, args.variant or ["after"])
    if args.child:
        profile = f"{args.profile}.{args.child[1]}" if args.profile else None
        print(json.dumps(_one(args.child[0], args.child[1], args.slow, profile)))
        return 0
    with tempfile.TemporaryDirectory() as tmpdir:
        path = _scenario(args.repeat or 25600, tmpdir)
        for variant in args.variant or ["before", "after"]:
            cmd = [sys.executable, __file__, "--child", str(path), variant]
            cmd += ["--slow"] if args.slow else []
            cmd += ["--profile", args.profile] if args.profile else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            print(f"{r['variant']:6}  repeat {r['repeat']:5}  faults {r['faults']:8}  "
                  f"steps {r['steps']:9}  choices {r['choices']:6}  {r['elapsed_s']:7.2f} s  "
                  f"{r['ns_per_step']:5} ns/step  {r['us_per_fault']:6.2f} us/fault  "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB  vm_pte_kb {r['stats']['vm_pte_kb']}"
                  f"{'  BUG ' + r['bug'] if r['bug'] else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
