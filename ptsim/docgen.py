"""docs/reference.md, generated from the registries: `python -m ptsim.docgen` rewrites it, and
tests/test_docs.py fails when the file and the registries disagree."""

from __future__ import annotations

import sys
from pathlib import Path

from . import listing

HEADER = """# Reference

Generated from ptsim's registries by `python -m ptsim.docgen`; do not edit by hand. The same
tables, for the modules you load too, come from `ptsim list ops|functions|config|faults|kinds|
strategies|formats|kernels [--import MODULE] [--json]`.
"""


def _cell(value) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) if not isinstance(v, str) else f'"{v}"' for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _param(p: dict) -> str:
    text = f"`{p['name']}` ({p['type']})"
    if "default" in p:
        default = p["default"]
        text += f" = {_cell(default) if not isinstance(default, str) else repr(default)}"
    return text


def _table(columns: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _kernels_section() -> str:
    from ptsim.kernel_model.kernels import ENVIRONMENT

    rows = listing.kernels()
    intro = ("\n## Kernel profiles\n\n`[scenario] kernel = \"NAME\"`, `--kernel NAME`, "
             "`variant(..., kernel=NAME)`: every config key at that kernel's value; `[config]`, "
             "the variant and `--set` override it. Environment keys ("
             + ", ".join(f"`{k}`" for k in ENVIRONMENT)
             + ") show the usual value; any value of theirs is faithful. `ptsim list kernels "
             "--json` gives the commit or release behind each value.\n")
    profiles = _table(["kernel", "tree read", "what it is"],
                      [[f"`{r['name']}`", _cell(r["tree"]), _cell(r["doc"])] for r in rows])
    keys = [k["name"] for k in listing.config()]
    values = _table(["key", *(f"`{r['name']}`" for r in rows)],
                    [[f"`{k}`", *(_cell(r["config"].get(k, "-")) for r in rows)] for k in keys])
    also = [f"- `{r['name']}` also shipped " + "; ".join(
        f"{a['name']}: " + ", ".join(f"`{k} = {_cell(v)}`" for k, v in a["config"].items())
        for a in r["also"]) for r in rows if r["also"]]
    return "\n".join([intro, profiles, "", values, "", *also]) + "\n"


def reference() -> str:
    parts = [HEADER]
    parts.append("## Ops\n\nAn `[[agent]]` or `[[setup]]` entry's `op` and its parameters "
                 "(a parameter without a default is required).\n")
    parts.append(_table(["op", "parameters", "what it models"],
                        [[f"`{r['name']}`", ", ".join(_param(p) for p in r["params"]) or "-",
                          _cell(r["doc"])] for r in listing.ops()]))
    parts.append("\n## Config keys\n\n`[config]`, a variant's `config = {...}`, `--set KEY=VALUE`."
                 " The default (first) describes current mainline x86-64.\n")
    parts.append(_table(["key", "values (default first)", "meaning", "kernel change"],
                        [[f"`{r['name']}`", _cell(r["values"]), _cell(r["doc"]),
                          _cell(r["commit"])] for r in listing.config()]))
    parts.append("\n## Faults\n\n`[faults]`, a variant's `faults = {...}`, "
                 "`--set faults.KEY=P`: a probability, 0 by default; each decision is a "
                 "recorded schedule choice.\n")
    parts.append(_table(["fault", "meaning"],
                        [[f"`{r['name']}`", _cell(r["doc"])] for r in listing.faults()]))
    parts.append("\n## Bug and hazard kinds\n\nA bug fails a run; a hazard is reported and "
                 "counted, and fails a variant only if it expects it.\n")
    parts.append(_table(["kind", "class", "what was seen"],
                        [[f"`{r['name']}`", r["class"], _cell(r["doc"])]
                         for r in listing.kinds()]))
    parts.append("\n## Strategies\n\n`--strategy`, `[expect] strategy`.\n")
    parts.append(_table(["strategy", "what it does"],
                        [[f"`{r['name']}`", _cell(r["doc"])] for r in listing.strategies()]))
    parts.append("\n## Replay formats\n\n`ptsim replay ... --format NAME`.\n")
    parts.append(_table(["format", "what it prints"],
                        [[f"`{r['name']}`", _cell(r["doc"])] for r in listing.formats()]))
    parts.append(_kernels_section())
    parts.append("\n## Kernel functions\n\nThe model's kernel functions: reports name them, "
                 "and a user module may replace any of them (`@ptsim.kfunc(name, "
                 "replaces=True)`, docs/api.md).\n")
    parts.append(_table(["function", "module", "notes"],
                        [[f"`{r['name']}`", f"`{r['module']}`", _cell(r["doc"])]
                         for r in listing.functions()]))
    return "\n".join(parts) + "\n"


PATH = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def main() -> int:
    PATH.write_text(reference(), encoding="utf-8")
    print(f"wrote {PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
