"""User modules: ops, patched kernel functions and strategies a user writes, loaded only with
--import, run through the CLI and the Python API alike; op-crash findings; scenario files stay
data."""

from __future__ import annotations

import builtins
import json
import sys
import textwrap

import pytest

import ptsim
from ptsim import usermods
from ptsim.cli import main
from ptsim.kernel_model.registry import forget_module

from conftest import D1, SCENARIOS

MODULE = '''
import ptsim
from ptsim import Addr, Size
from ptsim.kernel_model.pagetable import entry_pfn
from ptsim.kernel_model.pgalloc import pte_free


@ptsim.op("touch_twice")
async def touch_twice(cpu, *, addr: Addr, len: Size = 4096, write: bool = False):
    """touch, twice."""
    for _ in range(2):
        await ptsim.run_op(cpu, "touch", addr=addr, len=len, write=write)


@ptsim.op("touch_once")
async def touch_once(cpu, *, addr: Addr, len: Size = 4096, write: bool = False):
    """touch, replaced: once, and it says so in the log."""
    cpu.m.ev(cpu, "touched_by_the_patch")
    await ptsim.run_op(cpu, "touch", addr=addr, len=len, write=write)


@ptsim.kfunc("free_pte", replaces=True)
async def free_pte_now(cpu, mm, addr, tlb, pmdval):
    """free_pte without the gather."""
    cpu.m.ev(cpu, "free_pte_now")
    await pte_free(cpu, entry_pfn(pmdval))
    mm.nr_ptes -= 1


@ptsim.op("crashing")
async def crashing(cpu, *, addr: Addr):
    """Touches a page, then divides by zero."""
    await ptsim.run_op(cpu, "touch", addr=addr)
    return {}["no such key"]
'''

