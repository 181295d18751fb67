"""explore's and shrink's policy: follow a prefix of choices, then never preempt."""

from __future__ import annotations

from itertools import islice

from ptsim.kernel_model.footprint import Footprints, conflict, upto_count

from . import Divergence, Pruned, Strategy

NO_SLEEP: dict = {}


class SleepBlocked(Pruned):
    """Partial-order reduction: every way on from here was explored by an equivalent schedule
    (the CPU that would go on is asleep)."""


def prompt_events(options: list) -> list | tuple:
    """Per option, whether it is a prompt event (one the hardware takes at once: an IPI a CPU
    can take now), where any is; else (). Events come after the CPUs in an option list."""
    if options[-1].is_event:
        prompt = [o.prompt for o in options]
        if True in prompt:
            return prompt
    return ()


def eager_event(options: list) -> int | None:
    """The index of an event that goes first at a free choice (no CPU could go on), if any: a
    grace period's end (see the default in GuidedStrategy)."""
    for i in range(len(options) - 1, -1, -1):
        option = options[i]
        if not option.is_event:
            return None
        if option.eager:
            return i
    return None


def cost(cont, idx, prompt) -> int:
    """What taking option idx costs against the bound: nothing for the default, one for a
    deviation from it. A prompt event that is due goes first, in any order among such events,
    and anything else taken while one is due delays it. Otherwise the CPU that could go on goes
    on: switching away from it, or letting an event that is not prompt (a grace period's end)
    in ahead of it, is a preemption; where no CPU could go on (it blocked or finished), every
    option is free."""
    if prompt:
        return 0 if prompt[idx] else 1
    return 1 if cont is not None and idx != cont else 0


