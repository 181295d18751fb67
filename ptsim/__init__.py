"""ptsim: a concurrency simulator for the Linux kernel's page-table lifetime protocols.

The Python API (docs/api.md):

- ``ptsim.load(path, imports=[...])`` / ``ptsim.loads(text, name=...)``: a scenario;
  ``.variant(name, **config, faults={...})``: one variant, which ``run``s, ``stress``es,
  ``explore``s, ``replay``s and ``shrink``s.
- Your own kernel paths: ``@ptsim.op("name")``, ``@ptsim.kfunc("name", replaces=True)``,
  ``await ptsim.run_op(cpu, "name", ...)``, ``@ptsim.strategy("name")``; parameter types
  ``ptsim.Addr``, ``ptsim.Size``, ``ptsim.PmdAddr``.
- ``ptsim.ScenarioError``, ``ptsim.TokenError``; ``ptsim.testing`` for pytest.
"""

__version__ = "0.2.0"

from .api import Finding, Result, Scenario, Summary, Variant, load, loads  # noqa: E402
from .kernel_model.registry import Addr, PmdAddr, Size, kfunc, op, run_op  # noqa: E402
from .scenario import ScenarioError  # noqa: E402
from .strategies import Strategy, strategy  # noqa: E402
from .token import TokenError  # noqa: E402

__all__ = ["Addr", "Finding", "PmdAddr", "Result", "Scenario", "ScenarioError", "Size",
           "Strategy", "Summary", "TokenError", "Variant", "__version__", "kfunc", "load",
           "loads", "op", "run_op", "strategy"]
