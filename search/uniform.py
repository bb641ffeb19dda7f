"""``uniform``: FORA's fixed interval. Every module reuses on all but every N-th step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from planner.modules import modules_at_level
from planner.search import Strategy, StrategySettings, register
from planner.search._knob import choose_knob, on_levels

LEVEL_ACTION = {"sublayer": "R", "block": "D"}  # FORA reuses sub-layer outputs; blocks reuse residuals


def uniform_codes(steps: int, interval: int, action: str = "R") -> str:
    """``C`` on steps 0, N, 2N, ... and ``action`` elsewhere."""
    return "".join("C" if i % interval == 0 else action for i in range(steps))


class UniformSettings(StrategySettings):
    level: Literal["auto", "sublayer", "block"] = Field(
        "auto", description="sublayer: attention and MLP outputs reused (FORA); block: block residuals reused; "
                            "auto: both searched, the one with the lower calibration error kept")


@register
class Uniform(Strategy):
    """Every module of the level computes once every N steps; N is the smallest interval that meets the budget."""

    name = "uniform"
    summary = "FORA: every module reuses on all but every N-th step (a baseline)"
    Settings = UniformSettings

    def search(self, context, budget):
        def at_level(level):
            names = modules_at_level(context.modules, level)

            def decisions_for(interval):
                return {n: uniform_codes(context.steps, interval, LEVEL_ACTION[level]) for n in names}

            return choose_knob(
                context, budget, range(2, context.steps + 1), decisions_for, self.name,
                lambda n: {"level": level, "interval": n}, f"reusing every {level} on all but every N-th step",
            )

        return on_levels(self.settings.level, at_level, budget)
