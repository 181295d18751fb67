"""`stress --jobs J` and `stress --dask ADDRESS`: the same schedules, run elsewhere.

A schedule's result depends only on the scenario, variant, overrides, strategy, depth and seed
(SPEC: "Steps, choices, schedules, seeds, tokens"), so runs can go anywhere as long as the parent
sees them in run-index order. The batch is cut into contiguous chunks of run indices; a worker
runs a chunk with its own Engine (built once per scenario and kept) and sends back one compact
record per run. The parent turns the records back into RunResults and hands them to the same
callback as the in-process path, in order, so the tally, the tokens (made by the parent's
engine) and the --out lines are the in-process ones.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from . import usermods
from .engine import Engine, RunResult
from .kernel_model.errors import Finding, NotModelled
from .scenario import loads_scenario
from .usermods import UserModule

# Enough chunks per worker slot that a slow chunk does not leave the others idle at the end and
# the progress bar moves; capped so that a chunk stays short: after a bug under --stop-on-first,
# or on Ctrl-C, at most the chunks already running are wasted.
CHUNKS_PER_SLOT = 8
MAX_CHUNK = 128
# A scheduler that is not there should say so at once, not after distributed's 30 s default.
CONNECT_TIMEOUT_S = 5.0


class ParallelError(Exception):
    """The pool or the cluster cannot run the batch: one line for the user, exit 2."""


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to rebuild the parent's engine: the scenario travels as its
    TOML text, and the user modules loaded with --import as their sources, because a cluster's
    workers need not share the parent's files."""

    text: str
    path: str
    digest: str
    variant: str | None
    overrides: tuple[str, ...]
    strategy: str
    depth: int
    base: int
    modules: tuple[UserModule, ...] = ()

    @classmethod
    def of(cls, engine: Engine, text: str, strategy: str, depth: int, base: int) -> Job:
        scn = engine.scn
        return cls(text, scn.path, engine.digest, scn.variant, tuple(scn.overrides), strategy,
                   depth, base, tuple(usermods.LOADED.values()))


