"""stress --jobs / --dask: the same result as one process, whatever ran where
(SPEC: "Command line").

Every comparison is against the in-process run of the same command line: the JSON minus
elapsed_s, and the --out lines byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from ptsim import parallel
from ptsim.cli import main
from ptsim.engine import Engine
from ptsim.interrupt import sigint_deferred
from ptsim.scenario import load_scenario

from conftest import D1, ROOT


def stress(capsys, tmp_path: Path, *argv) -> tuple[int, dict, list[str], str]:
    """Exit code, JSON without elapsed_s, --out lines and stderr of one `stress --json`."""
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
    code = main(["stress", *argv, "--json", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    data = json.loads(stdout)
    assert data.pop("elapsed_s") >= 0
    return code, data, out.read_text().splitlines(), stderr


D9 = str(ROOT / "scenarios" / "d09_mixed_tlb_sizes_after_reclaim.toml")
# Base seeds that put the first bug of semi-rcu after a few chunks (and more bugs after it),
# so that --stop-on-first has earlier chunks to wait for and later ones to drop; D9's variant
# has hazards (which stop nothing) in about one run in five.
CASES = [(D1, "semi-rcu", "random", "1000"), (D1, "semi-rcu", "pct", "400"),
         (D1, "full-rcu", "random", "0"), (D1, "full-rcu", "pct", "0"),
         (D9, "no-flush-before-set-pmd", "pct", "0")]


@pytest.mark.parametrize("stop_on_first", [False, True], ids=["all", "stop-on-first"])
@pytest.mark.parametrize("path,variant,strategy,seed", CASES,
                         ids=[f"{v}-{s}" for _, v, s, _ in CASES])
def test_jobs_2_gives_the_in_process_result(capsys, tmp_path, path, variant, strategy, seed,
                                            stop_on_first):
    argv = [path, "--variant", variant, "--strategy", strategy, "--runs", "240", "--seed", seed]
    argv += ["--stop-on-first"] if stop_on_first else []
    serial = stress(capsys, tmp_path, *argv)
    jobs = stress(capsys, tmp_path, *argv, "--jobs", "2")
    assert jobs == serial
    code, data, lines, _ = serial
    assert (code == 1) == (variant == "semi-rcu") == bool(data["bugs"])
    assert bool(data["hazards"]) == (path == D9)
    if stop_on_first and data["bugs"]:
        # The interesting case: the bug is not in the first chunk, and more would follow it.
        assert data["runs"] == data["bugs"][0]["first_run"] + 1 > len(parallel.chunks(240, 2)[0])
    else:
        assert data["runs"] == len(lines) == 240


class LastFirstPool:
    """An in-process pool that always finishes the most recently submitted chunk first: the
    worst order for merging, which must still come out in run-index order."""

    slots = 3

    def __init__(self) -> None:
        self.submitted: list[range] = []

    def submit(self, job, indices, stop_on_first):
        self.submitted.append(indices)
        future = Future()
        future.set_result(parallel.run_chunk(job, indices, stop_on_first))
        future.start = indices.start
        return future

    def wait(self, futures):
        return {max(futures, key=lambda f: f.start)}

    def result(self, future):
        return future.result()

    def cancel(self, futures):
        pass

    abandon = cancel


def _summary(result) -> tuple:
    found = result.bug is not None or bool(result.hazards)
    bug = result.bug and (result.bug.kind, result.bug.summary, result.bug.func)
    return (result.seed, result.steps, bug, [(h.kind, h.summary) for h in result.hazards],
            result.choices if found else None)


@pytest.mark.parametrize("stop_on_first", [False, True])
def test_merge_is_in_run_order_whatever_order_chunks_finish(stop_on_first):
    engine = Engine(load_scenario(D1).resolve("semi-rcu"))
    job = parallel.Job.of(engine, Path(D1).read_text(), "random", 3, 100)
    expected = [_summary(r) for r in engine.run_seeds(range(100, 500), "random", 3,
                                                      stop_on_first=stop_on_first)]
    got = []
    pool = LastFirstPool()
    parallel.run_batch(pool, job, 400, lambda r: got.append(_summary(r)), stop_on_first)
    assert got == expected
    parts = parallel.chunks(400, pool.slots)
    if stop_on_first:
        # Chunks far past the first bug were never handed out.
        assert len(got) < 100 and len(pool.submitted) < len(parts)
    else:
        assert sorted(pool.submitted, key=lambda r: r.start) == parts


def test_chunks_are_contiguous_and_cover_every_run():
    for runs, slots in [(1, 4), (7, 2), (240, 2), (100_000, 16)]:
        parts = parallel.chunks(runs, slots)
        assert [i for part in parts for i in part] == list(range(runs))
        assert parts == parallel.chunks(runs, slots)


# -- Dask ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_address():
    """A real two-process cluster on the loopback interface. Not skipped when dask is missing:
    CI installs the extra, and a skipped test could not fail."""
    from distributed import LocalCluster

    with LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("variant,strategy,extra", [("semi-rcu", "pct", []),
                                                    ("semi-rcu", "random", ["--stop-on-first"]),
                                                    ("full-rcu", "random", [])])
def test_dask_gives_the_in_process_result(capsys, tmp_path, dask_address, variant, strategy, extra):
    argv = [D1, "--variant", variant, "--strategy", strategy, "--runs", "240", "--seed", "100",
            *extra]
    serial = stress(capsys, tmp_path, *argv)
    assert stress(capsys, tmp_path, *argv, "--dask", dask_address) == serial


def test_dask_shows_the_progress_bar_on_a_terminal(capsys, terminal, dask_address):
    code = main(["stress", D1, "--variant", "full-rcu", "--runs", "200", "--dask", dask_address])
    out, err = capsys.readouterr()
    assert code == 0 and "200/200" in err and "schedules/s" in err and "0 distinct bug(s)" in err
    assert "no bug found" in out


# -- bad input --------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--jobs", "-3"], "--jobs must be at least 1"),
    (["--jobs", "2", "--dask", "tcp://127.0.0.1:8786"], "--jobs and --dask"),
    (["--dask", "no-port-here"], "--dask no-port-here: not a scheduler address"),
    (["--dask", "CLOSED"], "cannot connect"),
])
def test_bad_parallel_options_exit_2_with_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 0.5)
    argv = [a.replace("CLOSED", f"tcp://127.0.0.1:{_closed_port()}") for a in argv]
    code = main(["stress", D1, "--runs", "5", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ptsim: ") and message in err


def test_a_malformed_dask_address_leaves_nothing_behind_at_exit():
    """In a process of its own: a half-made Client would hang and print a traceback at exit."""
    proc = subprocess.run([sys.executable, "-m", "ptsim", "stress", D1, "--runs", "5",
                           "--dask", "nonsense"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("ptsim: --dask nonsense: not a scheduler address "
                           "(missing port number in address 'nonsense')\n")


def test_dask_without_the_extra_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    code = main(["stress", D1, "--runs", "5", "--dask", "tcp://127.0.0.1:8786"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "pip install 'ptsim[dask]'" in err


def test_a_cluster_without_workers_exits_2_with_one_line(capsys, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 0.5)
    with LocalCluster(host="127.0.0.1", n_workers=0, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster:
        code = main(["stress", D1, "--runs", "5", "--dask", cluster.scheduler_address])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "the cluster has no workers" in err


# -- Ctrl-C -------------------------------------------------------------------------------------

def test_ctrl_c_with_jobs_reports_the_finished_prefix_and_exits_130(tmp_path):
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it: workers get
    it too and must leave the reporting to the parent, and the JSON and --out agree."""
    out = tmp_path / "runs.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptsim", "stress", D1, "--variant", "full-rcu", "--runs", "10000000",
         "--jobs", "2", "--json", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    data = json.loads(stdout)
    runs = [json.loads(line)["run"] for line in out.read_text().splitlines()]
    assert 0 < data["runs"] == len(runs) < 10_000_000 and runs == list(range(len(runs)))
    assert stderr == f"ptsim: interrupted after {data['runs']} schedules\n"


