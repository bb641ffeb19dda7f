"""``smoothcache``: SmoothCache's calibration-driven schedules, one per module type.

For each module type (attention, cross-attention, MLP; or blocks) the profile gives the relative L1
change of its output against the output 1..k steps back, averaged over all blocks of that type.
For a threshold alpha, walk the steps: compute at step i, then reuse for the longest run of
following steps whose error against step i stays within alpha. One alpha for the whole model,
the smallest that meets the budget.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from planner.modules import LEVEL_KINDS
from planner.search import Strategy, StrategySettings, register
from planner.search._knob import choose_knob, on_levels


def smooth_schedule(curves: dict[int, np.ndarray], alpha: float) -> str:
    """The code string for one module type: ``curves[k][j]`` is the error of step j's output against
    step j-k's; after each computed step i reuse while ``curves[l][i+l] <= alpha`` for l = 1, 2, ..."""
    steps = len(next(iter(curves.values())))
    max_lag = max(curves)
    codes, i = [], 0
    while i < steps:
        codes.append("C")
        run = 0
        while run < max_lag and i + run + 1 < steps and curves[run + 1][i + run + 1] <= alpha:
            run += 1
        codes.extend("R" * run)
        i += run + 1
    return "".join(codes)


class SmoothCacheSettings(StrategySettings):
    level: Literal["auto", "sublayer", "block"] = Field(
        "auto", description="as in uniform; blocks follow their residual's curves and reuse residuals")
    lags: int = Field(3, ge=1, description="longest run of reuses (capped by the lags the profile holds)")


@register
class SmoothCache(Strategy):
    """One schedule per module type from the profile's lag curves, the threshold alpha chosen to meet the budget."""

    name = "smoothcache"
    summary = "SmoothCache: one schedule per module type from the profile's lag curves (a baseline)"
    Settings = SmoothCacheSettings

    def search(self, context, budget):
        return on_levels(self.settings.level, lambda level: self._at_level(context, budget, level), budget)

    def _at_level(self, context, budget, level):
        profile = context.profile
        kinds = {m.name: m.kind for m in context.modules if m.kind in LEVEL_KINDS[level]}
        lags = min(self.settings.lags, profile.meta.lags)
        residual = level == "block"
        curves: dict[str, dict[int, np.ndarray]] = {}
        for kind in set(kinds.values()):
            names = [n for n, k in kinds.items() if k == kind]
            # NaN (no such lag at the first steps) becomes inf: never reuse across it.
            curves[kind] = {
                lag: np.nan_to_num(profile.curve(lag=lag, residual=residual)[names].mean(axis=1).to_numpy(), nan=np.inf)
                for lag in range(1, lags + 1)
            }
        finite = np.concatenate([c[c < np.inf] for per in curves.values() for c in per.values()])
        alphas = np.unique(finite)  # schedules only change at these values
        if budget.max_error is not None:  # each candidate costs a calibration run: sample the range
            alphas = np.unique(alphas[np.linspace(0, len(alphas) - 1, 24).round().astype(int)])
        action = "D" if residual else "R"

        def decisions_for(alpha):
            schedule = {kind: smooth_schedule(c, alpha).replace("R", action) for kind, c in curves.items()}
            return {n: schedule[k] for n, k in kinds.items()}

        return choose_knob(
            context, budget, alphas, decisions_for, self.name,
            lambda a: {"alpha": float(a), "lags": lags, "level": level}, f"of a SmoothCache schedule ({level} level)",
        )
