"""Model objects restored from the engine's post-setup snapshot, at full attribute speed.

Every schedule starts from pickle.loads of the machine as setup left it. Pickle's default
restore writes the state into ``obj.__dict__``, and on CPython 3.11+ merely touching
``__dict__`` turns the instance's compact attribute array (inline values on the class's
shared keys) into a real dict: the interpreter's specialised attribute loads
(LOAD_ATTR_INSTANCE_VALUE) no longer apply, and every ``cpu.m`` or ``m.step`` on the hot path
becomes a dict lookup. On the seed-002 loop that cost 35 % more instructions per fault.
Setting the attributes one by one, in the order the pickled state lists them (the order
__init__ set them), keeps the compact layout.
"""

from __future__ import annotations

# How explore's state cache (ptsim.statehash) reads a model object: every field, except that a
# class may declare
#   __state_skip__       fields that never change what a schedule does (report-only history,
#                        runtime attachments, constants);
#   __state_ref__(self)  a plain value naming the object where a CPU's locals refer to it, when
#                        the machine state already hashes its content once;
#   __state_ref_always__ True when it is named by that value wherever it appears (a CPU, the
#                        machine, the scheduler: their content is hashed once, separately).


class Snapshotted:
    """Mixin for a model class whose instances are pickled with the post-setup state."""

    __slots__ = ()

    def __setstate__(self, state: dict) -> None:
        setattr_ = object.__setattr__
        for name, value in state.items():
            setattr_(self, name, value)
