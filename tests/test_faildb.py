"""The failure database (--db): findings recorded per scenario digest, replayed first next run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ptsim.engine import Engine
from ptsim.faildb import FailureDb, record_tally, replay_known
from ptsim.kernel_model import MODEL_VERSION
from ptsim.results import Tally
from ptsim.scenario import load_scenario
from ptsim.token import Token, decode

from conftest import D1

KIND = "pt-use-after-free"


def d1_engine() -> Engine:
    return Engine(load_scenario(D1).resolve("semi-rcu"))


def stress(engine: Engine, runs: int = 300) -> Tally:
    tally = Tally()
    for i, result in enumerate(engine.run_seeds(range(runs), "pct")):
        tally.add(i, result, engine)
    return tally


def seeded(tally: Tally) -> tuple:
    """What --db must leave alone: runs, steps, and every bug and hazard entry (first_run,
    count, seed, token, summary)."""
    return tally.runs, tally.steps, tally.bugs, tally.hazards


@pytest.fixture(scope="module")
def found() -> tuple[Engine, Tally]:
    engine = d1_engine()
    tally = stress(engine)
    assert KIND in tally.bugs
    return engine, tally


def test_record_reopen_known_and_replay(found, tmp_path):
    engine, tally = found
    directory = tmp_path / "db"
    assert record_tally(FailureDb(directory), engine, tally) == 1
    token = tally.bugs[KIND]["token"]

    db = FailureDb(directory)  # a new run opens it again
    assert db.known(engine.digest) == [{"kind": KIND, "token": token}]
    assert db.known("0123456789abcdef") == []
    assert replay_known(db, d1_engine()) == [{"kind": KIND, "token": token, "reproduces": True}]

    assert db.record(engine.digest, KIND, token) is False
    assert record_tally(db, engine, tally) == 0
    assert db.known(engine.digest) == [{"kind": KIND, "token": token}]


def test_file_is_one_deterministic_json_per_digest(found, tmp_path):
    engine, tally = found
    db = FailureDb(tmp_path)
    record_tally(db, engine, tally)
    path = tmp_path / f"{engine.digest}.json"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left over
    text = path.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    assert doc["digest"] == engine.digest
    assert doc["findings"] == [{"kind": KIND, "token": tally.bugs[KIND]["token"]}]

    again = FailureDb(tmp_path / "again")
    record_tally(again, engine, tally)
    assert (tmp_path / "again" / path.name).read_text() == text


def test_known_keeps_the_order_first_recorded(tmp_path):
    db = FailureDb(tmp_path)
    digest = "00ff00ff00ff00ff"
    assert db.record(digest, "b-kind", "t1") is True
    assert db.record(digest, "a-kind", "t2") is True
    assert db.record(digest, "a-kind", "t1") is True  # same token, another kind: distinct
    assert db.record(digest, "b-kind", "t1") is False
    assert db.known(digest) == [{"kind": "b-kind", "token": "t1"},
                                {"kind": "a-kind", "token": "t2"},
                                {"kind": "a-kind", "token": "t1"}]


def test_replaying_known_tokens_leaves_the_seeded_result_alone(found, tmp_path):
    engine, tally = found
    db = FailureDb(tmp_path)
    record_tally(db, engine, tally)
    again = d1_engine()
    assert [k["reproduces"] for k in replay_known(db, again)] == [True]
    assert seeded(stress(again)) == seeded(tally)


def test_a_kind_the_schedule_no_longer_shows_is_reported_not_dropped(found, tmp_path):
    engine, tally = found
    token = tally.bugs[KIND]["token"]
    hazards = Tally(hazards={"made-up-hazard": {"kind": "made-up-hazard", "first_run": 0,
                                                "token": token}})
    db = FailureDb(tmp_path)
    assert record_tally(db, engine, tally) == 1
    assert record_tally(db, engine, hazards) == 1
    assert replay_known(db, engine) == [
        {"kind": KIND, "token": token, "reproduces": True},
        {"kind": "made-up-hazard", "token": token, "reproduces": False}]
    assert len(db.known(engine.digest)) == 2


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'{"findings": 3}',
                                     b"\xff\xfe\x00garbage"])
def test_a_corrupt_file_counts_as_empty_and_is_rewritten(found, tmp_path, content):
    engine, tally = found
    db = FailureDb(tmp_path)
    path = tmp_path / f"{engine.digest}.json"
    path.write_bytes(content)
    assert db.known(engine.digest) == []
    assert replay_known(db, engine) == []
    assert record_tally(db, engine, tally) == 1
    doc = json.loads(path.read_text())
    assert doc["findings"] == [{"kind": KIND, "token": tally.bugs[KIND]["token"]}]


def test_damaged_entries_are_skipped(tmp_path):
    db = FailureDb(tmp_path)
    digest = "0123456789abcdef"
    (tmp_path / f"{digest}.json").write_text(json.dumps({"findings": [
        {"kind": "k", "token": "t"}, {"kind": 3, "token": "u"}, "x", {"kind": "k"},
        {"kind": "k", "token": "t"}]}))
    assert db.known(digest) == [{"kind": "k", "token": "t"}]


def test_an_unreadable_file_counts_as_empty(found, tmp_path):
    engine, tally = found
    path = tmp_path / f"{engine.digest}.json"
    path.mkdir()  # cannot be read as a file, whoever runs the test
    db = FailureDb(tmp_path)
    assert db.known(engine.digest) == []
    assert replay_known(db, engine) == []


def test_tokens_that_no_longer_fit_are_dropped(found, tmp_path):
    engine, tally = found
    good = tally.bugs[KIND]["token"]
    t = decode(good)
    assert t.model == MODEL_VERSION
    old_model = replace(t, model="0").encode()
    other_scenario = replace(t, digest="fedcba9876543210").encode()
    diverges = replace(t, choices=t.choices + (0,) * 20).encode()
    db = FailureDb(tmp_path)
    for token in (old_model, good, other_scenario, "pts2.not-a-token", diverges):
        assert db.record(engine.digest, KIND, token) is True
    assert replay_known(db, engine) == [{"kind": KIND, "token": good, "reproduces": True}]
    assert db.known(engine.digest) == [{"kind": KIND, "token": good}]


def test_a_token_built_for_another_model_version_is_dropped(found, tmp_path):
    engine, _ = found
    token = Token(engine.digest, "0", engine.scn.variant, tuple(engine.scn.overrides),
                  (0, 1, 0), engine.modules).encode()
    db = FailureDb(tmp_path)
    assert db.record(engine.digest, KIND, token) is True
    assert replay_known(db, engine) == []
    assert db.known(engine.digest) == []


def test_the_directory_is_made_on_the_first_write(tmp_path, monkeypatch):
    directory = tmp_path / "a" / "b"
    db = FailureDb(directory)
    assert db.known("abcdef0123456789") == []
    assert not directory.exists()
    assert db.record("abcdef0123456789", "k", "t") is True
    assert (directory / "abcdef0123456789.json").is_file()

    monkeypatch.chdir(tmp_path)
    assert FailureDb().record("abcdef0123456789", "k", "t") is True
    assert (tmp_path / ".ptsim" / "abcdef0123456789.json").is_file()


@pytest.mark.parametrize("digest", ["", "../escape", "abc/def", "not-hex"])
def test_a_digest_is_hex(tmp_path, digest):
    with pytest.raises(ValueError):
        FailureDb(tmp_path).known(digest)


def test_cli_db_replays_known_findings_first_and_keeps_the_seeded_result(tmp_path, capsys):
    from ptsim.cli import main

    db = str(tmp_path / "db")
    argv = ["stress", D1, "--variant", "semi-rcu", "--runs", "100", "--strategy", "pct",
            "--json", "--no-shrink"]
    assert main(argv) == 1
    plain = json.loads(capsys.readouterr().out)
    assert main(argv + ["--db", db]) == 1
    first = json.loads(capsys.readouterr().out)
    assert first["known"] == []
    assert main(argv + ["--db", db]) == 1
    second = json.loads(capsys.readouterr().out)
    assert [(k["kind"], k["reproduces"]) for k in second["known"]] == \
        [("pt-use-after-free", True)]
    for doc in (plain, first, second):
        doc.pop("elapsed_s")
        doc.pop("known", None)
    assert plain == first == second  # the seeded result is computed as without the db
    assert main(["explore", D1, "--variant", "semi-rcu", "--preemptions", "1", "--json",
                 "--db", db]) == 1
    assert json.loads(capsys.readouterr().out)["known"]
    assert main(["check", D1, "--db", db]) == 0
    assert "known pt-use-after-free: reproduces" in capsys.readouterr().out