def test_ctrl_c_inside_sigint_deferred_waits_for_the_end_of_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler has run by now
            done.append(True)
    assert done == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_dask_ships_user_module_sources(tmp_path, dask_address):
    """The cluster's workers never read the module's file: its source travels with the job."""
    import ptsim
    from ptsim import usermods
    from ptsim.kernel_model.registry import forget_module

    module = tmp_path / "remote_patch.py"
    module.write_text(
        "import ptsim\n"
        "from ptsim.kernel_model.pagetable import entry_pfn\n"
        "from ptsim.kernel_model.pgalloc import pte_free\n\n\n"
        "@ptsim.kfunc('free_pte', replaces=True)\n"
        "async def free_pte_now(cpu, mm, addr, tlb, pmdval):\n"
        "    await pte_free(cpu, entry_pfn(pmdval))\n"
        "    mm.nr_ptes -= 1\n")
    text = Path(D1).read_text().replace(
        'name = "full-rcu"\nconfig = { table_free = "rcu" }',
        'name = "full-rcu"\nconfig = { table_free = "rcu" }\nreplace = { free_pte = '
        '"free_pte_now" }')
    try:
        variant = ptsim.loads(text, name="s.toml", imports=[str(module)]).variant("full-rcu")
        module.unlink()  # nothing may read the file from now on
        here = variant.stress(runs=120, strategy="pct").as_json()
        there = variant.stress(runs=120, strategy="pct", dask=dask_address).as_json()
    finally:
        forget_module("remote_patch")
        usermods.LOADED.pop("remote_patch", None)
        sys.modules.pop("remote_patch", None)
    here.pop("elapsed_s")
    there.pop("elapsed_s")
    assert here == there and here["bugs"]  # the patch's use-after-free, found on the cluster
