"""Ctrl-C between schedules, not inside the bookkeeping of one.

stress reports what finished when interrupted (exit 130). A KeyboardInterrupt raised halfway
through recording a schedule would leave it counted in the tally but missing from --out, or
the other way round; inside sigint_deferred() the interrupt waits until the block is done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigint_deferred() -> Iterator[None]:
    # Python runs signal handlers in the main thread only, and only there can one be swapped;
    # an ignored SIGINT (nohup, a background job) stays ignored.
    previous = signal.getsignal(signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or previous in (signal.SIG_IGN, None):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
