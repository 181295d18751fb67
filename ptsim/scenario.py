"""Scenario files: TOML in, typed and validated scenarios out.

``load_scenario(path)`` returns a :class:`ScenarioFile` (the file as written).
``ScenarioFile.resolve(variant, overrides)`` applies a ``[[variant]]`` and ``--set`` overrides
and returns the effective :class:`Scenario` of one run, whose ``digest()`` names it in tokens.

Every problem with the input raises :class:`ScenarioError`, whose message is one line::

    <file>: <key path, or "line N, column M">: <what is wrong>

Key paths use 0-based indices in file order: ``scenario.cpus``, ``vma[0].size``,
``agent[1].do[0].len``, ``variant[1].config.table_free``, ``expect.runs``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import ptsim.agents  # noqa: F401  (the shipped ops register themselves)
from ptsim.kernel_model import MODEL_VERSION
from ptsim.kernel_model import kernels as _kernels
from ptsim.kernel_model.registry import CONFIG, FAULTS, KINDS, OPS, REPLACEMENTS
from ptsim.replace import ReplaceError
from ptsim.replace import resolve as resolve_replacement
from ptsim.strategies import DEFAULT_STRATEGY, STRATEGIES
from ptsim.usermods import is_user_module, module_hash

__all__ = [
    "MAX_SCENARIO_BYTES",
    "REQUIRED",
    "AgentSpec",
    "Expect",
    "Op",
    "Scenario",
    "ScenarioError",
    "ScenarioFile",
    "Variant",
    "Vma",
    "load_scenario",
    "loads_scenario",
    "parse_scenario",
    "parse_set",
]

PAGE_SIZE = 4096
PMD_SIZE = 2 << 20
# A scenario is a page of TOML; a file past this is refused before it is read into memory
# (`validate /dev/zero` must end with a message, not a MemoryError).
MAX_SCENARIO_BYTES = 1 << 20
USER_ADDR_LIMIT = 1 << 47  # x86-64, 4-level paging: user addresses are below this
MAX_CPUS = 64
DEFAULT_MM = "mm0"
BASE_VARIANT = "base"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default marker in the field tables below: the key must be given."""

# ---------------------------------------------------------------------------------------------
# Vocabulary: ops, config keys, faults and kinds come from their registries
# (kernel_model.registry), strategies from ptsim.strategies.
# ---------------------------------------------------------------------------------------------

VMA_TYPES = ("anon", "file", "shmem")


def config_defaults() -> dict[str, object]:
    return {key.name: key.default for key in CONFIG.values()}


def fault_defaults() -> dict[str, float]:
    return {f.name: f.default for f in FAULTS.values()}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ScenarioError(Exception):
    """Bad scenario input. ``str()`` is one line: ``<file>: <where>: <what is wrong>``."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class _Bad(Exception):
    """Internal: a problem at a key path; the loader prefixes the file name."""

    def __init__(self, where: str, what: str):
        super().__init__(where, what)
        self.where = where
        self.what = what


def _key(base: str, name: str) -> str:
    """Key path of ``name`` inside ``base`` (quoted when it is not a bare TOML key)."""
    shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
    return f"{base}.{shown}" if base else shown


def _type_name(value: object) -> str:
    for typ, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime.datetime, "datetime"),
        (datetime.date, "date"),
        (datetime.time, "time"),
    ):
        if isinstance(value, typ):
            return name
    return type(value).__name__


def _show(value: object, limit: int = 60) -> str:
    """A value as TOML would spell it, on one line, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, (str, list, dict)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: object) -> str:
    return f"{_type_name(value)} {_show(value)}"


def _listing(items: Iterable[object]) -> str:
    return ", ".join(str(item) for item in items)


# ---------------------------------------------------------------------------------------------
# Typed readers: reader(value, where) -> checked value, or raise _Bad(where, ...)
# ---------------------------------------------------------------------------------------------


