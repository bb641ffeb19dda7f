"""The budget a search must meet: a predicted speedup (``2x``, ``60%``) or an error target; and the
two small tools every strategy uses to meet one: the budget check and a bisection."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from planner.errors import PlannerError

# Predicted speedups come out of float sums: a plan at 2.0 - 1e-12 meets a 2x budget.
SPEEDUP_SLACK = 1e-9


@dataclass(frozen=True)
class Budget:
    """Exactly one of: ``speedup`` (predicted speedup over full compute at least this) or
    ``max_error`` (relative L1 of the final output at most this; then time is minimised)."""

    speedup: float | None = None
    max_error: float | None = None

    def __post_init__(self):
        if (self.speedup is None) == (self.max_error is None):
            raise PlannerError("give either a speed budget (--budget 2x or 60%) or an error target (--max-error), not both")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup >= 1):
            raise PlannerError(f"a speed budget must be a finite speedup of at least 1x, got {self.speedup:g}x")
        if self.max_error is not None and not (math.isfinite(self.max_error) and self.max_error > 0):
            raise PlannerError(f"--max-error must be a positive number, got {self.max_error:g}")

    @classmethod
    def parse(cls, text: str | None = None, max_error: float | None = None) -> "Budget":
        """``"2x"`` or ``"2.5x"``: speedup; ``"60%"``: run time at most 60% of full; or ``max_error``."""
        if text is None:
            return cls(max_error=max_error)
        if max_error is not None:
            return cls(speedup=1.0, max_error=max_error)  # raises: both given
        value = text.strip().lower()
        # ASCII digits only: Python's \d (and float) would also read other scripts' digits, e.g. fullwidth ones
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*x", value, re.ASCII):
            return cls(speedup=float(m.group(1)))
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", value, re.ASCII):
            percent = float(m.group(1))
            if not 0 < percent <= 100:
                raise PlannerError(f"a time budget must lie in (0%, 100%], got {text!r}")
            return cls(speedup=100.0 / percent)
        raise PlannerError(f"cannot read budget {text!r}: write a speedup such as 2x or a time fraction such as 60%")

    @property
    def latency_fraction(self) -> float | None:
        """Predicted run time allowed, as a fraction of full compute (``None`` for an error target)."""
        return None if self.speedup is None else 1.0 / self.speedup

    def met(self, predicted_speedup: float | None, error: float | None) -> bool:
        """Whether a plan with these figures satisfies the budget."""
        if self.speedup is not None:
            return self.speed_met(predicted_speedup)
        return error is not None and error <= self.max_error + 1e-12

    def speed_met(self, predicted_speedup: float | None) -> bool:
        """Whether ``predicted_speedup`` reaches the speed budget (an error target: always)."""
        if self.speedup is None:
            return True
        return predicted_speedup is not None and predicted_speedup >= self.speedup - SPEEDUP_SLACK

    def label(self) -> str:
        """Short form for file names and tables: ``2x``, ``1.5x``, ``err0.05``."""
        if self.speedup is not None:
            return f"{self.speedup:g}x"
        return f"err{self.max_error:g}"

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "max_error": self.max_error}


def unreachable(budget: Budget, best_speedup: float, how: str) -> PlannerError:
    """The error for a speed budget no plan reaches, with the best predicted figure there is."""
    return PlannerError(f"budget {budget.label()} cannot be met: the best predicted speedup {how} is {best_speedup:.2f}x")


def first_true(n: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest ``i`` in ``0..n-1`` with ``ok(i)``, for an ``ok`` that stays true once true (bisection,
    about log2(n) calls); ``None`` when even ``ok(n - 1)`` is false."""
    if n < 1 or not ok(n - 1):
        return None
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
