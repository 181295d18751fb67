"""Model objects restored from the engine's post-setup snapshot, at full attribute speed.

Every schedule starts from a copy of the machine as setup left it. Pickle's default restore
writes the state into ``obj.__dict__``, and on CPython 3.11+ merely touching ``__dict__`` turns
the instance's compact attribute array (inline values on the class's shared keys) into a real
dict: the interpreter's specialised attribute loads (LOAD_ATTR_INSTANCE_VALUE) no longer apply,
and every ``cpu.m`` or ``m.step`` on the hot path becomes a dict lookup. On the seed-002 loop
that cost 35 % more instructions per fault. Setting the attributes one by one, in the order the
pickled state lists them (the order __init__ set them), keeps the compact layout.

pickle.loads itself costs more than a short schedule's steps (D1: ~0.8 M instructions of ~3.4 M
per schedule, mostly the __setstate__ calls and the opcode per table entry). ``compile_copier``
makes the copy cheaper: it reads the restored machine (the template) once and writes a Python
function that builds the same object graph directly, attribute by attribute in the template's
order (so the layout stays compact), copying lists, dicts, sets and deques of plain values at
C speed. See compile_copier for what it copies and when it declines.
"""

from __future__ import annotations

import enum
import types
from collections import deque

# How explore's state cache (ptsim.statehash) reads a model object: every field, except that a
# class may declare
#   __state_skip__       fields that never change what a schedule does (report-only history,
#                        runtime attachments, constants);
#   __state_ref__(self)  a plain value naming the object where a CPU's locals refer to it, when
#                        the machine state already hashes its content once;
#   __state_ref_always__ True when it is named by that value wherever it appears (a CPU, the
#                        machine, the scheduler: their content is hashed once, separately);
#   __state_view__(self) extra (name, value) fields standing for skipped ones whose only
#                        part that matters is derived (whether a lock was destroyed, not who
#                        destroyed it at which step).


class Snapshotted:
    """Mixin for a model class whose instances are pickled with the post-setup state."""

    __slots__ = ()

    def __setstate__(self, state: dict) -> None:
        setattr_ = object.__setattr__
        for name, value in state.items():
            setattr_(self, name, value)


# -- the copier ---------------------------------------------------------------------------------

# Values a copy shares with the template instead of copying: immutable, or (functions, classes,
# enum members) pickled by reference, so that pickle.loads gives back the same object too.
_ATOM_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None), type(Ellipsis),
                         range, types.FunctionType, types.BuiltinFunctionType})
_CONTAINERS = (list, tuple, dict, set, frozenset, deque)
# A container written out element by element longer than this, or a function longer than
# MAX_LINES, is not worth compiling: the copier declines and pickle.loads restores.
MAX_ITEMS = 4096
MAX_LINES = 20000


class Unsupported(Exception):
    """The object graph holds something compile_copier does not copy."""


def _atom(obj) -> bool:
    kind = type(obj)
    if kind in _ATOM_TYPES:
        return True
    if kind is tuple or kind is frozenset:
        return all(_atom(x) for x in obj)
    return isinstance(obj, (type, enum.Enum))


def _slot_names(kind: type) -> list[str]:
    names = []
    for klass in kind.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in [slots] if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            if slot.startswith("__") and not slot.endswith("__"):
                slot = f"_{klass.__name__.lstrip('_')}{slot}"  # name mangling
            names.append(slot)
    return names


_UNSET = object()


def _attributes(obj) -> list[tuple[str, object]]:
    """An instance's attributes: its __dict__ in order, then its slots that are set."""
    items = list(getattr(obj, "__dict__", {}).items())
    for name in _slot_names(type(obj)):
        value = getattr(obj, name, _UNSET)
        if value is not _UNSET:
            items.append((name, value))
    return items


def _plain_class(kind: type) -> bool:
    """Instances pickle as object.__new__(kind) plus their attributes (whatever __getstate__
    and __setstate__ do in between, the template shows the attributes they end with)."""
    return (kind.__new__ is object.__new__
            and kind.__reduce_ex__ is object.__reduce_ex__
            and kind.__reduce__ is object.__reduce__
            and not hasattr(kind, "__getnewargs_ex__") and not hasattr(kind, "__getnewargs__")
            and not issubclass(kind, (*_CONTAINERS, BaseException)))


def _children(obj):
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, _CONTAINERS):
        return list(obj)
    return [value for _, value in _attributes(obj)]


