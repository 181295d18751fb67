"""The failure database: ``stress``, ``explore`` and ``check`` with ``--db [DIR]``.

It records each distinct finding (kind, token) keyed by the scenario's digest (Engine.digest),
one JSON file per digest under the directory (``.ptsim/`` unless told). On the next run of that
scenario the recorded tokens are replayed first (:func:`replay_known`) and reported as a list
of their own; the seeded search then runs exactly as it would without the database, so its
runs, bugs, hazards, first_run and steps do not change. :func:`record_tally` adds what the run
found.

A file is ``{"digest": ..., "findings": [{"kind": ..., "token": ...}, ...], "version": 1}``
with its keys sorted and its findings in the order first recorded. It is written atomically
(a temporary file in the same directory, then os.replace). A file that is corrupt or cannot be
read counts as empty and is rewritten by the next write; reading never raises. The directory is
made on the first write.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

from ptsim.kernel_model import MODEL_VERSION
from ptsim.kernel_model.errors import NotModelled

from .strategies import Divergence
from .token import TokenError, decode

__all__ = ["DEFAULT_DIR", "FailureDb", "record_tally", "replay_known"]

DEFAULT_DIR = ".ptsim"
FORMAT_VERSION = 1
_HEX = frozenset(string.hexdigits)


class FailureDb:
    """Findings per scenario digest, one JSON file each under ``directory``."""

    def __init__(self, directory: str | os.PathLike = DEFAULT_DIR) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"FailureDb({str(self.directory)!r})"

    def path(self, digest: str) -> Path:
        """The file that holds ``digest``'s findings (a digest is hex: Engine.digest)."""
        if not digest or not set(digest) <= _HEX:
            raise ValueError(f"a scenario digest is a hex string, not {digest!r}")
        return self.directory / f"{digest.lower()}.json"

    def known(self, digest: str) -> list[dict]:
        """The findings recorded for ``digest``, each ``{"kind", "token"}``, in the order first
        recorded; [] when there is no file or it cannot be read or parsed."""
        return [dict(entry) for entry in self._load(digest)]

    def record(self, digest: str, kind: str, token: str) -> bool:
        """Add one finding; False (and nothing written) if that (kind, token) is already there."""
        return self.record_many(digest, [(kind, token)]) == 1

    def record_many(self, digest: str, findings) -> int:
        """Add (kind, token) pairs in one write; the number that were new."""
        entries = self._load(digest)
        seen = {(e["kind"], e["token"]) for e in entries}
        added = 0
        for kind, token in findings:
            if not isinstance(kind, str) or not isinstance(token, str):
                raise TypeError("a finding's kind and token are strings")
            if (kind, token) not in seen:
                seen.add((kind, token))
                entries.append({"kind": kind, "token": token})
                added += 1
        if added:
            self._store(digest, entries)
        return added

    def forget(self, digest: str, tokens) -> int:
        """Drop every finding whose token is in ``tokens`` (of any kind); the number dropped.
        A corrupt file is rewritten even when nothing matched it."""
        drop = set(tokens)
        entries = self._load(digest)
        kept = [e for e in entries if e["token"] not in drop]
        if len(kept) != len(entries) or self._unreadable(digest):
            self._store(digest, kept)
        return len(entries) - len(kept)

    def _read(self, digest: str) -> list[dict] | None:
        """The findings in ``digest``'s file; [] without a file, None if it is unusable."""
        path = self.path(digest)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError):
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("findings"), list):
            return None
        entries, seen = [], set()
        for item in doc["findings"]:
            if not (isinstance(item, dict) and isinstance(item.get("kind"), str)
                    and isinstance(item.get("token"), str)):
                continue  # a damaged entry: skipped, and gone at the next write
            pair = (item["kind"], item["token"])
            if pair not in seen:
                seen.add(pair)
                entries.append({"kind": pair[0], "token": pair[1]})
        return entries

    def _load(self, digest: str) -> list[dict]:
        entries = self._read(digest)
        return [] if entries is None else entries

    def _unreadable(self, digest: str) -> bool:
        return self._read(digest) is None

    def _store(self, digest: str, entries: list[dict]) -> None:
        path = self.path(digest)
        doc = {"digest": digest.lower(), "findings": entries, "version": FORMAT_VERSION}
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def replay_known(db: FailureDb, engine) -> list[dict]:
    """Replay every finding recorded for ``engine.digest``, in the order recorded.

    Each entry comes back as ``{"kind", "token", "reproduces"}``; ``reproduces`` is True when
    the replayed schedule shows that kind again (as its bug or one of its hazards). A token
    that no longer fits is dropped from the database and not returned: one that cannot be
    decoded, was made under another model version or for another digest, or diverges on replay
    (or now reaches something the model does not cover). A token recorded under several kinds is
    replayed once. Nothing here changes what the engine's seeded schedules do.
    """
    outcomes: dict[str, set[str] | None] = {}  # token -> kinds its schedule shows; None: drop
    results = []
    for entry in db.known(engine.digest):
        token = entry["token"]
        if token not in outcomes:
            outcomes[token] = _replay(engine, token)
        shown = outcomes[token]
        if shown is not None:
            results.append({"kind": entry["kind"], "token": token,
                            "reproduces": entry["kind"] in shown})
    stale = [token for token, shown in outcomes.items() if shown is None]
    if stale:
        db.forget(engine.digest, stale)
    return results


def _replay(engine, token: str) -> set[str] | None:
    """The kinds (bug and hazards) the token's schedule shows, or None if it does not fit."""
    try:
        t = decode(token)
    except TokenError:
        return None
    if t.model != MODEL_VERSION or t.digest != engine.digest:
        return None
    try:
        result = engine.replay(list(t.choices), log=False)
    except (Divergence, NotModelled):
        return None
    return ({result.bug.kind} if result.bug is not None else set()) | {
        h.kind for h in result.hazards}


def record_tally(db: FailureDb, engine, tally) -> int:
    """Record every bug and hazard of a Tally (its first schedule's token per kind) under
    ``engine.digest``, bugs first, each table in order of first_run; the number that were new."""
    findings = []
    for table in (tally.bugs, tally.hazards):
        for entry in sorted(table.values(), key=lambda e: (e.get("first_run", 0), e["kind"])):
            findings.append((entry["kind"], entry["token"]))
    return db.record_many(engine.digest, findings) if findings else 0
