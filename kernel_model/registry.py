"""Registries: every op, replaceable kernel function, config key, fault and bug kind is declared
once, beside the code that implements it, and the rest of ptsim (the scenario loader, `ptsim
list`, the docs) reads it from here.

- ``@op("name")`` on an agent coroutine ``async def name(cpu, *, addr: Addr, ...)``: its keyword
  parameters, their annotations and defaults are the op's scenario keys.
- ``@kfunc`` on a kernel function: reports name it, and it is listed as replaceable.
- ``config_key(...)`` and ``fault(...)`` in the module whose behaviour they switch; the machine
  reads them through typed objects (``m.cfg.table_free``, ``m.flt.need_resched``), so reading a
  key nobody registered fails at once.
- ``bug_kind(...)`` beside the sanitizer that reports it.

Strategies and trace formats live above the model (ptsim.strategies, ptsim.events) and use the
same :class:`Registry`.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass
from types import CodeType
from typing import Callable, Generic, Iterator, TypeVar

from .snapshot import Snapshotted

E = TypeVar("E")


class RegistryError(Exception):
    """A declaration that clashes with another, or an op whose signature ptsim cannot read."""


_REGISTRIES: list["Registry"] = []


class Registry(Generic[E]):
    """Named entries in declaration order. Entries carry ``module``, the module that declared
    them (forget_module drops a user module's entries before it is loaded again)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, E] = {}
        _REGISTRIES.append(self)

    def add(self, name: str, entry: E, replace: bool = False) -> E:
        if name in self._entries and not replace:
            raise RegistryError(f"{self.what} {name!r} is declared twice")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        del self._entries[name]

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def get(self, name: str, default=None):
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[E]:
        return list(self._entries.values())


def forget_module(module: str) -> None:
    """Drop everything ``module`` declared, in every registry (a user module loaded again)."""
    for registry in _REGISTRIES:
        for name in [n for n, e in registry._entries.items()
                     if getattr(e, "module", None) == module]:
            registry.remove(name)
    for code in [c for c, m in _KFUNC_MODULES.items() if m == module]:
        del _KFUNC_MODULES[code]
        if kfunc_name(code) is not None:
            del KFUNC_IDS[id(code)]


def declared_by(module: str) -> bool:
    """Has ``module`` declared anything (it is loaded, however it was)?"""
    return any(getattr(e, "module", None) == module
               for registry in _REGISTRIES for e in registry._entries.values())


def kernel_file(name: str) -> str:
    """The kernel source file a function of a backtrace lives in ("" if unknown)."""
    entry = FUNCTIONS.get(name)
    return entry.file if entry is not None else ""


def first_line(doc: str | None) -> str:
    """The summary line of a docstring (the whole first paragraph, joined)."""
    if not doc:
        return ""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


# -- config keys and faults ------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigKey:
    name: str
    values: tuple  # allowed values, the default first
    doc: str
    commit: str  # the kernel commit or release the non-default value stands for
    module: str
    kconfig: str = ""  # the kernel option it mirrors, e.g. CONFIG_PT_RECLAIM (booleans)

    @property
    def default(self):
        return self.values[0]


@dataclass(frozen=True)
class Fault:
    name: str
    doc: str
    commit: str
    module: str
    values: str = "a probability in 0..1"
    default: float = 0.0


CONFIG: Registry[ConfigKey] = Registry("config key")
FAULTS: Registry[Fault] = Registry("fault")


def _caller_module(depth: int = 2) -> str:
    return sys._getframe(depth).f_globals.get("__name__", "?")


def config_key(name: str, values: tuple, doc: str, commit: str = "", kconfig: str = "") -> str:
    """Declare a [config] key; returns its name. ``values`` lists the allowed values, the default
    (current mainline x86-64) first; ``kconfig`` names the kernel option a boolean mirrors."""
    CONFIG.add(name, ConfigKey(name, tuple(values), doc, commit, _caller_module(), kconfig))
    return name


def fault(name: str, doc: str, commit: str = "") -> str:
    """Declare a [faults] key: a probability, 0 by default, drawn as a recorded schedule choice."""
    FAULTS.add(name, Fault(name, doc, commit, _caller_module()))
    return name


class _Settings(Snapshotted):
    """Typed settings: one attribute per registered key. Reading a key nobody registered raises
    at once rather than reading a default that does not exist."""

    _registry: Registry
    _what: str

    def __init__(self, values: dict) -> None:
        for entry in self._registry.values():
            setattr(self, entry.name, values.get(entry.name, entry.default))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self._what} {name!r} is not registered "
                             f"(registered: {', '.join(self._registry)})")

    def items(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in self._registry]



