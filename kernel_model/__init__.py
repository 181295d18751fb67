"""The simulated machine and the kernel objects it holds.

Importing the package imports every model module, so that each config key, fault and bug kind
they declare (kernel_model.registry) is registered before a scenario is read.
"""

from . import machine, mmu_gather, sanitizers  # noqa: F401

# The model's version: it changes whenever the model's behaviour does (what a schedule does
# with the same choices), and a token made under another version is refused (ptsim.token).
MODEL_VERSION = "2026.12.01"
