"""`ptsim list WHAT`: every registry as rows (a list of dicts with at least name and doc).

The docs' reference tables are made from the same rows.
"""

from __future__ import annotations

import json

from ptsim.kernel_model.kernels import KERNELS, profile_field
from ptsim.kernel_model.registry import CONFIG, FAULTS, FUNCTIONS, KINDS, OPS, REPLACEMENTS

from .events import FORMATS
from .strategies import STRATEGIES


def _value(value):
    """A value as JSON can hold it."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def ops() -> list[dict]:
    return [{"name": o.name, "doc": o.doc, "module": o.module,
             "params": [{"name": p.name, "type": p.type}
                        | ({} if p.required else {"default": _value(p.default)})
                        for p in o.params]}
            for o in OPS.values()]


def functions() -> list[dict]:
    """Kernel functions, each with the replacements loaded modules declare for it."""
    return [{"name": f.name, "doc": f.doc, "module": f.module,
             "replacements": [r.name for r in REPLACEMENTS.values() if r.target == f.name]}
            for f in sorted(FUNCTIONS.values(), key=lambda f: f.name)]


def config() -> list[dict]:
    return [{"name": k.name, "doc": k.doc, "values": list(k.values), "default": k.default,
             "commit": k.commit, "module": k.module} for k in CONFIG.values()]


def faults() -> list[dict]:
    return [{"name": f.name, "doc": f.doc, "values": f.values, "default": f.default,
             "commit": f.commit, "module": f.module} for f in FAULTS.values()]


def kinds() -> list[dict]:
    entries = sorted(KINDS.values(), key=lambda k: (k.cls != "bug", k.name))
    return [{"name": k.name, "class": k.cls, "doc": k.doc, "module": k.module} for k in entries]


def strategies() -> list[dict]:
    return [{"name": s.name, "doc": s.doc, "module": s.module} for s in STRATEGIES.values()]


def kernels() -> list[dict]:
    """Kernel profiles: each with ``config`` (every registered key it sets), ``sources`` (the
    commit or release behind each value) and ``also`` (other configurations it shipped)."""
    return [profile_field(p) for p in KERNELS.values()]


def formats() -> list[dict]:
    return [{"name": f.name, "doc": f.doc} for f in FORMATS.values()]


# WHAT -> (rows, the columns of the text table)
LISTS = {
    "ops": (ops, ["name", "params", "doc"]),
    "functions": (functions, ["name", "module", "replacements", "doc"]),
    "config": (config, ["name", "values", "default", "doc", "commit"]),
    "faults": (faults, ["name", "values", "default", "doc"]),
    "kinds": (kinds, ["name", "class", "doc"]),
    "strategies": (strategies, ["name", "doc"]),
    "formats": (formats, ["name", "doc"]),
    "kernels": (kernels, ["name", "doc", "tree", "config"]),
}


def rows(what: str) -> list[dict]:
    rows_of, _columns = LISTS[what]
    out = rows_of()
    json.dumps(out)  # every row must be JSON as it is
    return out