class Config(_Settings):
    """The machine's [config]: ``m.cfg.table_free``."""

    _registry = CONFIG
    _what = "config key"


class Faults(_Settings):
    """The machine's [faults] probabilities: ``m.flt.need_resched``."""

    _registry = FAULTS
    _what = "fault"


# -- bug kinds ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BugKind:
    name: str
    cls: str  # "bug": fails a run; "hazard": counted, fails nothing unless expected
    doc: str
    module: str


KINDS: Registry[BugKind] = Registry("bug kind")


def bug_kind(name: str, doc: str, cls: str = "bug") -> str:
    """Declare a finding kind; returns its name, which the sanitizer passes to m.bug/m.hazard."""
    if cls not in ("bug", "hazard"):
        raise RegistryError(f"bug kind {name!r}: class must be 'bug' or 'hazard', not {cls!r}")
    KINDS.add(name, BugKind(name, cls, doc, _caller_module()))
    return name


def bug_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in KINDS.values() if k.cls == "bug")


def hazard_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in KINDS.values() if k.cls == "hazard")


# -- kernel functions ------------------------------------------------------------------------

@dataclass(frozen=True)
class KFunc:
    name: str
    fn: Callable
    doc: str
    module: str
    file: str = ""  # the kernel source file it models, e.g. "mm/memory.c"


@dataclass(frozen=True)
class Replacement:
    """A patched copy of a kernel function or op, run instead of it by variants that say
    ``replace = { target = "name" }``."""

    name: str
    target: str
    fn: Callable
    doc: str
    module: str


FUNCTIONS: Registry[KFunc] = Registry("kernel function")
REPLACEMENTS: Registry[Replacement] = Registry("replacement")
# The unwinder's symbol table (machine.py): id(code) -> (code, name) for every kernel function.
# Keyed by id, not by the code object: a code object's hash is not cached (its bytecode and
# constants, nested code objects included, every time), an int's is, and a stack walk looks up
# every frame it passes. The entry holds the code object, so its id is not reused while the entry
# lives, and a lookup checks identity (kfunc_name).
KFUNC_IDS: dict[int, tuple[CodeType, str]] = {}
_KFUNC_MODULES: dict[CodeType, str] = {}


def kfunc_name(code: CodeType) -> str | None:
    """The kernel function ``code`` is the code of, or None."""
    entry = KFUNC_IDS.get(id(code))
    return entry[1] if entry is not None and entry[0] is code else None


def kfunc(fn: Callable | str | None = None, *, replaces: bool = False):
    """Mark an agent coroutine as a kernel function: events and reports name it.

    ``@kfunc`` declares the function under its own name; ``@kfunc("name")`` under another;
    ``@kfunc("name", replaces=True)`` declares a patched copy of the registered kernel function
    ``name``, which variants select with ``replace = { name = "<this function's name>" }``
    (reports still name it ``name``: it is that kernel function, patched).

    Free at run time (the seed-002 measurement calls these millions of times): nothing is
    pushed on entry. Like the kernel's unwinder, a report reads the backtrace off the stack
    itself when it needs one (Cpu.backtrace)."""
    if callable(fn):
        return _declare_kfunc(fn, fn.__name__, False)
    return lambda f: _declare_kfunc(f, fn or f.__name__, replaces)