SCENARIO = '''
[scenario]
name = "user module"
cpus = 2
max_steps = 20000

[[vma]]
start = 0x7f0000000000
size = "2M"
populate = true

[[agent]]
cpu = 0
op = "madvise_dontneed"
addr = 0x7f0000000000
len = "2M"

[[agent]]
cpu = 1
op = "touch_twice"
addr = 0x7f0000000000
len = "16K"

[[variant]]
name = "mainline"

[[variant]]
name = "free-now"
replace = { free_pte = "free_pte_now" }
expect = ["tlb-use-after-free"]

[[variant]]
name = "touch-once"
replace = { touch_twice = "touch_once" }

[expect]
runs = 200
strategy = "pct"
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user module and a scenario using it, in a temporary directory (the current one)."""
    (tmp_path / "mymod.py").write_text(MODULE)
    (tmp_path / "mine.toml").write_text(SCENARIO)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    forget_module("mymod")
    usermods.LOADED.pop("mymod", None)
    sys.modules.pop("mymod", None)


def ptsim_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_without_import_the_op_is_unknown_and_says_how(user, capsys):
    code, _, err = ptsim_cli(capsys, "validate", "mine.toml")
    assert code == 2 and err.count("\n") == 1
    assert 'agent[1].op: unknown op "touch_twice" (registered: ' in err
    assert "load your module with --import" in err


def test_imported_ops_are_listed_and_validated(user, capsys):
    code, out, _ = ptsim_cli(capsys, "list", "ops", "--json", "--import", "mymod.py")
    ops = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and ops["touch_twice"]["doc"] == "touch, twice."
    assert ops["touch_twice"]["params"][0] == {"name": "addr", "type": "addr"}
    assert ptsim_cli(capsys, "validate", "mine.toml", "--import", "mymod.py")[0] == 0


def test_a_patched_kernel_function_replaces_nested_calls(user, capsys):
    code, out, _ = ptsim_cli(capsys, "stress", "mine.toml", "--import", "mymod.py",
                             "--variant", "free-now", "--runs", "200", "--strategy", "pct",
                             "--json")
    bug = json.loads(out)["bugs"][0]
    assert code == 1 and bug["kind"] == "tlb-use-after-free"
    sc = ptsim.load("mine.toml", imports=["mymod.py"])
    log = sc.variant("free-now").replay(bug["token"]).events()
    assert any(ev["event"] == "free_pte_now" for ev in log)  # called from try_get_and_clear's path
    assert not any(ev["event"] == "free_pte_now"
                   for ev in sc.variant("mainline").run(seed=3).events())
    assert not sc.variant("mainline").stress(runs=200, strategy="pct").bugs


def test_a_replaced_top_level_op_runs_the_replacement(user):
    sc = ptsim.load("mine.toml", imports=["mymod.py"])
    patched = [ev["event"] for ev in sc.variant("touch-once").run(seed=1).events()]
    plain = [ev["event"] for ev in sc.variant("mainline").run(seed=1).events()]
    assert "touched_by_the_patch" in patched and "touched_by_the_patch" not in plain


def test_jobs_2_gives_the_one_process_result_with_user_modules(user, capsys):
    argv = ["stress", "mine.toml", "--import", "mymod.py", "--variant", "free-now", "--runs",
            "150", "--strategy", "pct", "--json"]
    one = json.loads(ptsim_cli(capsys, *argv)[1])
    two = json.loads(ptsim_cli(capsys, *argv, "--jobs", "2")[1])
    one.pop("elapsed_s")
    two.pop("elapsed_s")
    assert one == two and one["bugs"]


def test_tokens_carry_the_module_and_its_hash(user, capsys):
    code, out, _ = ptsim_cli(capsys, "stress", "mine.toml", "--import", "mymod.py", "--variant",
                             "free-now", "--runs", "200", "--strategy", "pct")
    assert code == 1 and "replay: ptsim replay mine.toml pts2." in out
    assert "--import mymod.py" in out
    token = out.split("token: ")[1].split()[0]
    assert ptsim_cli(capsys, "replay", "mine.toml", token, "--import", "mymod.py")[0] == 1
    forget_module("mymod")
    usermods.LOADED.pop("mymod")
    sys.modules.pop("mymod")
    code, _, err = ptsim_cli(capsys, "replay", "mine.toml", token)
    assert code == 2 and "made with user module mymod; load it with --import" in err
    (user / "mymod.py").write_text(MODULE + "\n# a later edit\n")
    code, _, err = ptsim_cli(capsys, "replay", "mine.toml", token, "--import", "mymod.py")
    assert code == 2 and "user module mymod has changed since the token was made" in err


def test_an_op_that_raises_is_an_op_crash_finding(user, capsys):
    text = SCENARIO.replace('op = "touch_twice"', 'op = "crashing"').replace(
        'len = "16K"\n\n[[variant]]', '\n[[variant]]', 1)
    (user / "crash.toml").write_text(text)
    code, out, _ = ptsim_cli(capsys, "stress", "crash.toml", "--import", "mymod.py",
                             "--variant", "mainline", "--runs", "20", "--json")
    data = json.loads(out)
    assert code == 1 and data["runs"] == 20  # stress goes on after a crash
    crash = data["bugs"][0]
    assert crash["kind"] == "op-crash" and crash["count"] == 20
    assert "KeyError" in crash["summary"] and "CPU1" in crash["summary"]
    code, out, _ = ptsim_cli(capsys, "replay", "crash.toml", crash["token"], "--import",
                             "mymod.py")
    assert code == 1 and "BUG: op-crash" in out
    assert "mymod.py:" in out and "in crashing" in out  # the op's traceback
    assert "KeyError: 'no such key'" in out


@pytest.mark.parametrize("source,message", [
    ("def broken(:\n", "mymod.py: line 1: "),
    ("raise RuntimeError('no')\n", "mymod.py: RuntimeError: no"),
    ("import ptsim\n@ptsim.op('touch')\nasync def touch(cpu, *, addr: ptsim.Addr):\n    pass\n",
     "op 'touch' is declared twice"),
])
def test_a_module_that_fails_to_load_is_one_line(user, capsys, source, message):
    (user / "mymod.py").write_text(source)
    code, _, err = ptsim_cli(capsys, "validate", str(SCENARIOS / "d01_semi_rcu_single_free.toml"),
                             "--import", "mymod.py")
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    with pytest.raises(ptsim.ScenarioError, match="mymod.py"):
        ptsim.load(D1, imports=["mymod.py"])


def test_a_missing_module_file_is_one_line(user, capsys):
    code, _, err = ptsim_cli(capsys, "list", "ops", "--import", "nope.py")
    assert code == 2 and "--import nope.py: cannot read" in err


def test_a_replacement_must_fit_its_target(user, capsys):
    bad = SCENARIO.replace('replace = { free_pte = "free_pte_now" }',
                           'replace = { free_pte = "touch_once" }')
    (user / "bad.toml").write_text(bad)
    code, _, err = ptsim_cli(capsys, "validate", "bad.toml", "--import", "mymod.py")
    assert code == 2 and "variant[1].replace.free_pte: no replacement 'touch_once'" in err
    wrong = textwrap.dedent('''
        import ptsim

        @ptsim.kfunc("free_pte", replaces=True)
        async def free_pte_wrong(cpu, mm, addr):
            pass
        ''')
    (user / "wrong.py").write_text(wrong)
    (user / "bad.toml").write_text(SCENARIO.replace('"free_pte_now"', '"free_pte_wrong"'))
    try:
        code, _, err = ptsim_cli(capsys, "validate", "bad.toml", "--import", "mymod.py",
                                 "--import", "wrong.py")
        assert code == 2 and "free_pte_wrong takes (cpu, mm, addr) but free_pte takes" in err
    finally:
        forget_module("wrong")
        usermods.LOADED.pop("wrong", None)
        sys.modules.pop("wrong", None)


def test_scenario_files_stay_data(monkeypatch):
    """Loading and resolving every shipped scenario imports nothing and evaluates no code."""
    import importlib

    before = set(sys.modules)
    calls = []
    for name in ("exec", "eval", "compile", "__import__"):
        real = getattr(builtins, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(builtins, name, spy)
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: calls.append("import"))
    paths = sorted(SCENARIOS.glob("*.toml"))
    calls.clear()  # monkeypatch's own imports above
    for path in paths:
        sf = ptsim.scenario.load_scenario(path)
        for name in sf.variant_names():
            sf.resolve(None if not sf.variants else name)
    monkeypatch.undo()
    assert calls == [] and set(sys.modules) == before
    text = (SCENARIOS / "d01_semi_rcu_single_free.toml").read_text()
    for key in ('import = "os"', 'code = "print(1)"'):
        with pytest.raises(ptsim.ScenarioError, match="unknown key"):
            ptsim.loads(text.replace("[scenario]\n", f"[scenario]\n{key}\n", 1))
