"""Peak RSS of every process of long stress and explore runs (the issue's bound: 500 MB each).

    python benchmarks/measure_memory.py [--runs 100000] [--jobs 2] [--scenario PATH[:VARIANT]]
                                        [--only stress|stress-jobs|explore ...] [--bound-mb 500]

Each run is a whole `ptsim stress ... --runs N --json` (in one process, and with --jobs J) or
`ptsim explore ... --max-schedules N --json` command, started from here. While it runs, this
script reads the high-water mark of resident memory (VmHWM in /proc/PID/status) of the command
and of every process under it (the --jobs fork server and its workers, multiprocessing's
resource tracker) every 50 ms, and prints each process's peak with its role. A process that
rises and exits between two reads is seen by its last read; the exact peak of the largest
process of the whole tree, which the kernel reports when the command is reaped (wait4: the
command's own and its reaped descendants', what /usr/bin/time -v prints as "Maximum resident
set size"), is printed beside them.

Without --scenario it runs the catalogue's D1 (semi-rcu: a bug in ~4 % of the schedules, whose
first of each kind the tally keeps), D9 (rfc-flush-before-set-pmd: ~125 steps a schedule, and an
exploration at K = 5 that does not finish within 100,000 schedules, its state cache on at
first) and D12 (no-split-ptlocks: the catalogue's largest post-setup machine). explore runs at
--preemptions 5, where the state cache is on (its dict of states seen is what grows). Linux
only (/proc). A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["scenarios/d01_semi_rcu_single_free.toml:semi-rcu",
           "scenarios/d09_mixed_tlb_sizes_after_reclaim.toml:rfc-flush-before-set-pmd",
           "scenarios/d12_collapse_pte_mapped_thp_ptl_eq_pml.toml:no-split-ptlocks"]
POLL_S = 0.05


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _children() -> dict[int, list[int]]:
    """ppid -> pids, for every process on the machine."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _role(pid: int, root: int, parent: dict[int, int]) -> str:
    if pid == root:
        return "ptsim"
    if parent.get(pid) != root:
        return "worker"  # the fork server's children
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = ""
    if "forkserver" in cmd:
        return "fork server"
    if "resource_tracker" in cmd:
        return "resource tracker"
    return "child: " + " ".join(cmd.split()[:4])[:60]


def measure(cmd: list[str]) -> tuple[int, list[tuple[int, str, int]], int, str]:
    """Exit code, [(pid, role, peak kB)], the tree's exact largest peak in kB, stdout."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL)
        peaks: dict[int, int] = {}
        roles: dict[int, str] = {}
        parent: dict[int, int] = {}
        while True:
            tree = _children()
            todo = [proc.pid]
            while todo:
                pid = todo.pop()
                for child in tree.get(pid, ()):
                    parent[child] = pid
                    todo.append(child)
                try:
                    hwm = int(_status(pid).get("VmHWM", "0 kB").split()[0])
                except (OSError, ValueError):
                    continue
                if pid not in roles:
                    roles[pid] = _role(pid, proc.pid, parent)
                peaks[pid] = max(peaks.get(pid, 0), hwm)
            # wait4's usage of the reaped command covers it and its reaped descendants.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                exact = usage.ru_maxrss
                break
            time.sleep(POLL_S)
        out.seek(0)
        text = out.read()
    rows = [(pid, roles[pid], kb) for pid, kb in peaks.items()]
    return proc.returncode, rows, exact, text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100000, help="schedules per command")
    p.add_argument("--jobs", type=int, default=2, help="workers of the --jobs stress run")
    p.add_argument("--scenario", action="append", metavar="PATH[:VARIANT]")
    p.add_argument("--only", action="append", choices=["stress", "stress-jobs", "explore"])
    p.add_argument("--preemptions", type=int, default=5, help="explore's bound")
    p.add_argument("--bound-mb", type=float, default=500.0)
    args = p.parse_args()
    ptsim = [sys.executable, "-m", "ptsim"]
    kinds = args.only or ["stress", "stress-jobs", "explore"]
    worst = 0.0
    for spec in args.scenario or DEFAULT:
        path, _, variant = spec.partition(":")
        pick = ["--variant", variant] if variant else []
        commands = {
            "stress": [*ptsim, "stress", path, *pick, "--runs", str(args.runs), "--json"],
            "stress-jobs": [*ptsim, "stress", path, *pick, "--runs", str(args.runs), "--json",
                            "--jobs", str(args.jobs)],
            "explore": [*ptsim, "explore", path, *pick, "--preemptions", str(args.preemptions),
                        "--max-schedules", str(args.runs), "--json"],
        }
        for kind in kinds:
            start = time.perf_counter()
            code, rows, exact, out = measure(commands[kind])
            wall = time.perf_counter() - start
            try:
                doc = json.loads(out)
                what = f"{doc.get('runs', '?')} schedules"
            except ValueError:
                what = "no JSON"
            print(f"{Path(path).name} {variant or ''} {kind}: exit {code}, {what}, "
                  f"{wall:.0f} s", flush=True)
            for pid, role, kb in sorted(rows, key=lambda r: r[0]):
                mb = kb / 1024
                worst = max(worst, mb)
                print(f"    {role:16} pid {pid:7}  peak RSS {mb:8.1f} MB"
                      f"{'  OVER ' + str(args.bound_mb) + ' MB' if mb > args.bound_mb else ''}",
                      flush=True)
            print(f"    largest process of the tree (kernel's maxrss, exact): "
                  f"{exact / 1024:8.1f} MB", flush=True)
    print(f"largest peak seen: {worst:.1f} MB (bound {args.bound_mb:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
