"""``planner bench``: every method on one model, sampler and set of held-out seeds, side by side.

* ours: every registered search strategy at each budget (``search`` package), applied by the executor;
* baselines: no cache, fewer sampling steps at the same cost, and the ``uniform`` (FORA) and
  ``smoothcache`` strategies;
* peers (``planner.bench.peers``): diffusers' FirstBlockCache and TaylorSeer hooks and cache-dit's
  DBCache with and without its TaylorSeer calibrator, each swept over its knob.

All of them are timed against full compute in one interleaved schedule
(``planner.evaluate.time_against_reference``) and scored against the full run from the same seeds;
``planner.bench.report`` writes the table (CSV, markdown), the Pareto plot and the environment.
"""

from planner.bench.run import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "run_bench"]
