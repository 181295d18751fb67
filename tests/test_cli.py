"""The command line as SPEC fixes it: exit codes, JSON, tokens, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptsim.cli import main

from conftest import D1, D10, ROOT


def ptsim(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stress_json(capsys, *argv) -> dict:
    code, out, _ = ptsim(capsys, "stress", *argv, "--json")
    data = json.loads(out)
    assert code == (1 if data["bugs"] else 0)
    return data


def test_stress_json_shape_and_bug(capsys):
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "200", "--strategy", "pct")
    # D1 models 6.14 and its semi-rcu variant is counterfactual: the two additive kernel keys.
    assert set(data) == {"scenario", "variant", "strategy", "runs", "steps", "elapsed_s", "bugs",
                         "hazards", "kernel", "counterfactual"}
    assert data["kernel"] == "6.17" and data["counterfactual"]
    assert data["variant"] == "semi-rcu" and data["runs"] == 200 and data["steps"] > 0
    (bug,) = data["bugs"]
    assert bug["kind"] == "pt-use-after-free" and bug["count"] >= 1
    assert bug["seed"] == bug["first_run"]  # default --seed 0
    assert set(bug) == {"kind", "count", "first_run", "seed", "token", "summary", "shrunk"}
    assert set(bug["shrunk"]) == {"token", "steps", "preemptions"}
    assert bug["shrunk"]["token"].startswith("pts2.") and bug["shrunk"]["steps"] > 0


def test_run_seed_b_plus_i_equals_stress_run_i(capsys):
    base = 40
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "120", "--seed", str(base),
                       "--strategy", "pct")
    (bug,) = data["bugs"]
    assert bug["seed"] == base + bug["first_run"]
    code, out, _ = ptsim(capsys, "run", D1, "--variant", "semi-rcu", "--seed", str(bug["seed"]),
                         "--strategy", "pct", "--json")
    single = json.loads(out)
    assert code == 1
    assert single["bugs"][0]["token"] == bug["token"]
    assert single["bugs"][0]["summary"] == bug["summary"]
    assert single["stats"]["mm0"]["nr_ptes"] >= 0


def test_stop_on_first_stops(capsys):
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "500", "--strategy", "pct",
                       "--stop-on-first")
    assert data["runs"] == data["bugs"][0]["first_run"] + 1


def test_every_printed_report_replays_from_its_token(capsys):
    code, out, _ = ptsim(capsys, "stress", D10, "--variant", "page-broadcast", "--runs", "100",
                         "--strategy", "pct")
    assert code == 1
    tokens = {line.split("token: ", 1)[1].strip() for line in out.splitlines()
              if line.startswith("token: ")}
    assert tokens
    for token in tokens:
        code, out, _ = ptsim(capsys, "replay", D10, token)
        assert code == 1 and "BUG: pt-use-after-free" in out


def test_replay_exits_zero_when_the_schedule_has_no_bug(capsys):
    code, out, _ = ptsim(capsys, "run", D1, "--variant", "full-rcu", "--seed", "3", "--json")
    assert code == 0
    from ptsim.engine import Engine
    from ptsim.scenario import load_scenario
    e = Engine(load_scenario(D1).resolve("full-rcu"))
    token = e.token(e.run_seed(3).choices)
    code, out, _ = ptsim(capsys, "replay", D1, token)
    assert code == 0 and "no bug" in out


def _replay_in_subprocess(token: str, tmp: Path, name: str) -> bytes:
    log = tmp / name
    env = dict(os.environ, PYTHONHASHSEED=name)  # different hash seeds: order must not leak in
    proc = subprocess.run([sys.executable, "-m", "ptsim", "replay", D1, token, "--log", str(log)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    return log.read_bytes()


def test_a_token_replays_to_the_same_log_bytes_in_two_processes(capsys, tmp_path):
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "300", "--strategy", "pct")
    token = data["bugs"][0]["token"]
    first = _replay_in_subprocess(token, tmp_path, "1")
    second = _replay_in_subprocess(token, tmp_path, "2")
    assert first == second
    lines = [json.loads(line) for line in first.decode().splitlines()]
    assert lines and all({"step", "cpu", "event", "func"} <= set(rec) for rec in lines)
    assert b"0x7f" not in first or b" at 0x" not in first  # no Python object addresses


def test_run_log_matches_replay_log(capsys, tmp_path):
    run_log, replay_log = tmp_path / "run.jsonl", tmp_path / "replay.jsonl"
    seed = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "300",
                       "--strategy", "pct")["bugs"][0]["seed"]
    code, out, _ = ptsim(capsys, "run", D1, "--variant", "semi-rcu", "--seed", str(seed),
                         "--strategy", "pct", "--log", str(run_log), "--json")
    token = json.loads(out)["bugs"][0]["token"]
    ptsim(capsys, "replay", D1, token, "--log", str(replay_log))
    assert run_log.read_bytes() == replay_log.read_bytes()


def test_replay_formats(capsys):
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "300", "--strategy", "pct")
    token = data["bugs"][0]["token"]
    code, out, _ = ptsim(capsys, "replay", D1, token, "--format", "ftrace")
    assert code == 1 and out.startswith("cpus=")
    code, out, _ = ptsim(capsys, "replay", D1, token, "--format", "json")
    assert code == 1 and all(json.loads(line)["event"] for line in out.splitlines())
    code, out, _ = ptsim(capsys, "replay", D1, token, "--format", "perfetto")
    trace = json.loads(out)["traceEvents"]
    assert code == 1 and {e["tid"] for e in trace if e["ph"] == "i"} <= {0, 1, 2}
    assert [e["ts"] for e in trace if e["ph"] == "i"] == sorted(e["ts"] for e in trace
                                                               if e["ph"] == "i")


def test_stress_out_writes_one_line_per_schedule(capsys, tmp_path):
    out = tmp_path / "runs.jsonl"
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "60", "--seed", "5",
                       "--strategy", "pct", "--out", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["run"] for line in lines] == list(range(60))
    assert [line["seed"] for line in lines] == list(range(5, 65))
    buggy = [line for line in lines if line["bugs"]]
    assert len(buggy) == data["bugs"][0]["count"]
    assert buggy[0]["token"] == data["bugs"][0]["token"]


def test_check_passes_on_the_shipped_catalogue(capsys):
    code, out, _ = ptsim(capsys, "check", str(ROOT / "scenarios"))
    assert code == 0, out
    assert "FAILS" not in out and out.count("holds") >= 6


def test_check_fails_when_an_expectation_does_not_hold(capsys, tmp_path):
    text = Path(D1).read_text().replace('expect = []', 'expect = ["pt-use-after-free"]', 1)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(text.replace("runs = 300", "runs = 30"))
    code, out, _ = ptsim(capsys, "check", str(wrong))
    assert code == 1 and "FAILS" in out and "missing" in out


def test_validate_accepts_the_catalogue(capsys):
    files = sorted(str(p) for p in (ROOT / "scenarios").glob("*.toml"))
    code, out, _ = ptsim(capsys, "validate", *files)
    assert code == 0 and out.count("ok ") == len(files)


# -- bad input: exit 2, one line on stderr, never a traceback ------------------------------------

def _scenario(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


GOOD = Path(D1).read_text()

BAD_FILES = {
    "syntax": GOOD.replace("cpus = 2", "cpus = = 2"),
    "unknown key": GOOD.replace("cpus = 2", "cpus = 2\ncolour = 1"),
    "wrong type": GOOD.replace("cpus = 2", 'cpus = "two"'),
    "out of range": GOOD.replace("max_steps = 20000", "max_steps = 0"),
    "cpu beyond cpus": GOOD.replace("cpu = 1", "cpu = 2"),
    "overlapping vmas": GOOD.replace("[[setup]]",
                                     '[[vma]]\nstart = 0x7f0000100000\nsize = "1M"\n\n[[setup]]',
                                     1),
    "outside every vma": GOOD.replace("addr = 0x7f0000000000\n\n[[variant]]",
                                      "addr = 0x7f0000400000\n\n[[variant]]"),
    "unaligned": GOOD.replace('len = "2M"', "len = 1000"),
    "bad config value": GOOD.replace('table_free = "semi_rcu"\n\n[faults]',
                                     'table_free = "sometimes"\n\n[faults]'),
    "bad probability": GOOD.replace("table_batch_alloc_fail = 1.0", "table_batch_alloc_fail = 1.5"),
    "unknown op": GOOD.replace('op = "pte_walker"', 'op = "pte_stroller"'),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("command", ["validate", "run", "stress", "check"])
def test_bad_scenario_files_exit_2_with_one_line(capsys, tmp_path, case, command):
    path = _scenario(tmp_path, BAD_FILES[case])
    argv = [command, path] + (["--runs", "2"] if command == "stress" else [])
    code, out, err = ptsim(capsys, *argv)
    assert code == 2, (case, out, err)
    assert err.count("\n") == 1 and "bad.toml" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["run", D1, "--variant", "no-such-variant"],
    ["run", D1, "--set", "table_free=sometimes"],
    ["run", D1, "--set", "no_such_key=1"],
    ["run", D1, "--set", "faults.need_resched=2"],
    ["run", str(ROOT / "no-such-file.toml")],
    ["replay", D1, "not-a-token"],
    ["replay", D1, "pts1.AAAA"],
    ["check", str(ROOT / "no-such-dir")],
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv):
    code, out, err = ptsim(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_token_for_another_scenario_or_variant_exits_2(capsys, tmp_path):
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "300", "--strategy", "pct")
    token = data["bugs"][0]["token"]
    edited = _scenario(tmp_path, GOOD.replace("max_steps = 20000", "max_steps = 20001"))
    code, _, err = ptsim(capsys, "replay", edited, token)
    assert code == 2 and "another scenario" in err
    code, _, err = ptsim(capsys, "replay", D1, token, "--variant", "full-rcu")
    assert code == 2 and "variant" in err
    code, _, err = ptsim(capsys, "replay", D1, token, "--set", "table_free=rcu")
    assert code == 2 and "overrides" in err


def test_diverging_token_names_the_step(capsys, tmp_path):
    from ptsim.token import Token, decode
    data = stress_json(capsys, D1, "--variant", "semi-rcu", "--runs", "300", "--strategy", "pct")
    token = decode(data["bugs"][0]["token"])
    broken = Token(token.digest, token.model, token.variant, token.overrides,
                   token.choices[:3]).encode()
    code, _, err = ptsim(capsys, "replay", D1, broken)
    assert code == 2 and "diverges" in err and "step" in err
    bad_choice = Token(token.digest, token.model, token.variant, token.overrides,
                       (9,) + token.choices[1:]).encode()
    code, _, err = ptsim(capsys, "replay", D1, bad_choice)
    assert code == 2 and "impossible at step" in err


def test_not_modelled_passes_validate_and_run_exits_2(capsys, tmp_path):
    path = _scenario(tmp_path, GOOD.replace('type = "anon"', 'type = "anon"\nuffd_wp = true'))
    assert ptsim(capsys, "validate", path)[0] == 0
    code, _, err = ptsim(capsys, "run", path)
    assert code == 2 and "not modelled yet" in err and "uffd_wp" in err
    path = _scenario(tmp_path, GOOD.replace('type = "anon"',
                                            'type = "shmem"\nfile = "f0"\nuffd_wp = true'))
    code, _, err = ptsim(capsys, "stress", path, "--runs", "2")
    assert code == 2 and "not modelled yet" in err and err.count("\n") == 1


def test_a_path_not_modelled_met_during_a_run_exits_2(capsys, tmp_path):
    """A read fault maps the huge zero page; zapping half of it would need __split_huge_pmd."""
    text = GOOD.replace('type = "anon"', 'type = "anon"\nthp = true').replace(
        'op = "pte_walker"\naddr = 0x7f0000000000', 'op = "touch"\naddr = 0x7f0000000000')
    text = text.replace('len = "16K"\nwrite = true', 'len = "16K"')
    text = text.replace('op = "madvise_dontneed"\naddr = 0x7f0000000000\nlen = "2M"',
                        'op = "madvise_dontneed"\naddr = 0x7f0000000000\nlen = "1M"')
    path = _scenario(tmp_path, text)
    code, _, err = ptsim(capsys, "run", path, "--variant", "full-rcu")
    assert code == 2 and "not modelled yet" in err and "split" in err and "Traceback" not in err


def test_missing_command_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_ctrl_c_inside_a_cpu_task_exits_130_without_a_traceback(capsys, monkeypatch):
    """Ctrl-C lands in whichever CPU task runs; trio's nursery wraps it in a group."""
    from ptsim.sched import Sched
    choose = Sched.choose
    calls = [0]

    def interrupted_choose(self, cur):
        calls[0] += 1
        if calls[0] == 500:
            raise KeyboardInterrupt
        return choose(self, cur)

    monkeypatch.setattr(Sched, "choose", interrupted_choose)
    code, out, err = ptsim(capsys, "stress", D1, "--variant", "full-rcu", "--runs", "100", "--json")
    assert code == 130 and "interrupted after" in err and "Traceback" not in err
    assert json.loads(out)["runs"] < 100


