"""The executor: applies a cache plan to any diffusers pipeline or transformer through diffusers hooks.

``apply_plan(pipe, plan)`` puts a step tracker on the transformer and a :class:`CacheHook` on each
module whose decisions are not all ``compute``; it returns a :class:`PlanHandle` (also a context
manager) with ``remove()`` and ``stats()``. No class is patched; after ``remove()`` the modules are
as they were.

What each action returns (per CFG branch, per module):

* ``compute`` (C): run the module; its cache entry for this branch becomes this output.
* ``reuse`` (R): the last computed output. On attention/MLP sub-layers that is the output before
  the block applies its gate and residual, so the current step's modulation is still applied (L2C).
* ``reuse_residual`` (D, blocks only): this step's input plus the last computed residual,
  ``x_now + (out_c - x_c)``, for every stream the block returns (diffusers'
  ``TransformerBlockRegistry`` maps ``(encoder_hidden_states, hidden_states)`` outputs to their
  inputs; a ``None`` output such as SD3's last block's stays ``None``). Residuals telescope:
  when blocks i..j all last computed at the same step and all reuse their residuals now, the
  result is ``x_i,now + (out_j,c - x_i,c)``, the range residual (equal up to float rounding).
* ``forecast`` (F): ``o2 + (o2 - o1) * (t_k - t2) / (t2 - t1)`` from the last two computed outputs
  ``o1`` (at time t1) and ``o2`` (at t2), at step k: first-order Taylor extrapolation in the
  sampler's own time (the plan's timesteps, which for flow-matching schedulers are sigma x 1000;
  step indices where a plan records none). With only one output cached it reuses it.
* ``forecast2`` (Q): the same from the last three computed outputs with the quadratic through them
  (Newton's polynomial, a second-order Taylor forecast that needs no even spacing). With two
  outputs cached it forecasts to first order, with one it reuses.
* ``forecast2_limited`` (L): ``forecast2`` with its second-order term (what the quadratic adds to the
  first-order forecast) scaled down, per sample, to the first-order term's norm where it is larger
  (``hooks.limited_forecast2``). The same fallbacks as ``forecast2``.
* ``share_cfg`` (S): this branch gets the other branch's fresh output of this step (the module
  runs once, on the other half only). Its own cache entry is left as it was.

Forecasts on attention/MLP sub-layers extrapolate the output before the block's gate and residual,
as reuse does. Caches follow HarmoniCa's rule: an entry is refreshed only when its module computes. The first
step always computes (plans are checked for it). A reuse with nothing cached computes instead and
counts as a fallback in ``stats()``. When only one CFG half computes, the module runs on that half
(batch-dimension arguments sliced; rotary embeddings never) and the full output is assembled.

Strategies drive the same hooks through an internal session (:mod:`planner.executor.session`):
soft gates for learned routers, steps driven by the caller, decisions edited during a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.executor.handle import PlanHandle
from planner.plan import Plan

__all__ = ["apply_plan", "PlanHandle"]


def apply_plan(target: Any, plan: Plan | str | Path, *, strict: bool = True) -> PlanHandle:
    """Apply ``plan`` (a Plan or a plan file) to a pipeline, Runner or transformer; returns the handle.

    Checks first (PlannerError on a mismatch): the plan's own rules, and that it fits the model
    (class, block count, module names, and with ``strict`` the fingerprint). At the first transformer
    call of every run, before anything is computed, it checks the run against the sampler the plan
    records: given a pipeline, its scheduler's class, config hash, number and values of timesteps,
    and its CFG switch; for batched CFG plans, that the call carries CFG halves. Given a bare
    transformer it compares each step's timestep with the plan's (so another scheduler or step count
    is refused at the first call, a run longer than the plan at the step after its last). During the
    run it checks the calls per step. ``strict=False`` skips the fingerprint check and turns the run
    checks into one ``warnings.warn`` per run (steps beyond the plan then run uncached).
    """
    from planner.executor.session import install

    return install(PlanHandle, target, plan, strict=strict)
