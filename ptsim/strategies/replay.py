"""Replaying a token: the recorded answers, one by one."""

from __future__ import annotations

from . import Divergence, Strategy


class ReplayStrategy(Strategy):
    name = "replay"

    def __init__(self, choices: list[int]) -> None:
        self.choices = choices
        self.pos = 0

    def _next(self, limit: int, what: str, step: int) -> int:
        if self.pos >= len(self.choices):
            raise Divergence(f"the token's choices end before step {step} ({what})")
        value = self.choices[self.pos]
        if value >= limit:
            raise Divergence(f"choice {self.pos} ({value}) is impossible at step {step}: "
                             f"{what} has only {limit} options")
        self.pos += 1
        return value

    def pick(self, options: list, current, step: int) -> int:
        return self._next(len(options), "the scheduler", step)

    def fault(self, p: float, current, step: int) -> int:
        return self._next(2, "a fault injection", step)

    def leftover(self) -> int:
        return len(self.choices) - self.pos