class GuidedStrategy(Strategy):
    """Follow a prefix of choices, then never preempt.

    After the prefix the default runs (cost()): a prompt event that is due (an IPI a CPU can
    take now), else the CPU that could continue, else (it blocked, finished, or nothing has run
    yet) an eager event (a grace period's end) or the first option; an injected fault does not
    fire. Every choice point is recorded as
    (number of options, index of the CPU that could continue or None, index chosen,
    preemptions before it), which is what the explorer branches on; ``faults`` holds, per
    point, the faults fired before it, or None where the point is not a fault injection.
    ``on_point`` (explore's state cache) is called before each choice past the prefix and may
    raise Pruned.

    With ``reduce``, step footprints are recorded (kernel_model/footprint.py) and ``sleep`` is
    the sleep set at the last choice of the prefix: the CPUs whose next step an equivalent
    schedule already explored, each with that step's footprint. A sleeping CPU wakes when a step
    that conflicts with its step runs (or it runs itself); where the CPU that would go on is
    asleep, the run ends (SleepBlocked). ``sleeps[i]`` is the sleep set at point i (None at a
    fault injection) and ``steps[i]`` the step count there; see ptsim/explore.py.
    """

    name = "guided"

    def __init__(self, prefix=(), on_point=None, sleep=NO_SLEEP, reduce: bool = False) -> None:
        self.prefix = prefix
        self.replaying = len(prefix) - 1  # choices before this index only re-play the prefix
        self.on_point = on_point
        self.parks = on_point is not None  # the state cache needs every CPU parked
        self.sched = None
        self.points: list[tuple[int, int | None, int, int]] = []
        self.faults: list[int | None] = []  # per point: faults fired before it, None: a CPU pick
        self.fired = 0
        self.decisions: list = []  # what each choice chose: an option key, or ("fault", 0|1)
        self.runners: list[int] = []  # the keys of the CPUs chosen, in order (not events)
        self.preemptions = 0
        self.cur = None  # the CPU that asked, at the choice being made
        self.step = 0
        self.reduce = reduce
        self.footprints: Footprints | None = None
        self.keys: list[list] = []  # per point: the option keys (reduce only)
        # per point: which options are prompt events, where any is (prompt_events()), which
        # decides what each option costs there (cost()); recorded past the replayed prefix only
        self.prompt: list = []
        # free choices (past the prefix) where an eager event was the default: point -> index
        self.eager: dict[int, int] = {}
        # (point, explore's Node) of each eager event this run took, or runs after as its
        # ancestors took it: explore notes whether a later step conflicts with it
        self.watching: list = []
        self.asking: list = []  # per point: the key of the CPU that asked (reduce only)
        self.sleeps: list[dict | None] = []
        self.steps: list[int] = []
        self.sleep = NO_SLEEP  # the sleep set now (from the last prefix point on)
        self.entry_sleep = sleep
        self.filtered = -1  # the sleep set is up to date with every step up to this one
        self.blocked = None  # (the step that would have run, the sleeping CPU's key)
        # (the run this one branched from, the last step they share), when explore knows it:
        # what a consumer noted of those steps there holds here (coverage's sites).
        self.lineage = None
        self.skipping = 0  # inherited choice points still to re-play (_inherit)
        self.notes = None  # what coverage noted of this run (ptsim/coverage.py)
        self.end_step = None  # the step it ended at, once explore released its machine

    def attach(self, sched) -> None:
        self.sched = sched  # explore's state cache reads the parked CPUs' continuations
        if self.reduce:
            self.footprints = sched.m.fp = Footprints()
            self.footprints.watch = self._runs
            if self.lineage is not None and self.replaying > 0:
                self._inherit()

    def _inherit(self) -> None:
        """explore's branch of a run it has (``lineage``): the choice points before the branch
        point re-play the parent's, and so do their steps, so what the parent recorded of them
        (its points and footprints) is this run's too. They are copied, not recorded again:
        until the branch point nothing is recorded (``m.fp`` is None, so the primitives skip
        their footprints) and pick() and fault() only return the prefix's choices. ``runners``
        is not kept for those points (shrink, which reads it, has no lineage)."""
        parent, upto = self.lineage
        r = self.replaying
        self.points = parent.points[:r]
        self.prompt = parent.prompt[:r]
        self.faults = parent.faults[:r]
        self.decisions = parent.decisions[:r]
        self.keys = parent.keys[:r]
        self.asking = parent.asking[:r]
        self.sleeps = parent.sleeps[:r]
        self.steps = parent.steps[:r]
        self.preemptions = parent.points[r][3]
        # (no fault fired in the parent: none in its prefix either)
        self.fired = parent.fired and sum(self.prefix[i] for i, f in enumerate(self.faults)
                                          if f is not None)
        theirs, mine = parent.footprints, self.footprints
        shared = upto_count(theirs.steps, upto)  # steps and cpus have the same keys, in order
        mine.steps = dict(islice(theirs.steps.items(), shared))
        mine.cpus = dict(islice(theirs.cpus.items(), shared))
        mine.pinned = {n for n in theirs.pinned if n <= upto}
        self.sched.m.fp = None
        self.skipping = r

    def _skip(self, n: int) -> int:
        """A choice point before the branch point of an inherited prefix (_inherit)."""
        pos = self.replaying - self.skipping
        idx = self.prefix[pos]
        if idx >= n:
            raise Divergence(f"choice {pos} ({idx}) is impossible: only {n} options")
        self.skipping -= 1
        if not self.skipping:  # the branch point is next: record from here on
            self.sched.m.fp = self.footprints
        return idx

    def _runs(self, step: int, cpu: int) -> None:
        """A precise step begins. If its CPU is asleep, it runs only because nothing else
        could (the scheduler asks no one then): every way on was explored elsewhere."""
        if self.sleep and self.filtered >= 0:
            self._wake(step - 1)
            if cpu in self.sleep:
                self.blocked = (step, cpu)
                raise SleepBlocked()

    def _wake(self, now: int) -> None:
        """Bring the sleep set up to step ``now``: a CPU wakes when it ran, or when a step ran
        whose footprint conflicts with its sleeping step's (an opaque step wakes everyone)."""
        sleep = self.sleep
        if sleep and self.filtered < now:
            steps, cpus = self.footprints.steps, self.footprints.cpus
            for n in range(self.filtered + 1, now + 1):
                fp = steps.get(n)
                if fp is None:
                    sleep = NO_SLEEP
                    break
                ran = cpus[n]
                woken = ran in sleep
                if not woken:  # (a loop, not any() over a generator: this runs at every step)
                    for u in sleep.values():
                        if conflict(u, fp):
                            woken = True
                            break
                if woken:
                    sleep = {k: u for k, u in sleep.items() if k != ran and not conflict(u, fp)}
                    if not sleep:
                        break
            self.sleep = sleep
        self.filtered = now

    def asleep(self) -> frozenset:
        return frozenset(self.sleep)

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        """The index to take at choice ``pos`` (past the prefix: the default)."""
        if pos < len(self.prefix):
            idx = self.prefix[pos]
            if idx >= len(keys):
                raise Divergence(f"choice {pos} ({idx}) is impossible at step {self.step}: "
                                 f"only {len(keys)} options")
            return idx
        return default

    def _choose(self, keys: list, cont: int | None, pick: bool = False, prompt=(),
                eager: int | None = None) -> int:
        pos = len(self.points)
        if prompt:
            default = prompt.index(True)
        elif cont is not None:
            default = cont
        else:
            default = 0 if eager is None else eager
        blocked = False
        branch = self.replaying  # the prefix's last choice: the branch point
        if self.reduce:
            if pos > branch:
                if self.sleep:
                    self._wake(self.step)
                else:
                    self.filtered = self.step  # (what _wake does with nothing asleep)
                sleep = self.sleep
            elif pos == branch:  # its sleep set came with it
                self.sleep, self.filtered = self.entry_sleep, self.step
                sleep = self.sleep
            else:
                sleep = NO_SLEEP
            if pick and sleep and pos > branch:
                if prompt:  # the first due event that is awake goes
                    awake = [i for i, k in enumerate(keys) if prompt[i] and k not in sleep]
                    blocked = not awake
                    default = awake[0] if awake else default
                elif cont is not None:
                    blocked = keys[cont] in sleep
                else:
                    awake = [i for i, k in enumerate(keys) if k not in sleep]
                    blocked = not awake
                    default = (eager if eager in awake else awake[0]) if awake else 0
            self.keys.append(keys)
            self.asking.append(None if self.cur is None else self.cur.key)
            self.sleeps.append(sleep if pick else None)
            self.steps.append(self.step)
        if pos > branch and self.on_point is not None and not blocked:
            self.on_point(self, cont)
        idx = self._wanted(pos, keys, default)
        self.points.append((len(keys), cont, idx, self.preemptions))
        self.prompt.append(prompt)
        self.decisions.append(keys[idx])
        if blocked:
            self.blocked = (self.step + 1, keys[idx])
            raise SleepBlocked()
        self.preemptions += cost(cont, idx, prompt)
        return idx

    def pick(self, options: list, current, step: int) -> int:
        if self.skipping:
            return self._skip(len(options))
        cont = None  # the index of the CPU that could continue, if it can
        if current is not None:
            try:
                cont = options.index(current)
            except ValueError:
                pass
        pos = len(self.points)
        if pos < self.replaying:
            # Strictly inside the prefix, before its branch point: the choice is the
            # prefix's. Nothing reads what such a point offered or who slept there
            # (branches(), sleep_after() and event_step() read the branch point and later
            # ones), so the point keeps only its preemption accounting, and the lists the
            # reduction reads hold placeholders. Depth first, a run re-plays its prefix at
            # most of its choices. (Written out here: this runs at most steps of explore.)
            idx = self.prefix[pos]
            n = len(options)
            if idx >= n:
                raise Divergence(f"choice {pos} ({idx}) is impossible at step {step}: "
                                 f"only {n} options")
            self.points.append((n, cont, idx, self.preemptions))
            self.prompt.append(())
            self.faults.append(None)
            option = options[idx]
            self.decisions.append(option.key)
            if self.reduce:
                self.keys.append(None)
                self.asking.append(None)
                self.sleeps.append(None)
                self.steps.append(step)
            if options[-1].is_event:  # (events come last)
                self.preemptions += cost(cont, idx, prompt_events(options))
            elif cont is not None and idx != cont:
                self.preemptions += 1
            if not option.is_event:
                self.runners.append(option.key)
            return idx
        self.cur, self.step = current, step
        self.faults.append(None)
        eager = None
        if options[-1].is_event:
            prompt = prompt_events(options)
            if cont is None and not prompt:
                eager = eager_event(options)
                if eager is not None:
                    self.eager[len(self.points)] = eager
        else:
            prompt = ()
        idx = self._choose([o.key for o in options], cont, True, prompt, eager)
        if not options[idx].is_event:
            self.runners.append(options[idx].key)
        return idx

    def fault(self, p: float, current, step: int) -> int:
        if self.skipping:
            return self._skip(2)
        self.cur, self.step = current, step
        self.faults.append(self.fired)
        fired = self._choose([("fault", 0), ("fault", 1)], None)
        self.fired += fired
        return fired

    def event_step(self, i: int, idx: int) -> dict | None:
        """The footprint of the event option ``idx`` fired at point i in this run, if it may be
        put to sleep there: an IPI delivery that does not acknowledge the CPU that asked (the
        sender waiting for it: letting it go on first would make the next switch a
        preemption), or an eager event taken as the default of a free choice. Else None. (The
        IPI deliveries are the prompt options.)"""
        prompt = self.prompt[i]
        if self.points[i][2] != idx or not (prompt and prompt[idx] or self.eager.get(i) == idx):
            return None
        step = self.steps[i] + 1
        fps = self.footprints
        if fps.cpus.get(step) != self.keys[i][idx] or not fps.sleepable(step):
            return None
        fp = fps.steps[step]
        return None if ("ipi-sender", self.asking[i]) in fp else fp

    def echoes(self, i: int) -> bool:
        """Does point i repeat point i - 1? A CPU chosen at a free choice before it took any
        step (its task starting) asks again at its first step, with no step in between: the
        same options in the same state, each costing at least what it cost at i - 1, so
        every branch there is a branch of i - 1 already (reduce only: it reads keys and
        steps)."""
        if i == 0 or self.faults[i] is not None or self.faults[i - 1] is not None:
            return False
        before = self.keys[i - 1]
        return (before is not None and self.steps[i] == self.steps[i - 1]
                and self.asking[i] is not None
                and before[self.points[i - 1][2]] == self.asking[i])

    def sleep_after(self, i: int) -> dict:
        """The sleep set the branches at point i take: the point's own, plus, where this run
        went on with the CPU that could continue, that CPU's step (when it is precise). Only
        that step may be put to sleep: a schedule that runs it later is equivalent to one that
        runs it here, and that one spends no more preemptions (ptsim/explore.py)."""
        sleep = self.sleeps[i]
        if sleep is None:
            return NO_SLEEP
        n, cont, chosen, _ = self.points[i]
        if cont is None or chosen != cont or self.prompt[i]:
            return sleep  # (with an event due, going on was a deviation, not the default)
        step = self.steps[i] + 1
        fps = self.footprints
        fp = fps.steps.get(step)
        key = self.keys[i][cont]
        if not fps.sleepable(step) or fps.cpus.get(step) != key or step >= self.sched.m.step:
            return sleep  # opaque or pinned, or the run ended inside it
        grown = dict(sleep)
        grown[key] = fp
        return grown


class SteeredStrategy(GuidedStrategy):
    """shrink: steered by decisions (which CPU or event goes, whether a fault fires) rather than
    option indices, so that dropping or changing one decision leaves the others meaning what
    they meant. A decision that is not possible where it falls, or None, takes the
    non-preempting default; past the list, the default."""

    def __init__(self, decisions: list) -> None:
        super().__init__(())
        self.steer = decisions

    def _wanted(self, pos: int, keys: list, default: int) -> int:
        want = self.steer[pos] if pos < len(self.steer) else None
        return keys.index(want) if want is not None and want in keys else default