def test_ctrl_c_during_stress_prints_what_finished_and_exits_130(capsys, monkeypatch):
    from ptsim.engine import Engine
    real = Engine.run_seeds

    def interrupted_after_some(self, seeds, strategy="random", depth=3, on_result=None,
                               stop_on_first=False):
        def counting(result):
            on_result(result)
            if result.seed == 24:
                raise KeyboardInterrupt
        return real(self, seeds, strategy, depth, counting, stop_on_first)

    monkeypatch.setattr(Engine, "run_seeds", interrupted_after_some)
    code, out, err = ptsim(capsys, "stress", D1, "--variant", "full-rcu", "--runs", "100", "--json")
    assert code == 130 and json.loads(out)["runs"] == 25 and "interrupted after 25" in err


def test_run_says_the_hazards_a_schedule_showed(capsys):
    d9 = str(ROOT / "scenarios" / "d09_mixed_tlb_sizes_after_reclaim.toml")
    code, out, _ = ptsim(capsys, "run", d9, "--variant", "no-flush-before-set-pmd", "--seed", "1",
                         "--strategy", "pct")
    assert code == 0 and "no bug" in out and "hazard mixed-tlb-sizes at step" in out


@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]])
def test_time_cuts_stress_short_at_a_prefix_of_runs(capsys, tmp_path, jobs):
    out = tmp_path / "runs.jsonl"
    code, stdout, _ = ptsim(capsys, "stress", D1, "--variant", "full-rcu", "--runs", "10000000",
                            "--time", "1s", "--json", "--out", str(out), *jobs)
    data = json.loads(stdout)
    assert code == 0 and data["cut_short"] is True and 0 < data["runs"] < 10000000
    assert [json.loads(line)["run"] for line in out.read_text().splitlines()] == \
        list(range(data["runs"]))


def test_time_cuts_explore_short_and_says_so(capsys):
    d10 = str(ROOT / "scenarios" / "d10_gup_fast_vs_page_free.toml")
    code, stdout, _ = ptsim(capsys, "explore", d10, "--variant", "page-ipi", "--preemptions", "6",
                            "--time", "1s")
    assert code == 0 and "cut short by --time" in stdout
    with pytest.raises(SystemExit) as exc:
        main(["explore", d10, "--variant", "page-ipi", "--time", "0"])
    assert exc.value.code == 2 and "not a positive duration" in capsys.readouterr().err
