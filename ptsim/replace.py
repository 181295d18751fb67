"""A variant's ``replace = { target = "replacement" }``: the model runs a user's patched kernel
function (or op) wherever it would call the original.

Agents call kernel functions by their module-level names, so a replacement is installed by
rebinding every module-level name that refers to the original, and undone afterwards. Nothing
is indirected: a schedule without replacements runs exactly the code it always ran, at the
same cost. Installation is process-wide, so it lasts only while one engine runs a schedule (or
builds its post-setup machine).
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

from ptsim.kernel_model.registry import ACTIVE_OPS, FUNCTIONS, OPS, REPLACEMENTS


class ReplaceError(Exception):
    """A replacement that does not fit its target: (target, what is wrong)."""

    def __init__(self, target: str, what: str) -> None:
        super().__init__(target, what)
        self.target = target
        self.what = what


def _signature(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def resolve(target: str, name: str):
    """(original function, replacement function, whether target is an op), checked."""
    if target in OPS and target not in FUNCTIONS:
        original = OPS[target].fn
        if name in OPS:
            replacement = OPS[name].fn
            if [(p.name, p.type) for p in OPS[name].params] != \
                    [(p.name, p.type) for p in OPS[target].params]:
                raise ReplaceError(target, f"op {name!r} has other parameters than {target!r}")
            return original, replacement, True
    elif target in FUNCTIONS:
        original = FUNCTIONS[target].fn
    else:
        raise ReplaceError(target, "no kernel function or op of that name (see `ptsim list "
                           "functions` and `ptsim list ops`)")
    entry = REPLACEMENTS.get(name)
    if entry is None or entry.target != target:
        known = [r.name for r in REPLACEMENTS.values() if r.target == target]
        raise ReplaceError(target, f"no replacement {name!r} declared for it (declared: "
                           f"{', '.join(known) or 'none'}; declare one with "
                           f"@ptsim.kfunc({target!r}, replaces=True) and load its module with "
                           "--import)")
    if _signature(entry.fn) != _signature(original):
        raise ReplaceError(target, f"{name} takes ({', '.join(n for n, _ in _signature(entry.fn))})"
                           f" but {target} takes ({', '.join(n for n, _ in _signature(original))})")
    return original, entry.fn, target in OPS


class Patch:
    """The rebindings one variant's replacements need, found once (when the engine is made)."""

    def __init__(self, pairs) -> None:
        self.swaps: list[tuple[dict, str, object, object]] = []
        self.ops: dict[str, object] = {}
        for target, name in pairs:
            original, replacement, is_op = resolve(target, name)
            if is_op:
                self.ops[target] = replacement
            for module in list(sys.modules.values()):
                namespace = getattr(module, "__dict__", None)
                if not isinstance(namespace, dict):
                    continue
                for key, value in list(namespace.items()):
                    if value is original:
                        self.swaps.append((namespace, key, original, replacement))

    @contextmanager
    def installed(self):
        for namespace, key, _original, replacement in self.swaps:
            namespace[key] = replacement
        ACTIVE_OPS.update(self.ops)
        try:
            yield
        finally:
            for namespace, key, original, _replacement in self.swaps:
                namespace[key] = original
            for name in self.ops:
                ACTIVE_OPS.pop(name, None)


@contextmanager
def nothing():
    yield
