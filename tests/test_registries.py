"""Registries: every op, kernel function, config key, fault, bug kind, strategy and trace format
is declared once, beside its code; the loader, `ptsim list` and tokens read them from there."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from ptsim.cli import main
from ptsim.engine import Engine
from ptsim.events import FORMATS, trace_format
from ptsim.kernel_model import MODEL_VERSION
from ptsim.kernel_model.filemap import folio_lock, folio_unlock, mapping_of
from ptsim.kernel_model.registry import (
    CONFIG,
    FAULTS,
    OPS,
    Addr,
    Config,
    RegistryError,
    Size,
    config_key,
    op,
)
from ptsim.scenario import load_scenario, loads_scenario
from ptsim.strategies import STRATEGIES, Strategy, strategy
from ptsim.token import Token, decode

from conftest import D1, ROOT, bare_machine, run_threads

PACKAGES = [ROOT / "kernel_model", ROOT / "agents", ROOT / "ptsim"]


def ptsim(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def listed(capsys, what: str) -> list[dict]:
    code, out, _ = ptsim(capsys, "list", what, "--json")
    assert code == 0
    return json.loads(out)


# -- listing -----------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("ptsim 0.")


def test_list_shows_every_registry(capsys):
    ops = {row["name"]: row for row in listed(capsys, "ops")}
    assert set(ops) == set(OPS) and all(row["doc"] for row in ops.values())
    assert ops["madvise_dontneed"]["params"] == [{"name": "addr", "type": "addr"},
                                                 {"name": "len", "type": "size"}]
    assert {"name": "nr_pages", "type": "int", "default": 1} in ops["gup_fast"]["params"]
    config = {row["name"]: row for row in listed(capsys, "config")}
    assert set(config) == set(CONFIG) and len(config) >= 17
    assert config["table_free"]["values"] == ["rcu", "semi_rcu", "page"]
    assert config["table_free"]["default"] == "rcu" and config["table_free"]["commit"]
    faults = {row["name"]: row for row in listed(capsys, "faults")}
    assert set(faults) == {"table_batch_alloc_fail", "need_resched",
                           "mmu_gather_batch_full"} == set(FAULTS)
    assert all(row["default"] == 0.0 and row["values"] for row in faults.values())
    kinds = {row["name"]: row["class"] for row in listed(capsys, "kinds")}
    assert kinds == {"pt-use-after-free": "bug", "tlb-use-after-free": "bug",
                     "nonempty-table-freed": "bug", "bad-pmd": "bug", "invalid-free": "bug",
                     "deadlock": "bug", "lock-order": "bug", "leak": "bug", "livelock": "bug",
                     "op-crash": "bug",
                     "mixed-tlb-sizes": "hazard", "tlb-divergence": "hazard"}
    assert {row["name"] for row in listed(capsys, "strategies")} == {"random", "pct", "pairs"}
    functions = {row["name"] for row in listed(capsys, "functions")}
    assert {"zap_pte_range", "try_collapse_pte_mapped_thp", "gup_fast_pte_range"} <= functions
    assert {row["name"] for row in listed(capsys, "formats")} == set(FORMATS)
    for what in ("ops", "functions", "config", "faults", "kinds", "strategies", "formats"):
        assert all({"name", "doc"} <= set(row) for row in listed(capsys, what))
        code, out, _ = ptsim(capsys, "list", what)
        assert code == 0 and what in out


# -- the vocabulary is tied to its registry -----------------------------------------------------

def _sources():
    for package in PACKAGES:
        for path in sorted(package.glob("**/*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _settings_reads(tree) -> list[tuple[str, str, int]]:
    """(settings object, key, line) for every `<x>.cfg.<key>` / `<x>.flt.<key>` read."""
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr in ("cfg", "flt"):
            reads.append((node.value.attr, node.attr, node.lineno))
    return reads


def test_code_reads_only_registered_config_keys_and_faults():
    seen = 0
    for path, tree in _sources():
        for what, key, line in _settings_reads(tree):
            registry = CONFIG if what == "cfg" else FAULTS
            assert key in registry, f"{path}:{line} reads {what}.{key}, which is not registered"
            seen += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr in ("cfg", "flt") and path.parent.name != "ptsim":
                pytest.fail(f"{path}:{node.lineno}: read settings as m.{node.value.attr}.key")
    assert seen >= 15


def test_findings_name_registered_kinds_not_literals():
    """m.bug(...) and m.hazard(...) take a kind constant declared with bug_kind()."""
    calls = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("bug", "hazard") and node.args:
                assert not isinstance(node.args[0], ast.Constant), \
                    f"{path}:{node.lineno}: a kind literal; declare it with bug_kind()"
                calls += 1
    assert calls >= 15


def test_an_unregistered_key_or_kind_is_refused_at_once():
    cfg = Config({})
    assert cfg.table_free == "rcu"
    with pytest.raises(AttributeError, match="config key 'no_such_key' is not registered"):
        cfg.no_such_key
    m = bare_machine()
    with pytest.raises(AssertionError, match="not a registered bug kind"):
        m.bug("use-after-frree", None, "typo")
    with pytest.raises(AssertionError, match="not a registered hazard kind"):
        m.hazard("pt-use-after-free", None, "a bug is not a hazard")
    with pytest.raises(RegistryError, match="declared twice"):
        config_key("table_free", ("rcu",), "again")


def test_the_scheduler_imports_no_kernel_model():
    """sched.py offers choices and knows no kernel: its only model import is the errors."""
    tree = ast.parse((ROOT / "ptsim" / "sched.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert imported <= {"__future__", "trio", "ptsim.kernel_model.errors", "strategies"}


# -- adding one thing touches one module --------------------------------------------------------

SCENARIO = """
[scenario]
name = "user op"
cpus = 2
[[vma]]
start = 0x7f0000000000
size = "2M"
populate = true
[[agent]]
cpu = 0
op = "touch_then_drop"
addr = 0x7f0000000000
len = "2M"
[[agent]]
cpu = 1
op = "pte_walker"
addr = 0x7f0000000000
len = "2M"
"""


@pytest.fixture
def user_op():
    @op("touch_then_drop")
    async def touch_then_drop(cpu, *, addr: Addr, len: Size, write: bool = True) -> None:
        """Touch a range, then MADV_DONTNEED it."""
        await OPS["touch"].fn(cpu, addr=addr, len=len, write=write)
        await OPS["madvise_dontneed"].fn(cpu, addr=addr, len=len)

    yield touch_then_drop
    OPS.remove("touch_then_drop")


def test_an_op_declared_in_one_place_is_loaded_checked_and_run(user_op):
    entry = OPS["touch_then_drop"]
    assert [(p.name, p.type, p.required) for p in entry.params] == [
        ("addr", "addr", True), ("len", "size", True), ("write", "bool", False)]
    sf = loads_scenario(SCENARIO, "user.toml")
    assert sf.agents[0].ops[0].args == (("addr", 0x7F0000000000), ("len", 2 << 20),
                                        ("write", True))
    result = Engine(sf.resolve()).run_seed(3, log=True)
    assert result.bug is None
    assert any(ev["event"] == "pte_free_tlb" for ev in result.log)  # the zap reclaimed
    with pytest.raises(Exception, match=r"agent\[0\]\.addr: .* outside every VMA"):
        loads_scenario(SCENARIO.replace('len = "2M"', 'len = "4M"', 1), "user.toml")


def test_an_op_must_say_its_parameter_types():
    with pytest.raises(RegistryError, match="needs an annotation"):
        @op("untyped")
        async def untyped(cpu, *, addr):
            pass
    with pytest.raises(RegistryError, match="keyword-only"):
        @op("positional")
        async def positional(cpu, addr: Addr):
            pass
    assert "untyped" not in OPS and "positional" not in OPS


def test_a_strategy_declared_in_one_place_runs_from_the_engine_and_expect():
    @strategy("always-first")
    class AlwaysFirst(Strategy):
        """Always the first option; faults never fire."""

        def __init__(self, seed: int) -> None:
            self.picks = 0

        def pick(self, options, current, step):
            return 0

        def fault(self, p, current, step):
            return 0

    try:
        engine = Engine(load_scenario(D1).resolve("semi-rcu"))
        first = engine.run_seed(0, "always-first")
        assert first.choices and set(first.choices) == {0}
        assert engine.run_seed(5, "always-first").choices == first.choices
        text = Path(D1).read_text().replace('strategy = "pct"', 'strategy = "always-first"')
        assert loads_scenario(text, "d.toml").expect.strategy == "always-first"
    finally:
        STRATEGIES.remove("always-first")


def test_a_trace_format_declared_in_one_place_is_a_replay_format(capsys):
    @trace_format("count")
    def count(events, ncpus, fh):
        """How many events each CPU logged."""
        per_cpu = {}
        for ev in events:
            per_cpu[ev["cpu"]] = per_cpu.get(ev["cpu"], 0) + 1
        fh.write(json.dumps({str(k): v for k, v in per_cpu.items()}) + "\n")

    try:
        token = Engine(load_scenario(D1).resolve("semi-rcu")).token(
            Engine(load_scenario(D1).resolve("semi-rcu")).run_seed(0).choices)
        code, out, _ = ptsim(capsys, "replay", D1, token, "--format", "count")
        assert code in (0, 1) and set(json.loads(out)) <= {"0", "1", "None"}
    finally:
        FORMATS.remove("count")


# -- tokens --------------------------------------------------------------------------------

def _buggy_token(capsys) -> str:
    code, out, _ = ptsim(capsys, "stress", D1, "--variant", "semi-rcu", "--runs", "100",
                         "--strategy", "pct", "--stop-on-first", "--json")
    assert code == 1
    return json.loads(out)["bugs"][0]["token"]


def test_adding_a_config_key_with_a_default_keeps_tokens_valid(capsys):
    token = _buggy_token(capsys)
    digest = load_scenario(D1).resolve("semi-rcu").digest()
    config_key("test_only_new_knob", (False, True), "a key added after the token was made")
    try:
        assert load_scenario(D1).resolve("semi-rcu").digest() == digest
        code, out, err = ptsim(capsys, "replay", D1, token)
        assert code == 1 and "BUG: pt-use-after-free" in out, err
        # Setting it to its non-default value is another scenario.
        changed = load_scenario(D1).resolve("semi-rcu", ["test_only_new_knob=true"])
        assert changed.digest() != digest
    finally:
        CONFIG.remove("test_only_new_knob")


def test_a_token_of_another_model_version_is_refused_saying_which(capsys):
    token = decode(_buggy_token(capsys))
    other = Token(token.digest, "1999.01.01", token.variant, token.overrides, token.choices)
    code, _, err = ptsim(capsys, "replay", D1, other.encode())
    assert code == 2 and err.count("\n") == 1
    assert f"model version 1999.01.01, this ptsim runs model version {MODEL_VERSION}" in err
    code, _, err = ptsim(capsys, "shrink", D1, other.encode())
    assert code == 2 and "model version 1999.01.01" in err


def test_a_format_1_token_is_refused_with_a_reason(capsys):
    code, _, err = ptsim(capsys, "replay", D1, "pts1.eNqrVkpWslJK9SvIinR1dMtycnSMyvcMci")
    assert code == 2 and "pts1" in err and "run the schedule again" in err


def test_the_token_hash_covers_the_model_version(monkeypatch):
    scn = load_scenario(D1).resolve("semi-rcu")
    before = scn.digest()
    monkeypatch.setattr("ptsim.scenario.MODEL_VERSION", "another")
    assert scn.digest() != before


# -- wait reasons describe themselves -----------------------------------------------------

async def test_a_folio_lock_deadlock_is_described_as_a_folio_lock_wait():
    """Two CPUs taking two folio locks in opposite orders (one lockdep class, so no lock-order
    report): the deadlock names the folio locks, not synchronize_rcu."""
    found = []
    for seed in range(20):
        m = bare_machine()
        mapping = mapping_of(m, "f0")

        def taker(first, second):
            async def take(cpu):
                await folio_lock(cpu, mapping, first)
                await folio_lock(cpu, mapping, second)
                await folio_unlock(cpu, mapping, second)
                await folio_unlock(cpu, mapping, first)
            return take

        sched = await run_threads(m, {0: taker(0x100, 0x200), 1: taker(0x200, 0x100)}, seed)
        if sched.bug is not None:
            found.append(sched.bug)
    assert found, "no schedule interleaved the two first locks"
    for bug in found:
        assert bug.kind == "deadlock"
        assert "sleeps on folio_lock(f0 pfn 0x200) held by CPU1" in bug.summary
        assert "sleeps on folio_lock(f0 pfn 0x100) held by CPU0" in bug.summary
        assert "synchronize_rcu" not in bug.summary


def test_a_tlbsync_wait_is_described_as_one():
    from ptsim.kernel_model.tlb import TlbSyncWait
    m = bare_machine()
    m.cpus[1].in_insn = True
    assert TlbSyncWait().describe(m) == \
        "waits in TLBSYNC for the hardware walks in flight on CPU1"


# -- hostile input -----------------------------------------------------------------------

def test_validate_dev_zero_ends_with_one_line(capsys):
    code, _, err = ptsim(capsys, "validate", "/dev/zero")
    assert code == 2 and err.count("\n") == 1 and "larger than" in err

