"""``planner bench``: every method on one model (or each of several), sampler and set of held-out seeds,
side by side.

* ours: every registered search strategy at each budget (``search`` package), applied by the executor;
* baselines: no cache, fewer sampling steps at the same cost, and the ``uniform`` (FORA) and
  ``smoothcache`` strategies at their better level;
* peers (``planner.bench.peers``): diffusers' FirstBlockCache, TaylorSeer, MagCache, Pyramid Attention
  Broadcast and FasterCache hooks and cache-dit's DBCache (F1B0, F2B1, F4B0) with and without its
  TaylorSeer calibrator, each swept over its knob.

All of them are timed against full compute in one interleaved schedule
(``planner.evaluate.time_against_reference``), their FLOPs counted as they run (``planner.bench.flops``)
and scored against the full run from the same seeds; ``planner.bench.margins`` reads quality at
matched realized and FLOP speedup and the margins of our best strategy; ``planner.bench.report``
writes the table (CSV, markdown, JSON), the Pareto plot and the environment.
"""

from planner.bench.run import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "run_bench"]