class _Compiler:
    def __init__(self, root) -> None:
        self.refs: dict[int, int] = {}  # id -> how many references the graph holds to it
        self.keep: list = []  # the template's objects, alive while their ids are keys
        self._count(root)
        self.consts: list = []
        self.const_ids: dict[int, int] = {}
        self.names: dict[int, str] = {}  # id -> the local that holds its copy
        self.building: set[int] = set()
        self.shells: list[str] = []  # instances, created empty first (cycles go through them)
        self.builds: list[str] = []  # containers referenced more than once, children first
        self.fills: list[str] = []  # instance attributes, in each template's order
        self.pending: list[tuple[str, object]] = []
        self.root = self.expr(root)
        while self.pending:
            name, obj = self.pending.pop(0)
            self._fill(name, obj)

    def _count(self, root) -> None:
        todo = [root]
        while todo:
            obj = todo.pop()
            if _atom(obj):
                continue
            key = id(obj)
            seen = self.refs.get(key)
            self.refs[key] = 1 if seen is None else seen + 1
            if seen is None:
                self.keep.append(obj)
                kind = type(obj)
                if not isinstance(obj, _CONTAINERS) and not _plain_class(kind):
                    raise Unsupported(f"{kind.__module__}.{kind.__qualname__}")
                if kind not in _CONTAINERS:
                    if isinstance(obj, _CONTAINERS):
                        raise Unsupported(f"a subclass of {kind.__mro__[1].__name__}")
                todo.extend(_children(obj))

    def const(self, obj) -> str:
        if type(obj) in (int, bool, type(None)):  # strings too are shared: pickle memoizes them
            return repr(obj)
        index = self.const_ids.get(id(obj))
        if index is None:
            index = self.const_ids[id(obj)] = len(self.consts)
            self.consts.append(obj)
        return f"C[{index}]"

    def _var(self) -> str:
        return f"o{len(self.names)}"

    def expr(self, obj) -> str:
        """An expression for the copy of ``obj`` (creating what it needs first)."""
        if _atom(obj):
            return self.const(obj)
        key = id(obj)
        name = self.names.get(key)
        if name is not None:
            return name
        if type(obj) not in _CONTAINERS:
            name = self.names[key] = self._var()
            self.shells.append(f"{name} = new({self.const(type(obj))})")
            self.pending.append((name, obj))
            return name
        if key in self.building:
            raise Unsupported("a cycle through containers alone")
        self.building.add(key)
        code = self._container(obj)
        self.building.discard(key)
        if self.refs[key] == 1:
            return code
        name = self.names[key] = self._var()
        self.builds.append(f"{name} = {code}")
        return name

    def _only_child(self, obj) -> bool:
        return self.refs.get(id(obj)) == 1

    def _flat_copy(self, obj) -> str | None:
        """An expression copying a container of atoms at C speed, or None if it holds more."""
        kind = type(obj)
        if kind not in (list, dict, set, deque) or not all(map(_atom, _children(obj))):
            return None
        ref = self.const(obj)
        if kind is list:
            return f"{ref}[:]"
        if kind is deque:
            return f"deque({ref}, {obj.maxlen!r})"
        return f"{ref}.copy()"

    def _uniform(self, values) -> str | None:
        """For values that are all containers of atoms of one kind, each referenced only
        there: the copy expression of one, as a function of ``v``."""
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or not all(map(self._only_child, values)):
            return None
        kind = kinds.pop()
        if kind not in (list, dict, set, deque):
            return None
        if not all(all(map(_atom, _children(v))) for v in values):
            return None
        if kind is list:
            return "v[:]"
        if kind is deque:
            return "deque(v, v.maxlen)"
        return "v.copy()"

    def _container(self, obj) -> str:
        flat = self._flat_copy(obj)
        if flat is not None:
            return flat
        kind = type(obj)
        if kind in (set, frozenset):
            raise Unsupported("a set of objects")  # its order would follow their new ids
        if kind is dict:
            if not all(map(_atom, obj)):
                raise Unsupported("a dict keyed by objects")
            each = self._uniform(list(obj.values())) if len(obj) > 8 else None
            if each is not None:
                return f"{{k: {each} for k, v in {self.const(obj)}.items()}}"
            self._check_size(obj)
            return "{" + ", ".join(f"{self.const(k)}: {self.expr(v)}" for k, v in obj.items()) + "}"
        each = self._uniform(list(obj)) if len(obj) > 8 and kind is not tuple else None
        if each is not None:
            comprehension = f"[{each} for v in {self.const(obj)}]"
            return comprehension if kind is list else f"deque({comprehension}, {obj.maxlen!r})"
        self._check_size(obj)
        items = ", ".join(self.expr(x) for x in obj)
        if kind is list:
            return f"[{items}]"
        if kind is tuple:
            return f"({items},)"
        return f"deque([{items}], {obj.maxlen!r})"

    @staticmethod
    def _check_size(obj) -> None:
        if len(obj) > MAX_ITEMS:
            raise Unsupported(f"a {type(obj).__name__} of {len(obj)} objects")

    def _fill(self, name: str, obj) -> None:
        direct = type(obj).__setattr__ is object.__setattr__
        for attr, value in _attributes(obj):
            code = self.expr(value)
            if direct and attr.isidentifier():
                self.fills.append(f"{name}.{attr} = {code}")
            else:
                self.fills.append(f"setattr_({name}, {self.const(attr)}, {code})")

    def source(self) -> str:
        body = self.shells + self.builds + self.fills + [f"return {self.root}"]
        if len(body) > MAX_LINES:
            raise Unsupported(f"{len(body)} lines")
        return "def copy():\n" + "".join(f"    {line}\n" for line in body)


def compile_copier(template):
    """A function that returns a fresh copy of ``template``'s object graph each time it is
    called, or None when the graph holds something it does not copy.

    The copy is what pickle.loads of the pickled template would give (the caller checks that
    once): model instances (classes whose instances pickle as object.__new__ plus attributes)
    are created with object.__new__ and get the template's attributes in the template's order,
    whatever their __getstate__ and __setstate__ did to get there (the template is itself
    restored by pickle.loads, so it already shows what __setstate__ leaves); lists, tuples,
    dicts, sets and deques are copied, at C speed when they hold only plain values; objects
    referenced twice stay shared, and cycles through instances are kept. Plain values (numbers,
    strings, tuples and frozensets of them, functions, classes, enum members) are shared with
    the template, which the caller must never hand out nor change. It declines (None) on
    anything else: a set or a dict keyed by objects (their order would follow new ids), a
    subclass of a container, an object with its own __reduce__, a cycle through containers
    alone, a graph too large to write out."""
    try:
        compiler = _Compiler(template)
        source = compiler.source()
    except (Unsupported, RecursionError):
        return None
    namespace = {"C": tuple(compiler.consts), "new": object.__new__, "deque": deque,
                 "setattr_": object.__setattr__}
    exec(compile(source, "<snapshot copier>", "exec"), namespace)
    return namespace["copy"]