def chunks(runs: int, slots: int) -> list[range]:
    """Contiguous run-index ranges, a function of the batch and the number of slots only."""
    size = max(1, min(MAX_CHUNK, -(-runs // (slots * CHUNKS_PER_SLOT))))
    return [range(start, min(start + size, runs)) for start in range(0, runs, size)]


# -- the worker side ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _worker_engine(text: str, path: str, variant: str | None, overrides: tuple[str, ...],
                   modules: tuple[str, ...]) -> Engine:
    """Building an engine runs setup and pickles the machine: once per scenario (and version of
    its user modules, ``modules``) per process."""
    return Engine(loads_scenario(text, path).resolve(variant, overrides))


def run_chunk(job: Job, indices: range, stop_on_first: bool) -> list[tuple]:
    """Runs of one chunk as (seed, steps, bug, hazards, choices) records: the bug as (kind,
    summary, func), hazards as (kind, summary) pairs, choices only when the run found something
    (the parent makes a token of them). Logs, histories and stats stay here."""
    for module in job.modules:  # the parent's --import modules, as it loaded them
        try:
            usermods.load_source(module.name, module.source, module.filename)
        except usermods.ImportFailed as exc:
            raise ParallelError(f"a worker cannot load {module.name}: {exc}") from None
    engine = _worker_engine(job.text, job.path, job.variant, job.overrides,
                            tuple(m.hash for m in job.modules))
    if engine.digest != job.digest:
        raise ParallelError(f"{job.path}: a worker's ptsim builds another scenario (digest "
                            f"{engine.digest}, the parent has {job.digest}): mixed versions?")
    seeds = range(job.base + indices.start, job.base + indices.stop)
    records = []
    for r in engine.run_seeds(seeds, job.strategy, job.depth, stop_on_first=stop_on_first):
        bug = (r.bug.kind, r.bug.summary, r.bug.func) if r.bug else None
        hazards = tuple((h.kind, h.summary) for h in r.hazards)
        choices = tuple(r.choices) if bug or hazards else None
        records.append((r.seed, r.steps, bug, hazards, choices))
    return records


def _result(record: tuple) -> RunResult:
    seed, steps, bug, hazards, choices = record
    return RunResult(seed=seed, steps=steps, stats={}, choices=list(choices or ()),
                     bug=Finding(bug[0], bug[1], func=bug[2]) if bug else None,
                     hazards=[Finding(kind, summary) for kind, summary in hazards])


# -- pools ------------------------------------------------------------------------------------

def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (report what
    # finished, exit 130) and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalPool:
    """J processes on this machine. They start from a fork server with ptsim imported: cheap to
    start, and unlike plain fork safe while the parent runs threads (the progress bar's)."""

    def __init__(self, jobs: int) -> None:
        methods = multiprocessing.get_all_start_methods()
        method = "forkserver" if "forkserver" in methods else "spawn"
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["ptsim.parallel"])
        self.slots = jobs
        self.executor = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_ignore_sigint)

    def submit(self, job: Job, indices: range, stop_on_first: bool):
        return self.executor.submit(run_chunk, job, indices, stop_on_first)

    def wait(self, futures) -> set:
        return wait(futures, return_when=FIRST_COMPLETED).done

    def result(self, future) -> list[tuple]:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise ParallelError(f"--jobs: a worker process died ({exc})") from None

    def cancel(self, futures) -> None:
        """Drop chunks that have not started; running ones finish (a chunk is short)."""
        for future in futures:
            future.cancel()

    def abandon(self, futures) -> None:
        """Stop all work: the batch is over (an early stop, Ctrl-C, an error) and shutdown would
        otherwise wait for the running chunks, however long they take."""
        self.cancel(futures)
        terminate = getattr(self.executor, "terminate_workers", None)  # Python >= 3.14
        if terminate is not None:
            terminate()
            return
        for proc in list((self.executor._processes or {}).values()):
            proc.terminate()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class DaskPool:
    """An existing Dask distributed cluster. Its workers need ptsim installed; the scenario goes
    with each chunk, and each worker process keeps its engines between chunks."""

    def __init__(self, address: str) -> None:
        try:
            import distributed
        except ImportError:
            raise ParallelError("--dask needs the dask extra: pip install 'ptsim[dask]'") from None
        self.distributed = distributed
        self.address = address
        try:
            # Checked first: a Client that fails on a malformed address hangs for 10 s at exit
            # in its finaliser and prints a traceback.
            distributed.comm.get_address_host_port(address)
        except ValueError as exc:
            raise ParallelError(f"--dask {address}: not a scheduler address "
                                f"({_one_line(exc)})") from None
        try:
            self.client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S,
                                             set_as_default=False)
        except (OSError, ValueError, TypeError) as exc:
            raise ParallelError(f"--dask {address}: cannot connect: {_one_line(exc)}") from None
        try:
            self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            self.client.close()
            raise ParallelError(f"--dask {address}: the cluster has no workers "
                                f"({_one_line(exc)})") from None
        self.slots = max(1, sum(self.client.nthreads().values()))

    def submit(self, job: Job, indices: range, stop_on_first: bool):
        return self.client.submit(run_chunk, job, indices, stop_on_first, pure=False)

    def wait(self, futures) -> set:
        # distributed.wait() finds its client through the current/default one; this client is
        # not made the process-wide default, so that nothing outlives the batch.
        with self.client.as_current():
            return self.distributed.wait(list(futures), return_when="FIRST_COMPLETED").done

    def result(self, future) -> list[tuple]:
        try:
            return future.result()
        except (NotModelled, ParallelError):
            raise
        except Exception as exc:  # a worker without ptsim, a killed worker, a lost connection
            raise ParallelError(f"--dask {self.address}: a worker failed: "
                                f"{type(exc).__name__}: {_one_line(exc)}") from None

    def cancel(self, futures) -> None:
        if futures:
            self.client.cancel(list(futures))

    abandon = cancel

    def close(self) -> None:
        self.client.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_pool(jobs: int, dask: str | None) -> LocalPool | DaskPool | None:
    """The pool that --jobs/--dask ask for; None means in this process."""
    if dask is not None:
        return DaskPool(dask)
    return LocalPool(jobs) if jobs > 1 else None


def run_batch(pool, job: Job, runs: int, on_result, stop_on_first: bool = False) -> None:
    """Runs 0..runs-1 of the job on the pool; on_result gets each RunResult in run-index order,
    exactly as Engine.run_seeds gives them, up to and including the first bug under
    stop_on_first. A few chunks are kept in flight per slot, submitted in index order, so that
    the earliest runs finish first and little is queued when the batch stops early."""
    parts = chunks(runs, pool.slots)
    window = 2 * pool.slots
    pending: dict = {}  # future -> chunk number
    dropped: list = []  # chunks no longer needed, perhaps still running
    finished: dict[int, list[tuple]] = {}
    needed = len(parts)  # chunks past a chunk with a bug are not needed under stop_on_first
    submitted = emitted = 0
    try:
        while emitted < needed:
            while submitted < needed and len(pending) < window:
                pending[pool.submit(job, parts[submitted], stop_on_first)] = submitted
                submitted += 1
            for future in pool.wait(pending):
                if future not in pending:
                    continue  # finished with others, but dropped by a bug found among them
                k = pending.pop(future)
                records = finished[k] = pool.result(future)
                if stop_on_first and k < needed and records and records[-1][2] is not None:
                    needed = k + 1
                    dropped += [f for f, j in pending.items() if j > k]
                    pool.cancel(dropped)
                    pending = {f: j for f, j in pending.items() if j <= k}
            # A chunk with a bug ends at it (workers stop there too), and needed ends the batch
            # with the earliest such chunk: what is emitted is what one process would give.
            while emitted < needed and emitted in finished:
                for record in finished.pop(emitted):
                    on_result(_result(record))
                emitted += 1
    finally:
        leftover = [f for f in (*pending, *dropped) if not f.done()]
        if leftover:
            pool.abandon(leftover)