def _int(value: object, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if lo is not None and hi is not None:
        wanted = f"an integer in {lo}..{hi}"
    elif lo is not None:
        wanted = f"an integer >= {lo}"
    else:
        wanted = "an integer"
    if type(value) is not int:  # TOML booleans are Python ints: reject them here
        raise _Bad(where, f"expected {wanted}, got {_describe(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _Bad(where, f"expected {wanted}, got {value}")
    return value


def _bool(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise _Bad(where, f"expected true or false, got {_describe(value)}")
    return value


def _str(value: object, where: str, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Bad(where, f"expected a string, got {_describe(value)}")
    if nonempty and not value.strip():
        raise _Bad(where, "expected a non-empty string")
    return value


def _choice(value: object, where: str, choices: Sequence[object]) -> object:
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        allowed = _listing(_show(choice) for choice in choices)
        raise _Bad(where, f"expected one of {allowed}, got {_describe(value)}")
    return value


_SIZE_RE = re.compile(r"(\d{1,20})([KMG]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(value: object, where: str, positive: bool = True) -> int:
    """Bytes: an integer or a string like "16K", "2M", "1G" (powers of 1024); page aligned."""
    if type(value) is int:
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value)):
        size = int(match[1]) * _SIZE_UNITS[match[2].upper()]
    else:
        raise _Bad(
            where,
            'expected a size: integer bytes or a string like "4K", "2M", "1G", '
            f"got {_describe(value)}",
        )
    if size < 0 or (positive and size == 0):
        raise _Bad(where, f"expected a size {'>' if positive else '>='} 0, got {_show(value)}")
    if size % PAGE_SIZE:
        raise _Bad(where, f"size {_show(value)} is not page aligned (a multiple of 4K)")
    return size


def _addr(value: object, where: str) -> int:
    if type(value) is not int:
        raise _Bad(
            where,
            f"expected an integer address (hex is fine: 0x7f0000000000), got {_describe(value)}",
        )
    if not 0 <= value < USER_ADDR_LIMIT:
        shown = hex(value) if value >= 0 else str(value)
        raise _Bad(where, f"address {shown} is outside user space (0x0..{USER_ADDR_LIMIT - 1:#x})")
    if value % PAGE_SIZE:
        raise _Bad(where, f"address {value:#x} is not page aligned (4K)")
    return value


def _probability(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise _Bad(where, f"expected a probability (a number in 0..1), got {_describe(value)}")
    if not 0 <= value <= 1:  # false for NaN too
        raise _Bad(where, f"expected a probability in 0..1, got {_show(value)}")
    return float(value)


def _kinds(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(
            where, f'expected an array of kinds like ["pt-use-after-free"], got {_describe(value)}'
        )
    seen: list[str] = []
    for i, kind in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(kind, str):
            raise _Bad(at, f"expected a kind (string), got {_describe(kind)}")
        if kind not in KINDS:
            raise _Bad(at, f"unknown kind {_show(kind)} (known: {_listing(sorted(KINDS))})")
        if kind in seen:
            raise _Bad(at, f"kind {_show(kind)} is listed twice")
        seen.append(kind)
    return tuple(seen)


def _config_value(key: str, value: object, where: str) -> object:
    return _choice(value, where, CONFIG[key].values)


def _kernel_name(value: object, where: str) -> str:
    """A kernel profile's name (kernel_model/kernels.py; `ptsim list kernels`)."""
    if not isinstance(value, str) or value not in _kernels.KERNELS:
        raise _Bad(where, f"unknown kernel {_show(value)} "
                          f"(known: {_listing(_kernels.KERNELS)})")
    return value


KERNEL_OVERRIDE = "kernel="


def kernel_override(name: str) -> str:
    """``--kernel NAME`` as it travels with the overrides (tokens, --jobs workers, the API):
    the item ``kernel=NAME``, which resolve() applies under [config]."""
    return KERNEL_OVERRIDE + name


def _settings(value: object, where: str, allowed: Mapping[str, object], check) -> tuple:
    """A table of [config] or [faults] settings -> sorted ((key, value), ...)."""
    table = _as_table(value, where)
    _check_keys(table, where, allowed)
    return tuple(sorted((key, check(key, val, _key(where, key))) for key, val in table.items()))


_config_table = partial(_settings, allowed=CONFIG, check=_config_value)
_faults_table = partial(
    _settings, allowed=FAULTS, check=lambda key, val, where: _probability(val, where)
)

_KIND_READERS: dict[str, Callable[[object, str], object]] = {
    "addr": _addr,
    "pmd_addr": _addr,
    "size": _size,
    "int": partial(_int, lo=1),
    "bool": _bool,
    "str": _str,
}

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

Field = tuple[Callable[[object, str], object], object]  # (reader, default or REQUIRED)


def _as_table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(where, f"expected a table, got {_describe(value)}")
    return value


def _as_array_of_tables(value: object, where: str, spelled: str) -> list[dict]:
    if not isinstance(value, list):
        raise _Bad(where, f"expected an array of tables ({spelled}), got {_describe(value)}")
    for i, item in enumerate(value):
        _as_table(item, f"{where}[{i}]")
    return value


def _check_keys(
    table: Mapping[str, object], where: str, allowed: Iterable[str], context: str = ""
) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            raise _Bad(_key(where, key), f"unknown key{context} (allowed: {_listing(allowed)})")


def _read_fields(
    table: Mapping[str, object],
    where: str,
    fields: Mapping[str, Field],
    *,
    also_allowed: Iterable[str] = (),
    context: str = "",
) -> dict[str, object]:
    """Check ``table`` has no unknown keys, read each field with its reader, fill defaults."""
    _check_keys(table, where, [*fields, *also_allowed], context)
    out: dict[str, object] = {}
    for name, (reader, default) in fields.items():
        if name in table:
            out[name] = reader(table[name], _key(where, name))
        elif default is REQUIRED:
            raise _Bad(_key(where, name), f"missing required key{context}")
        else:
            out[name] = default
    return out


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vma:
    start: int
    size: int
    type: str = "anon"
    populate: bool = False
    thp: bool = False
    mm: str = DEFAULT_MM
    file: str | None = None
    uffd_wp: bool = False
    pgoff: int = 0  # in pages

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Op:
    op: str
    args: tuple[tuple[str, object], ...]  # every parameter of the op, defaults filled, sorted

    _MISSING = object()

    def get(self, name: str, default: object = _MISSING) -> object:
        for key, value in self.args:
            if key == name:
                return value
        if default is Op._MISSING:
            raise KeyError(f"op {self.op} has no parameter {name!r}")
        return default

    @property
    def params(self) -> dict[str, object]:
        return dict(self.args)


@dataclass(frozen=True)
class AgentSpec:
    cpu: int
    ops: tuple[Op, ...]
    repeat: int = 1
    stride: int = 0
    mm: str = DEFAULT_MM
    key: str = ""  # "agent[1]" / "setup[0]", for messages


@dataclass(frozen=True)
class Variant:
    name: str
    config: tuple[tuple[str, object], ...] = ()
    faults: tuple[tuple[str, float], ...] = ()
    expect: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()  # (kernel function or op, its replacement)
    fixed_by: str = ""  # the upstream commit whose fix this variant reverts (reports cite it)


@dataclass(frozen=True)
class Expect:
    runs: int = 1000
    strategy: str = DEFAULT_STRATEGY
    depth: int = 3
    kinds: tuple[str, ...] = ()


def _non_default_args(op: Op) -> dict:
    entry = OPS[op.op]
    return {name: value for name, value in op.args
            if entry.param(name) is None or entry.param(name).default != value}


def _agent_doc(agent: AgentSpec) -> dict:
    return {
        "cpu": agent.cpu,
        "repeat": agent.repeat,
        "stride": agent.stride,
        "mm": agent.mm,
        "ops": [{"op": op.op, "args": _non_default_args(op)} for op in agent.ops],
    }


@dataclass(frozen=True)
class Scenario:
    """The effective scenario of one run: the file, then the variant, then ``--set``."""

    path: str
    name: str
    description: str
    cpus: int
    max_steps: int
    vmas: tuple[Vma, ...]
    setup: tuple[AgentSpec, ...]
    agents: tuple[AgentSpec, ...]
    variant: str | None
    overrides: tuple[str, ...]
    config: tuple[tuple[str, object], ...]  # every [config] key, defaults filled, registry order
    faults: tuple[tuple[str, float], ...]  # every fault, defaults filled, registry order
    expect_kinds: tuple[str, ...]
    replace: tuple[tuple[str, str], ...] = ()
    fixed_by: str = ""
    kernel: str | None = None  # the kernel profile it starts from (None: the registry defaults)

    @property
    def counterfactual(self) -> list[str]:
        """Why this configuration is no released kernel (kernel_model/kernels.py): one phrase
        per key, or [] when some profile has every code key's value."""
        return _kernels.counterfactual(dict(self.config), self.kernel)

    @property
    def cfg(self) -> dict[str, object]:
        """The [config] values, every registered key (the machine reads them as ``m.cfg.key``)."""
        return dict(self.config)

    @property
    def flt(self) -> dict[str, float]:
        return dict(self.faults)

    def canonical(self) -> str:
        """Canonical JSON of everything that decides what a schedule does, as a token's hash
        covers it: config keys, faults and op parameters only where they differ from their
        registered defaults (so that declaring a new key or parameter with a default leaves
        existing tokens valid), and the model version (which changes whenever the model's
        behaviour does)."""
        doc = {
            "model": MODEL_VERSION,
            "cpus": self.cpus,
            "max_steps": self.max_steps,
            "config": {k: v for k, v in self.config if v != CONFIG[k].default},
            "faults": {k: v for k, v in self.faults if v != FAULTS[k].default},
            "vmas": [dataclasses.asdict(vma) for vma in self.vmas],
            "setup": [_agent_doc(agent) for agent in self.setup],
            "agents": [_agent_doc(agent) for agent in self.agents],
        }
        if self.replace:
            doc["replace"] = dict(self.replace)
        if self.kernel is not None:
            doc["kernel"] = self.kernel
        modules = self.user_modules()
        if modules:
            doc["modules"] = dict(modules)
        return json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )

    def user_modules(self) -> tuple[tuple[str, str], ...]:
        """(name, source hash) of every user module that declares something this scenario
        uses: an op, a replacement, a config key or fault it sets."""
        names = {OPS[op.op].module for spec in (*self.setup, *self.agents) for op in spec.ops}
        names |= {REPLACEMENTS[name].module for _, name in self.replace if name in REPLACEMENTS}
        names |= {OPS[name].module for _, name in self.replace if name in OPS}
        names |= {CONFIG[k].module for k, v in self.config if v != CONFIG[k].default}
        names |= {FAULTS[k].module for k, v in self.faults if v != FAULTS[k].default}
        return tuple(sorted((n, module_hash(n)) for n in names if is_user_module(n)))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScenarioFile:
    """A scenario file as written (config and faults hold only the keys the file sets)."""

    path: str
    name: str
    description: str
    cpus: int
    max_steps: int
    config: tuple[tuple[str, object], ...]
    faults: tuple[tuple[str, float], ...]
    vmas: tuple[Vma, ...]
    setup: tuple[AgentSpec, ...]
    agents: tuple[AgentSpec, ...]
    variants: tuple[Variant, ...]
    expect: Expect
    kernel: str | None = None  # [scenario] kernel: the profile every variant starts from

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants] if self.variants else [BASE_VARIANT]

    def _variant(self, name: str) -> Variant | None:
        for variant in self.variants:
            if variant.name == name:
                return variant
        if not self.variants and name == BASE_VARIANT:
            return None
        raise ScenarioError(
            f"{self.path}: --variant {name}: no such variant "
            f"(have: {_listing(self.variant_names())})"
        )

    def resolve(self, variant: str | None = None, overrides: Sequence[str] = ()) -> Scenario:
        if isinstance(overrides, str):
            overrides = (overrides,)
        overrides = tuple(overrides)
        # Precedence: the kernel profile < [config] < the variant's config < --set.
        kernel = self.kernel
        sets = []
        for item in overrides:
            try:
                section, key, value = parse_set(item)
            except ScenarioError as err:
                raise ScenarioError(f"{self.path}: {err}") from None
            if section == "kernel":
                kernel = value
            else:
                sets.append((section, key, value))
        config = config_defaults()
        if kernel is not None:
            config.update(_kernels.KERNELS[kernel].config())
        config.update(self.config)
        faults = {**fault_defaults(), **dict(self.faults)}
        expect_kinds = self.expect.kinds
        chosen = self._variant(variant) if variant is not None else None
        if chosen is not None:
            config.update(chosen.config)
            faults.update(chosen.faults)
            expect_kinds = chosen.expect
        replace = chosen.replace if chosen is not None else ()
        fixed_by = chosen.fixed_by if chosen is not None else ""
        for section, key, value in sets:
            (config if section == "config" else faults)[key] = value
        return Scenario(
            path=self.path,
            name=self.name,
            description=self.description,
            cpus=self.cpus,
            max_steps=self.max_steps,
            vmas=self.vmas,
            setup=self.setup,
            agents=self.agents,
            variant=variant,
            overrides=overrides,
            config=tuple((key, config[key]) for key in CONFIG),
            faults=tuple((key, faults[key]) for key in FAULTS),
            expect_kinds=expect_kinds,
            replace=replace,
            fixed_by=fixed_by,
            kernel=kernel,
        )


# ---------------------------------------------------------------------------------------------
# --set KEY=VALUE
# ---------------------------------------------------------------------------------------------


def _toml_value(text: str) -> object:
    """``text`` parsed as one TOML value, else the bare (stripped) string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return text.strip()
    return doc["v"] if doc.keys() == {"v"} else text.strip()


def parse_set(item: str) -> tuple[str, str, object]:
    """``"KEY=VALUE"`` -> ``("config" | "faults", key, checked value)``.

    KEY is a [config] key (bare, or ``config.`` prefixed) or ``faults.<key>``; VALUE is a TOML
    value, else a bare string (``table_free=rcu``). ``kernel=NAME`` is how ``--kernel NAME``
    travels with the overrides: ``("kernel", "kernel", NAME)``.
    """
    where = f"--set {item}"
    key, sep, text = str(item).partition("=")
    key = key.strip()
    if key == "kernel" and sep:
        name = text.strip()
        try:
            return "kernel", "kernel", _kernel_name(name, f"--kernel {name}")
        except _Bad as bad:
            raise ScenarioError(f"{bad.where}: {bad.what}") from None
    if not sep or not key:
        raise ScenarioError(
            f"{where}: expected KEY=VALUE, e.g. table_free=rcu or faults.need_resched=0.5"
        )
    section, _, name = key.rpartition(".")
    value = _toml_value(text)
    try:
        if section in ("", "config"):
            if name not in CONFIG:
                raise _Bad(where, f"unknown config key {_show(name)} (known: {_listing(CONFIG)})")
            return "config", name, _config_value(name, value, where)
        if section == "faults":
            if name not in FAULTS:
                raise _Bad(where, f"unknown fault key {_show(name)} (known: {_listing(FAULTS)})")
            return "faults", name, _probability(value, where)
        raise _Bad(where, f"unknown key {_show(key)}: use a [config] key or faults.<key>")
    except _Bad as bad:
        raise ScenarioError(f"{bad.where}: {bad.what}") from None


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

_TOP_LEVEL = ("scenario", "config", "faults", "vma", "setup", "agent", "variant", "expect")

_SCENARIO_FIELDS: dict[str, Field] = {
    "name": (_str, REQUIRED),
    "description": (partial(_str, nonempty=False), ""),
    "cpus": (partial(_int, lo=1, hi=MAX_CPUS), REQUIRED),
    "max_steps": (partial(_int, lo=1), 100_000),
    "kernel": (_kernel_name, None),
}
_VMA_FIELDS: dict[str, Field] = {
    "start": (_addr, REQUIRED),
    "size": (_size, REQUIRED),
    "type": (partial(_choice, choices=VMA_TYPES), "anon"),
    "populate": (_bool, False),
    "thp": (_bool, False),
    "mm": (_str, DEFAULT_MM),
    "file": (_str, None),
    "uffd_wp": (_bool, False),
    "pgoff": (partial(_int, lo=0), 0),
}
_ENTRY_COMMON: dict[str, Field] = {
    "repeat": (partial(_int, lo=1), 1),
    "stride": (partial(_size, positive=False), 0),
    "mm": (_str, DEFAULT_MM),
}
_AGENT_FIELDS: dict[str, Field] = {"cpu": (partial(_int, lo=0), REQUIRED), **_ENTRY_COMMON}
_SETUP_FIELDS: dict[str, Field] = {"cpu": (partial(_int, lo=0), 0), **_ENTRY_COMMON}
def _replace_table(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """``replace = { kernel_function_or_op = "replacement" }``: each checked against what the
    loaded modules registered (a name, never code: the code comes from --import)."""
    table = _as_table(value, where)
    out = []
    for target, name in table.items():
        at = _key(where, target)
        name = _str(name, at)
        try:
            resolve_replacement(target, name)
        except ReplaceError as err:
            raise _Bad(at, err.what) from None
        out.append((target, name))
    return tuple(sorted(out))


_VARIANT_FIELDS: dict[str, Field] = {
    "name": (_str, REQUIRED),
    "config": (_config_table, ()),
    "faults": (_faults_table, ()),
    "expect": (_kinds, ()),
    "replace": (_replace_table, ()),
    "fixed_by": (_str, ""),
}
_EXPECT_FIELDS: dict[str, Field] = {
    "runs": (partial(_int, lo=1), 1000),
    "strategy": (partial(_choice, choices=STRATEGIES), DEFAULT_STRATEGY),
    "depth": (partial(_int, lo=1), 3),
    "kinds": (_kinds, ()),
}


def _toml_problem(err: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message as "line N, column M: <message>"."""
    match = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", str(err), re.DOTALL)
    if not match:
        return f"invalid TOML: {err}"
    message, position = match.groups()
    if position == "end of document":
        lines = text.split("\n")
        position = f"line {len(lines)}, column {len(lines[-1]) + 1}"
    return f"{position}: {message}"


def load_scenario(path: str | os.PathLike) -> ScenarioFile:
    """Read, parse and check a scenario file."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCENARIO_BYTES + 1)
    except OSError as err:
        raise ScenarioError(f"{name}: cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{name}: cannot read: larger than {MAX_SCENARIO_BYTES // 1024} KB, "
                            "which no scenario is")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ScenarioError(
            f"{name}: cannot read: not UTF-8 text (bad byte at offset {err.start})"
        ) from None
    return loads_scenario(text, name)


def loads_scenario(text: str, path: str = "<string>") -> ScenarioFile:
    """Parse and check scenario TOML given as text; ``path`` names it in messages."""
    if len(text) > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{path}: larger than {MAX_SCENARIO_BYTES // 1024} KB, which no "
                            "scenario is")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: {_toml_problem(err, text)}") from None
    except RecursionError:
        raise ScenarioError(f"{path}: invalid TOML: nested too deeply") from None
    return parse_scenario(data, path)


def parse_scenario(data: Mapping[str, object], path: str = "<data>") -> ScenarioFile:
    """Check an already parsed TOML document (a dict as tomllib returns it)."""
    try:
        return _build(data, path)
    except _Bad as bad:
        raise ScenarioError(f"{path}: {bad.where}: {bad.what}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        # Should not happen: every check above raises _Bad. Still never a traceback for users.
        raise ScenarioError(
            f"{path}: internal error while checking: {type(err).__name__}: {err}"
        ) from None


def _build(data: Mapping[str, object], path: str) -> ScenarioFile:
    data = _as_table(data, "(document)")
    _check_keys(data, "", _TOP_LEVEL, context=" at top level")
    if "scenario" not in data:
        raise _Bad("scenario", "missing required table [scenario] (name, cpus)")
    head = _read_fields(_as_table(data["scenario"], "scenario"), "scenario", _SCENARIO_FIELDS)
    cpus = head["cpus"]
    config = _config_table(data.get("config", {}), "config")
    faults = _faults_table(data.get("faults", {}), "faults")

    vma_tables = _as_array_of_tables(data.get("vma", []), "vma", "[[vma]]")
    vmas = tuple(_read_vma(table, f"vma[{i}]") for i, table in enumerate(vma_tables))
    _check_overlaps(vmas)
    spans = _spans_by_mm(vmas)

    def entries(section: str, fields: dict[str, Field]) -> tuple[AgentSpec, ...]:
        tables = _as_array_of_tables(data.get(section, []), section, f"[[{section}]]")
        return tuple(
            _read_entry(table, f"{section}[{i}]", fields, cpus, spans)
            for i, table in enumerate(tables)
        )

    setup = entries("setup", _SETUP_FIELDS)
    agents = entries("agent", _AGENT_FIELDS)
    if not agents:
        raise _Bad("agent", "a scenario needs at least one [[agent]]")

    variants = _read_variants(data.get("variant", []))
    expect_table = _as_table(data.get("expect", {}), "expect")
    if variants and "kinds" in expect_table:
        raise _Bad(
            "expect.kinds",
            "only for a file without [[variant]]; give each variant its own expect = [...]",
        )
    expect = Expect(**_read_fields(expect_table, "expect", _EXPECT_FIELDS))

    return ScenarioFile(
        path=path,
        name=head["name"],
        description=head["description"],
        cpus=cpus,
        max_steps=head["max_steps"],
        config=config,
        faults=faults,
        vmas=vmas,
        setup=setup,
        agents=agents,
        variants=variants,
        expect=expect,
        kernel=head["kernel"],
    )


def _read_vma(table: dict, where: str) -> Vma:
    vma = Vma(**_read_fields(table, where, _VMA_FIELDS))
    if vma.end > USER_ADDR_LIMIT:
        raise _Bad(
            _key(where, "size"),
            f"VMA {vma.start:#x}..{vma.end:#x} runs past the end of user space "
            f"({USER_ADDR_LIMIT:#x})",
        )
    if vma.type == "anon" and vma.file is not None:
        raise _Bad(_key(where, "file"), 'not allowed on an anon VMA (use type = "file" or "shmem")')
    if vma.type != "anon" and vma.file is None:
        raise _Bad(_key(where, "file"), f'missing: a {vma.type} VMA needs file = "<name>"')
    return vma


def _check_overlaps(vmas: Sequence[Vma]) -> None:
    by_mm: dict[str, list[int]] = {}
    for i, vma in enumerate(vmas):
        by_mm.setdefault(vma.mm, []).append(i)
    for mm, indices in by_mm.items():
        indices.sort(key=lambda i: vmas[i].start)
        reach = None  # index of the VMA reaching furthest so far
        for i in indices:
            if reach is not None and vmas[i].start < vmas[reach].end:
                first, second = sorted((reach, i))
                a, b = vmas[first], vmas[second]
                raise _Bad(
                    f"vma[{second}]",
                    f"{b.start:#x}..{b.end:#x} overlaps vma[{first}] "
                    f"{a.start:#x}..{a.end:#x} in {mm}",
                )
            if reach is None or vmas[i].end > vmas[reach].end:
                reach = i


def _spans_by_mm(vmas: Sequence[Vma]) -> dict[str, list[tuple[int, int]]]:
    """Per mm, the sorted address ranges covered by VMAs, touching VMAs merged into one span."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for vma in sorted(vmas, key=lambda v: (v.mm, v.start)):
        mm_spans = spans.setdefault(vma.mm, [])
        if mm_spans and mm_spans[-1][1] == vma.start:
            mm_spans[-1] = (mm_spans[-1][0], vma.end)
        else:
            mm_spans.append((vma.start, vma.end))
    return spans


def _first_uncovered(
    spans: list[tuple[int, int]], start: int, length: int, repeat: int, stride: int
) -> tuple[int, int] | None:
    """First (repetition, address) such that [start + r*stride, +length) leaves the spans.

    Jumps over every repetition a span covers, so the cost is the number of spans, not repeat.
    """
    r = 0
    while r < repeat:
        lo = start + r * stride
        i = bisect.bisect_right(spans, (lo, math.inf)) - 1
        if i < 0 or not spans[i][0] <= lo < spans[i][1]:
            return r, lo
        end = spans[i][1]
        if lo + length > end:
            return r, end
        if stride == 0:
            return None
        r = (end - length - start) // stride + 1
    return None


def _op_ranges(op: Op) -> list[tuple[str, int, int]]:
    """(parameter, bytes touched from it, alignment) for each address parameter of ``op``: an
    Addr covers ``len`` bytes, or ``nr_pages`` pages, or one page; a PmdAddr one whole pmd."""
    params = op.params
    length = params["len"] if "len" in params else params.get("nr_pages", 1) * PAGE_SIZE
    ranges = []
    for param in OPS[op.op].params:
        if param.type == "pmd_addr":
            ranges.append((param.name, PMD_SIZE, PMD_SIZE))
        elif param.type == "addr":
            ranges.append((param.name, length, PAGE_SIZE))
    return ranges


def _read_op(table: dict, where: str, entry_keys: Sequence[str] = ()) -> Op:
    if "op" not in table:
        raise _Bad(_key(where, "op"), f"missing required key (one of: {_listing(OPS)})")
    name = table["op"]
    if not isinstance(name, str):
        raise _Bad(_key(where, "op"), f"expected an operation name (string), got {_describe(name)}")
    if name not in OPS:
        raise _Bad(_key(where, "op"), f"unknown op {_show(name)} (registered: {_listing(OPS)}; "
                   "load your module with --import)")
    fields = {p.name: (_KIND_READERS[p.type], REQUIRED if p.required else p.default)
              for p in OPS[name].params}
    args = _read_fields(
        table, where, fields, also_allowed=("op", *entry_keys), context=f' for op "{name}"'
    )
    return Op(name, tuple(sorted(args.items())))


def _read_entry(
    table: dict,
    where: str,
    fields: dict[str, Field],
    cpus: int,
    spans: dict[str, list[tuple[int, int]]],
) -> AgentSpec:
    """One [[agent]] or [[setup]] entry: ``op`` with its parameters inline, or ``do = [...]``."""
    own = {key: value for key, value in table.items() if key in fields}
    rest = {key: value for key, value in table.items() if key not in fields}
    head = _read_fields(own, where, fields)
    if "op" in rest and "do" in rest:
        raise _Bad(
            where, "give either op = \"...\" (one operation) or do = [...] (a list), not both"
        )
    if "op" in rest:
        ops = (_read_op(rest, where, entry_keys=list(fields)),)
        op_where = [where]
    elif "do" in rest:
        for key in rest:
            if key != "do":
                hint = "; with do, operation parameters go inside each do item" if any(
                    entry.param(key) for entry in OPS.values()
                ) else ""
                raise _Bad(
                    _key(where, key), f"unknown key (allowed: {_listing([*fields, 'do'])}){hint}"
                )
        ops, op_where = _read_do(rest["do"], _key(where, "do"))
    else:
        raise _Bad(where, 'missing op = "..." (one operation) or do = [...] (a list of operations)')

    cpu, mm, repeat, stride = head["cpu"], head["mm"], head["repeat"], head["stride"]
    if cpu >= cpus:
        raise _Bad(
            _key(where, "cpu"), f"cpu {cpu} is beyond cpus = {cpus} (CPUs are 0..{cpus - 1})"
        )
    if mm not in spans:
        raise _Bad(
            _key(where, "mm"),
            f"no VMA belongs to mm {_show(mm)} (have: {_listing(spans) or 'none'})",
        )
    for op, at in zip(ops, op_where):
        _check_op_ranges(op, at, spans[mm], mm, repeat, stride)
    return AgentSpec(cpu=cpu, ops=ops, repeat=repeat, stride=stride, mm=mm, key=where)


def _read_do(value: object, where: str) -> tuple[tuple[Op, ...], list[str]]:
    if not isinstance(value, list) or not value:
        raise _Bad(
            where,
            "expected a non-empty array of operations like "
            f'[{{ op = "touch", addr = 0x7f0000000000 }}], '
            f"got {_describe(value)}",
        )
    wheres = [f"{where}[{i}]" for i in range(len(value))]
    return tuple(_read_op(_as_table(item, at), at) for item, at in zip(value, wheres)), wheres


def _check_op_ranges(
    op: Op, where: str, spans: list[tuple[int, int]], mm: str, repeat: int, stride: int
) -> None:
    for param, length, align in _op_ranges(op):
        addr = op.get(param)
        at = _key(where, param)
        if addr % align:
            raise _Bad(at, f"address {addr:#x} is not 2M aligned ({op.op} moves one whole pmd)")
        if repeat > 1 and stride % align:
            raise _Bad(at, f"stride {stride:#x} is not a multiple of 2M, which {op.op} needs")
        miss = _first_uncovered(spans, addr, length, repeat, stride)
        if miss is None:
            continue
        r, bad = miss
        lo = addr + r * stride
        detail = f"range {lo:#x}..{lo + length:#x}"
        if repeat > 1:
            detail += f", repetition {r} of {repeat} with stride {stride:#x}"
        raise _Bad(at, f"address {bad:#x} is outside every VMA of {mm} ({detail})")


def _read_variants(value: object) -> tuple[Variant, ...]:
    tables = _as_array_of_tables(value, "variant", "[[variant]]")
    variants: list[Variant] = []
    for i, table in enumerate(tables):
        where = f"variant[{i}]"
        variant = Variant(**_read_fields(table, where, _VARIANT_FIELDS))
        for j, earlier in enumerate(variants):
            if earlier.name == variant.name:
                raise _Bad(
                    _key(where, "name"),
                    f"duplicate variant name {_show(variant.name)} (also variant[{j}])",
                )
        variants.append(variant)
    return tuple(variants)