def _declare_kfunc(fn: Callable, name: str, replaces: bool) -> Callable:
    if not inspect.iscoroutinefunction(fn):
        raise RegistryError(f"kernel function {name!r}: {fn.__qualname__} must be an async "
                            "function")
    if replaces:
        if name not in FUNCTIONS and name not in OPS:
            raise RegistryError(f"{fn.__name__} replaces {name!r}, which is no registered kernel "
                                "function or op (see `ptsim list functions`)")
        REPLACEMENTS.add(fn.__name__, Replacement(fn.__name__, name, fn, first_line(fn.__doc__),
                                                  fn.__module__))
    else:
        env = fn.__globals__
        file = env.get("__kernel_files__", {}).get(name) or env.get("__kernel_file__", "")
        FUNCTIONS.add(name, KFunc(name, fn, first_line(fn.__doc__), fn.__module__, file))
    KFUNC_IDS[id(fn.__code__)] = (fn.__code__, name)
    _KFUNC_MODULES[fn.__code__] = fn.__module__
    return fn


# -- ops -------------------------------------------------------------------------------------

class Addr(int):
    """Op parameter type: a page-aligned user address. With ``len`` (or ``nr_pages``) beside it,
    the loader checks the whole range lies inside VMAs of the agent's mm."""


class PmdAddr(int):
    """Op parameter type: the 2M-aligned address of one whole pmd (its 2M must lie in VMAs)."""


class Size(int):
    """Op parameter type: bytes, page aligned, > 0; scenarios may write "16K", "2M", "1G"."""


REQUIRED = inspect.Parameter.empty

# Annotation -> the loader's parameter type name.
PARAM_TYPES = {Addr: "addr", PmdAddr: "pmd_addr", Size: "size", int: "int", bool: "bool",
               str: "str"}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # one of PARAM_TYPES' values
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable  # async fn(cpu, **params); the agent's mm is cpu.mm
    params: tuple[Param, ...]
    doc: str
    module: str

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


OPS: Registry[Op] = Registry("op")
# Ops a variant replaced, while its schedules run (ptsim.replace installs them): run_op and the
# agent calls see the replacement under the op's name.
ACTIVE_OPS: dict[str, Callable] = {}


async def run_op(cpu, name: str, **params):
    """Run the op ``name`` (or the variant's replacement of it) on ``cpu``, in its current mm:
    how one op calls another."""
    fn = ACTIVE_OPS.get(name)
    if fn is None:
        fn = OPS[name].fn
    return await fn(cpu, **params)


def _op_params(name: str, fn: Callable) -> tuple[Param, ...]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a name in an annotation that does not resolve
        raise RegistryError(f"op {name!r}: cannot read its annotations ({exc})") from None
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                             params[0].POSITIONAL_OR_KEYWORD):
        raise RegistryError(f"op {name!r}: the first parameter must be the cpu")
    out = []
    for p in params[1:]:
        if p.kind is not p.KEYWORD_ONLY:
            raise RegistryError(f"op {name!r}: parameter {p.name!r} must be keyword-only "
                                "(write `async def op(cpu, *, addr: Addr, ...)`)")
        typ = PARAM_TYPES.get(hints.get(p.name))
        if typ is None:
            raise RegistryError(f"op {name!r}: parameter {p.name!r} needs an annotation, one of "
                                "Addr, PmdAddr, Size, int, bool, str")
        out.append(Param(p.name, typ, p.default))
    return tuple(out)


def op(name: str, replace: bool = False) -> Callable[[Callable], Callable]:
    """Declare a scenario op: ``@op("touch") async def touch(cpu, *, addr: Addr, ...)``."""

    def register(fn: Callable) -> Callable:
        if not inspect.iscoroutinefunction(fn):
            raise RegistryError(f"op {name!r}: {fn.__qualname__} must be an async function")
        OPS.add(name, Op(name, fn, _op_params(name, fn), first_line(fn.__doc__), fn.__module__),
                replace=replace)
        return fn

    return register
