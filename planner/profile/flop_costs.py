"""FLOP costs: a profile's cost table with every cost a FLOP count, for plans budgeted in FLOPs.

A measured profile prices a module by what it took on the profiling device; on a small model or a
CPU the fixed costs of a step (the scheduler, launches, the executor's hooks) weigh heavily there,
so a plan that meets "2x" in measured time skips far more than half of the FLOPs. On a large model
on an accelerator the FLOP fraction is the closer guide. This module turns the FLOP columns every
profile records (fvcore counts, unless made with ``--no-flops``) into the same cost table, in
"milliseconds" at a nominal rate, so one :class:`~planner.profile.latency.LatencyModel` serves both:

- a module costs its FLOPs (``self_flops`` for its own compute; half of it for one branch of batched
  CFG);
- a reuse operation (copy, residual add, forecast, CFG share) costs nothing: a FLOP count is what
  ``torch.utils.flop_counter`` counts (matrix products, convolutions, attention), the count the bench
  reports, and it leaves element-wise work out;
- the transformer outside its blocks costs the rest of its FLOPs per call; nothing outside the
  transformer costs anything, and the executor's hooks are free.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.profile.timing import REUSE_COLUMNS

# What a search's latency model prices modules by: the profile's measured times, or their FLOPs.
COST_SOURCES = ("measured", "flops")
# One "millisecond" per this many fvcore FLOPs. Only ratios of costs matter to a predicted speedup;
# the rate just keeps the numbers readable.
NOMINAL_FLOPS_PER_MS = 1e6
FIXED_ROWS = (("<outside blocks>", "call"), ("<outside transformer>", "step"), ("<outside loop>", "run"),
              ("<vae decode>", "run"))


def check_cost_source(costs: str) -> str:
    """``costs`` when it names a cost source; a one-line PlannerError otherwise."""
    if costs not in COST_SOURCES:
        raise PlannerError(f"costs must be one of {', '.join(COST_SOURCES)}, got {costs!r}")
    return costs


def flop_cost_table(cost: pd.DataFrame, transformer_flops: float, layout: str, transformers: int = 1,
                    where: str = "profile") -> pd.DataFrame:
    """The cost table of FLOP costs for ``cost``'s module rows (which need ``flops`` and ``self_flops``);
    ``transformer_flops`` is one transformer call's FLOPs at the table's batch and ``transformers`` how many transformers share the rows (each call runs one). The module's own
    ``fixed`` rows are replaced. Raises PlannerError (naming ``where``) when a module has no FLOP count."""
    mods = cost[cost.kind != "fixed"].copy()
    flops = pd.to_numeric(mods["flops"], errors="coerce") if "flops" in mods else pd.Series(np.nan, index=mods.index)
    if len(mods) == 0 or not np.isfinite(flops).all() or not np.isfinite(transformer_flops or np.nan):
        raise PlannerError(f"{where} has no FLOP counts (made with --no-flops?): FLOP costs need them; "
                           "profile again without --no-flops")
    half = 2.0 if CfgLayout(layout).batched else 1.0
    mods["latency_ms"] = flops / NOMINAL_FLOPS_PER_MS
    mods["latency_iqr_ms"] = 0.0
    mods["latency_half_ms"] = mods["latency_ms"] / half
    mods["self_ms"] = pd.to_numeric(mods["self_flops"], errors="coerce").fillna(flops) / NOMINAL_FLOPS_PER_MS
    mods["self_half_ms"] = mods["self_ms"] / half
    for col in REUSE_COLUMNS.values():
        mods[col] = 0.0
    mods["hook_ms"] = 0.0
    blocks = float(flops[mods.kind == "block"].sum()) / max(1, transformers)
    call_ms = max(0.0, float(transformer_flops) - blocks) / NOMINAL_FLOPS_PER_MS
    batch = int(mods.batch.iloc[0])
    fixed = pd.DataFrame([
        {"module": name, "kind": "fixed", "block": -1, "parent": "", "scope": scope, "batch": batch,
         "latency_ms": ms, "latency_iqr_ms": 0.0, "latency_half_ms": ms, "self_ms": ms, "self_half_ms": ms,
         "hook_ms": np.nan}
        for (name, scope), ms in zip(FIXED_ROWS, (call_ms, 0.0, 0.0, 0.0))])
    return pd.concat([mods, fixed], ignore_index=True)
