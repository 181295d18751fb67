"""User modules: Python files or modules that declare ops, patched kernel functions, strategies
(``--import``, ``ptsim.load(..., imports=[...])``, ``--ptsim-import``).

Code is loaded only when the user names it, never because a scenario says so. A token records
the name and a hash of the source of every user module that defines something its scenario
uses, so that a replay under changed code is refused rather than silently different; ``--jobs``
and ``--dask`` workers load the same sources.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import types
from dataclasses import dataclass

from ptsim.kernel_model.registry import RegistryError, declared_by, forget_module


class ImportFailed(Exception):
    """A user module that cannot be loaded: one line for the user (exit 2)."""


@dataclass(frozen=True)
class UserModule:
    name: str
    source: str
    filename: str

    @property
    def hash(self) -> str:
        return source_hash(self.source)


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# Modules loaded through this module, by name: their source travels to workers.
LOADED: dict[str, UserModule] = {}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"line {exc.lineno}: {exc.msg}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_source(name: str, source: str, filename: str) -> types.ModuleType:
    """Execute ``source`` as module ``name`` (again, if it changed: its old declarations are
    dropped first). Raises ImportFailed."""
    known = LOADED.get(name)
    if known is not None and known.source == source and name in sys.modules:
        return sys.modules[name]
    forget_module(name)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except (Exception, SystemExit) as exc:  # a user's module: any error is theirs to see
        sys.modules.pop(name, None)
        forget_module(name)
        raise ImportFailed(f"{filename}: {_one_line(exc)}") from None
    LOADED[name] = UserModule(name, source, filename)
    return module


def load(spec: str) -> UserModule:
    """Load ``spec``: a path to a .py file, or a module name on sys.path."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        try:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportFailed(f"--import {spec}: cannot read: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        name = os.path.splitext(os.path.basename(path))[0]
        if not name.isidentifier():
            raise ImportFailed(f"--import {spec}: {name!r} is not a Python module name")
        load_source(name, source, path)
        return LOADED[name]
    try:
        module = importlib.import_module(spec)
    except RegistryError as exc:
        raise ImportFailed(f"--import {spec}: {exc}") from None
    except Exception as exc:
        raise ImportFailed(f"--import {spec}: {_one_line(exc)}") from None
    filename = getattr(module, "__file__", None) or spec
    try:
        with open(filename, encoding="utf-8") as fh:
            source = fh.read()
    except OSError:
        source = ""
    entry = LOADED[spec] = UserModule(spec, source, filename)
    return entry


def load_all(specs) -> list[UserModule]:
    return [load(spec) for spec in specs]


def module_hash(name: str) -> str:
    """The source hash of a module that declared something (user modules only)."""
    known = LOADED.get(name)
    if known is not None:
        return known.hash
    module = sys.modules.get(name)
    filename = getattr(module, "__file__", None)
    if filename:
        try:
            with open(filename, encoding="utf-8") as fh:
                return source_hash(fh.read())
        except OSError:
            pass
    return "unknown"


def check_token_modules(modules) -> str | None:
    """Why a token's user modules (name, hash) do not match what is loaded now, or None."""
    for name, digest in modules:
        if name not in LOADED and name not in sys.modules and not declared_by(name):
            return f"made with user module {name}; load it with --import"
        now = module_hash(name)
        if now != digest:
            return (f"user module {name} has changed since the token was made (source hash "
                    f"{digest}, now {now})")
    return None


def is_user_module(name: str) -> bool:
    return not (name == "ptsim" or name.startswith("ptsim."))


def sources(names) -> tuple[UserModule, ...]:
    """The loaded user modules named, as workers need them (in load order)."""
    wanted = set(names)
    return tuple(m for m in LOADED.values() if m.name in wanted)
