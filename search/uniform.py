"""``uniform``: FORA's fixed interval. Every module reuses on all but every N-th step."""

from __future__ import annotations

from search import Strategy, register
from search._common import choose_knob, on_levels

LEVEL_KINDS = {"sublayer": ("attn", "cross_attn", "mlp"), "block": ("block",)}
LEVEL_ACTION = {"sublayer": "R", "block": "D"}  # FORA reuses sub-layer outputs; blocks reuse residuals


def uniform_codes(steps: int, interval: int, action: str = "R") -> str:
    """``C`` on steps 0, N, 2N, ... and ``action`` elsewhere."""
    return "".join("C" if i % interval == 0 else action for i in range(steps))


@register
class Uniform(Strategy):
    """Params: ``level`` = ``sublayer`` (FORA: attention and MLP outputs reused), ``block`` (block
    residuals reused) or ``auto`` (sublayer when it can meet the budget, else block); N is the
    smallest interval that meets the budget."""

    name = "uniform"

    def search(self, context, budget):
        def at_level(level):
            names = [m.name for m in context.modules if m.kind in LEVEL_KINDS[level]]

            def decisions_for(interval):
                return {n: uniform_codes(context.steps, interval, LEVEL_ACTION[level]) for n in names}

            return choose_knob(
                context, budget, range(2, context.steps + 1), decisions_for, self.name,
                lambda n: {"level": level, "interval": n}, f"reusing every {level} on all but every N-th step",
            )

        return on_levels(self.params.get("level", "auto"), at_level)
