"""``greedy``: DiTFastAttn's post-training greedy plan search, generalised to every executor action.

One pass, for a threshold scale delta: run the calibration inputs through the sampler; at each
step t (the first always computes), with the executor's caches as the plan so far left them:

1. the reference is the full-compute model output at t, on the x_t of the *already compressed*
   trajectory (the pass is a real run of the plan being built);
2. modules are visited in forward order; each tries its candidate actions from most to least
   saving and keeps the first whose error against the reference stays within
   ``(block + 1) / blocks * delta * w_t`` (DiTFastAttn's position scaling, times a step weight
   ``w_t``, below), else computes. Earlier modules keep their choice while later ones are tried;
   a block that reuses takes its sub-layers with it;
3. the step then runs with the chosen actions, and the trajectory moves on.

Trials rewind the executor's caches with ``PlanHandle.snapshot/restore``, so everything runs
through the executor: one implementation of the caching semantics.

Deviations from DiTFastAttn, and why (digits-dit, DDIM-50, guidance 3, 8 calibration samples,
2 CPU cores; calibration error = relative L1 of the final latents against full compute):

* **Error on what the sampler consumes.** DiTFastAttn compares the raw model output. Under CFG
  the sampler uses ``eps_u + g (eps_c - eps_u)``, and with g = 3 a small error on either branch
  is amplified up to 2g - 1 = 5 times, differently per branch; so with a batched CFG layout the
  error is measured on the guided prediction (``error="guided"``, default; ``"raw"`` is
  DiTFastAttn's). With separate CFG calls (Flux true CFG) each call is compared raw.
* **Step-dependent threshold.** DiTFastAttn's threshold is the same at every step, but errors
  compound and the late steps are the sensitive ones (METHODS.md; the profile's median lag-1
  residual change of the blocks is about 0.05 up to step 45 and 0.11, 0.17, 0.33 at steps 47-49).
  ``w_t = clip(m / c_t, 0, 1)``, with ``c_t`` that median at step t and ``m`` its median over
  steps: steps that change more than usual get a proportionally tighter threshold
  (``step_weight="profile"``, default; ``"none"`` is DiTFastAttn's constant threshold).
* **Bounded runs of reuse.** Each step's error is small where a module reuses, but a stale cache
  biases consecutive steps the same way, which the per-step criterion does not see: with runs
  unbounded the old search gave 0.171 at 2x (uniform interval 3: 0.052). A module may reuse at
  most ``max_run`` steps in a row (SmoothCache reuses at most 3). By default the bound is the
  shortest that can meet the budget: it starts at ``max(1, floor(2 s) - 2)`` for a budget of s,
  skips bounds whose periodic pattern (compute every bound + 1 steps) cannot reach s on the
  latency model, and grows when the passes miss. Measured at 2x (calibration error, forecast
  first): max_run 3 -> 0.0275, max_run 2 -> 0.0219; at 1.5x: max_run 2 -> 0.0224, max_run 1 ->
  0.0071 (uniform: 0.0234 at 1.64x).
* **Fewer candidates.** Every trial is a full model call (about 50 ms here for 8 samples x 2
  branches), and the old default (blocks: residual reuse and forecast, sub-layers: reuse and
  forecast, plus CFG sharing: up to 72 trials per step) took about 100 s per pass and 597 s for a
  2x search. METHODS.md: block-level skipping beats sub-layer reuse (sub-layer reuse keeps norms
  and modulation, which caps its speed), so the default tries blocks only
  (``actions={"block": "FD"}``, ``share_cfg=false``); with the run bound most (step, block) pairs
  are forced computes that need no trial. Sub-layer reuse and CFG sharing remain available through
  ``actions`` / ``share_cfg``.
* **Forecast first.** Candidates go from most to least saving by the profile's costs; actions whose
  costs differ by under 5% of the module's compute save the same and keep the order ``actions``
  gives (:func:`by_saving`). Forecast and residual reuse both skip the block, and forecast goes
  first: the per-step error prefers residual reuse (picking the least per-step error among the
  two gave 0.0415 at 2x), but its stale residual biases every step of a run the same way, while a
  forecast follows the trend; the final error says forecast (uniform schedules, calibration error:
  every 2nd step 0.0098 forecast vs 0.0234 residual reuse, every 3rd 0.0235 vs 0.0518; greedy at
  2x 0.0219 vs 0.0474 with residual reuse first).
* **Fewer passes.** Every trial's error divided by its threshold weight is the smallest delta at
  which that trial would have been accepted. From one pass those numbers predict, for any
  delta, which (step, module) pairs reuse, and so (through the latency model) the delta that just
  meets the budget; the next pass runs there. Predictions ignore that the trajectory changes with
  the plan, so a pass that misses the budget raises delta by at least ``step_up`` (10%, doubling
  on each further miss) and re-estimates from its own records. 2x: 5 passes, 14-17 s (was 6
  passes, 597 s); 1.5x: 4 passes, 8-10 s; 3x: 18-24 s.
* **No extra evaluation.** Each pass is itself a run of the plan on the calibration inputs, so
  its final latents give the plan's calibration error; the search returns the pass that meets
  the budget with the least calibration error.

Measured on the error view and the step weight (2x, max_run 3, residual reuse first): guided error + profile weight
0.058, raw error + profile weight 0.056, guided error + constant threshold 0.063: the error view
is a wash here, the step weight helps.

The budget is met by the estimate-and-correct loop above (``max_passes``, default 6); an error
target by doubling then bisection of delta in log space.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from planner.errors import PlannerError
from planner.executor import apply_plan
from planner.executor.tree import first_tensor
from planner.metrics import rel_l1
from planner.plan import BRANCHES, branches_of
from planner.runner import CFG_COND_UNCOND, CFG_SEPARATE, CFG_UNCOND_COND
from search import Strategy, register
from search._common import unreachable

GREEDY_HOOK = "planner_greedy_search"
DEFAULT_ACTIONS = {"block": "FD", "attn": "", "cross_attn": "", "mlp": ""}


def first_acceptable(candidates: Sequence, error_of: Callable, threshold: float):
    """DiTFastAttn's rule: try ``candidates`` in order (most saving first) and return
    ``(index of the first whose error_of(candidate) <= threshold, or None, errors measured)``.
    Stops at the first acceptable one: later candidates are never measured."""
    errors = []
    for i, cand in enumerate(candidates):
        errors.append(float(error_of(cand)))
        if errors[-1] <= threshold:
            return i, errors
    return None, errors


def by_saving(codes: str, compute_s: float, action_s: dict[str, float], tie: float = 0.05) -> str:
    """Action ``codes`` from most to least saving (least predicted cost ``action_s`` first). Codes whose
    costs differ by at most ``tie`` times the module's compute cost save the same: they keep the order
    given (residual reuse and forecast both skip a block; the order of ``actions`` says which goes first)."""
    out: list[str] = []
    for code in codes:
        cost = action_s.get(code, 0.0)
        at = next((i for i, c in enumerate(out) if action_s.get(c, 0.0) > cost + tie * compute_s), len(out))
        out.insert(at, code)
    return "".join(out)


def step_weights(profile, blocks: Iterable[str], steps: int) -> np.ndarray:
    """``w_t = clip(m / c_t, 0, 1)``: ``c_t`` the median lag-1 residual change of the blocks at step t
    in the profile, ``m`` its median over steps (step 0 and missing values: weight 1)."""
    blocks = list(blocks)
    try:
        curve = profile.curve(lag=1, residual=True)[blocks].median(axis=1).to_numpy(dtype=float)
    except Exception:  # a profile without residual curves for these modules: constant threshold
        return np.ones(steps)
    if len(curve) != steps:
        return np.ones(steps)
    finite = curve[np.isfinite(curve) & (curve > 0)]
    if not len(finite):
        return np.ones(steps)
    m = float(np.median(finite))
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(np.isfinite(curve) & (curve > 0), m / curve, 1.0)
    return np.clip(w, 0.0, 1.0)


def module_costs(latency) -> dict[str, tuple[float, dict[str, float]]]:
    """``{module: (seconds to compute it with everything inside, {action: seconds})}`` from a latency model."""
    inside = latency.compute_s
    return {m.name: (inside[m.name], dict(m.reuse_s)) for m in latency.modules}


class _StepSearchHook(ModelHook):
    """Outermost hook on the transformer: turns every call into a greedy selection at its step."""

    def __init__(self, search: "_GreedyPass"):
        super().__init__()
        self.search = search

    def new_forward(self, module, *args, **kwargs):
        return self.search.on_call(lambda: self.fn_ref.original_forward(*args, **kwargs))


class _GreedyPass:
    """One greedy pass at a fixed delta; ``run()`` returns ``(decisions, final latents)``.

    ``records`` collects, per trial of the first (most saving) candidate, ``(step, module, choice,
    required delta)``: the smallest delta at which that candidate would have been accepted."""

    def __init__(self, context, delta: float, actions: dict[str, str], share_cfg: bool, bar=None,
                 weights: np.ndarray | None = None, guided: bool = True, max_run: int | None = None):
        self.ctx = context
        self.delta = delta
        self.layout = context.runner.cfg_layout(context.sampler)
        self.branches = branches_of(self.layout)
        self.modules = context.modules
        self.costs = module_costs(context.latency)
        self.blocks = 1 + max(m.block for m in self.modules)
        self.parent = {m.name: m.name.rsplit(".", 1)[0] for m in self.modules if m.kind != "block"}
        self.actions = actions
        self.share_cfg = share_cfg and len(self.branches) == 2
        self.codes = {m.name: {b: ["C"] * context.steps for b in self.branches} for m in self.modules}
        self.weights = np.ones(context.steps) if weights is None else weights
        self.guidance = float(context.sampler.guidance)
        self.guided = guided and self.layout in (CFG_COND_UNCOND, CFG_UNCOND_COND)
        self.max_run = max_run
        self.position = True  # DiTFastAttn's (block + 1) / blocks threshold scaling
        self.calls = 0
        self.bar = bar
        self.trials = 0
        self.records: list[tuple[int, str, dict, float]] = []

    def run(self):
        ctx = self.ctx
        base = ctx.plan({})
        self.handle = apply_plan(ctx.runner.pipe, base, hook_all=True)
        registry = HookRegistry.check_if_exists_or_initialize(ctx.runner.transformer)
        registry.register_hook(_StepSearchHook(self), GREEDY_HOOK)
        try:
            out = ctx.runner.run(ctx.conditions, ctx.seeds, ctx.sampler, output="latent")
        finally:
            registry.remove_hook(GREEDY_HOOK, recurse=False)
            self.handle.remove()
        return self.decisions(), out

    def decisions(self) -> dict[str, dict[str, str]]:
        return {m: {b: "".join(c) for b, c in per.items()} for m, per in self.codes.items()}

    def _set(self, module: str, step: int, choice: dict[str, str]) -> None:
        for b, code in choice.items():
            self.codes[module][b][step] = code
        self.handle.set_codes(module, {b: "".join(c) for b, c in self.codes[module].items()})

    def _candidates(self, module, active: tuple[str, ...]) -> list[dict[str, str]]:
        """The module's candidate choices, most saving first (see :func:`by_saving`); CFG sharing (the
        module runs on one half) saves least, so it comes last."""
        codes = self.actions.get(module.kind, "")
        if module.name in self.costs:
            codes = by_saving(codes, *self.costs[module.name])
        out = [{b: code for b in active} for code in codes]
        if self.share_cfg and "uncond" in active:
            out.append({b: ("S" if b == "uncond" else "C") for b in active})
        return out

    def _run_length(self, module: str, step: int, active) -> int:
        """How many steps before ``step`` the module has gone without computing (on any active branch)."""
        n = 0
        while step - n - 1 >= 0 and any(self.codes[module][b][step - n - 1] not in "CS" for b in active):
            n += 1
        return n

    def _view(self, out) -> torch.Tensor:
        """What the error is measured on: the guided prediction for batched CFG, else the raw output."""
        t = first_tensor(out)
        if not self.guided:
            return t
        first, second = t.float().chunk(2)
        cond, uncond = (first, second) if self.layout == CFG_COND_UNCOND else (second, first)
        return uncond + self.guidance * (cond - uncond)

    def on_call(self, forward):
        separate = self.layout == CFG_SEPARATE
        step = self.calls // (2 if separate else 1)
        active = (BRANCHES[self.calls % 2],) if separate else self.branches
        self.calls += 1

        def at_step():
            with self.handle.at_step(step):
                return forward()

        if step == 0:
            out = at_step()
        else:
            out = self._select(step, active, at_step)
        if self.bar is not None and (not separate or self.calls % 2 == 0):
            self.bar.update(1)
        return out

    def trial_error(self, step: int, module: str, choice: dict[str, str], at_step, reference, saved) -> float:
        """Run step ``step`` with ``module`` taking ``choice`` (the plan so far elsewhere), return the
        error against ``reference`` and rewind the caches."""
        self._set(module, step, choice)
        try:
            return rel_l1(self._view(at_step()), reference)
        finally:
            self.handle.restore(saved)
            self.trials += 1

    def _select(self, step: int, active: tuple[str, ...], at_step):
        saved = self.handle.snapshot()
        reference = self._view(at_step())
        self.handle.restore(saved)
        for m in self.modules:
            parent = self.parent.get(m.name)
            if parent is not None and any(self.codes[parent][b][step] != "C" for b in active):
                continue  # the block does not run, so neither do its sub-layers
            candidates = self._candidates(m, active)
            if not candidates or self._run_length(m.name, step, active) >= (self.max_run or math.inf):
                self._set(m.name, step, {b: "C" for b in active})
                continue
            weight = ((m.block + 1) / self.blocks if self.position else 1.0) * float(self.weights[step])

            def error_of(choice, name=m.name):
                return self.trial_error(step, name, choice, at_step, reference, saved)

            index, errors = first_acceptable(candidates, error_of, weight * self.delta)
            self.records.append((step, m.name, candidates[0], errors[0] / weight if weight > 0 else math.inf))
            self._set(m.name, step, candidates[index] if index is not None else {b: "C" for b in active})
        return at_step()


def decisions_from_records(records, modules: Iterable[str], branches: Sequence[str], steps: int, delta: float) -> dict:
    """The plan a pass at ``delta`` would pick if every trial's error stayed what ``records`` say
    (the first candidate where its required delta is within ``delta``, else compute)."""
    codes = {m: {b: ["C"] * steps for b in branches} for m in modules}
    for step, module, choice, need in records:
        if need <= delta:
            for b, code in choice.items():
                codes[module][b][step] = code
    return {m: {b: "".join(c) for b, c in per.items()} for m, per in codes.items()}


@register
class Greedy(Strategy):
    """Params: ``delta`` (a fixed threshold scale: no budget search), ``actions`` (per kind, e.g.
    ``{"block": "FD", "mlp": "R"}``; default blocks ``FD`` only: forecast, else residual reuse), ``share_cfg`` (default false),
    ``max_run`` (longest run of reuses; default: the shortest that meets the budget, 3 otherwise),
    ``error`` (``guided`` or ``raw``), ``step_weight`` (``profile``, ``square`` or ``none``), ``position``
    (``linear`` = DiTFastAttn's block scaling, or ``none``), ``max_passes``
    (default 6), ``delta0`` (first pass, default 0.1), ``step_up`` (default 0.1)."""

    name = "greedy"

    def _pass(self, context, delta: float):
        from tqdm.auto import tqdm

        actions = {**DEFAULT_ACTIONS, **self.params.get("actions", {})}
        blocks = [m.name for m in context.modules if m.kind == "block"]
        mode = self.params.get("step_weight", "profile")
        if mode == "profile":
            weights = step_weights(context.profile, blocks, context.steps)
        elif mode == "square":
            weights = step_weights(context.profile, blocks, context.steps) ** 2
        else:
            weights = np.ones(context.steps)
        guided = self.params.get("error", "guided") == "guided"
        max_run = self.params.get("max_run", self._default_max_run)
        bar = tqdm(total=context.steps, desc=f"greedy delta={delta:.4g}", leave=False, disable=not context.progress)
        try:
            p = _GreedyPass(context, delta, actions, bool(self.params.get("share_cfg", False)), bar, weights, guided,
                            None if max_run is None else int(max_run))
            p.position = self.params.get("position", "linear") == "linear"
            decisions, out = p.run()
        finally:
            bar.close()
        context.evaluations += 1
        self._passes += 1
        plan = context.plan(decisions)
        speedup, fraction = context.predict(plan)
        return {
            "delta": delta, "decisions": decisions, "error": rel_l1(out, context.reference),
            "speedup": speedup, "fraction": fraction, "records": p.records, "trials": p.trials,
        }

    def search(self, context, budget):
        from search.context import Evaluation

        tried: dict[float, dict] = {}
        self._passes = 0
        self._default_max_run = self.params.get("max_run", 3)

        def at(delta):
            if delta not in tried:
                tried[delta] = self._pass(context, delta)
            return tried[delta]

        if "delta" in self.params:
            best = at(float(self.params["delta"]))
        elif budget.speedup is not None:
            best = self._search_speed_runs(context, at, tried, budget)
        else:
            best = at(self._delta_for_error(at, budget))
        evaluation = Evaluation(best["error"], best["speedup"], best["fraction"], {"trials": best["trials"]})
        params = {**self.params, "delta": best["delta"], "max_run": self._default_max_run, "passes": self._passes}
        return context.plan(best["decisions"], strategy=self.name, params=params, evaluation=evaluation)

    def _estimate(self, context, records, speedup: float) -> float | None:
        """The smallest delta whose records-predicted plan meets ``speedup`` (None: none does)."""
        names = [m.name for m in context.modules]
        branches = branches_of(context.runner.cfg_layout(context.sampler))
        needs = np.unique([r[3] for r in records if math.isfinite(r[3])])
        if not len(needs):
            return None

        def ok(i):
            d = decisions_from_records(records, names, branches, context.steps, float(needs[i]))
            return context.predict(context.plan(d))[0] >= speedup - 1e-9

        if not ok(len(needs) - 1):
            return None
        lo, hi = 0, len(needs) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid + 1
        return float(needs[lo])

    def _search_speed_runs(self, context, at, tried: dict, budget) -> dict:
        """The shortest bound on runs of reuses that can meet the budget, then delta for it.

        Stale caches bias consecutive steps the same way, so long runs of reuse cost more than the
        per-step error shows; the bound starts at ``max(1, floor(2 s) - 2)`` for a budget of s and
        grows while even the periodic pattern it allows (compute once every bound + 1 steps) cannot
        meet the budget, or the passes do not."""
        if "max_run" in self.params:
            self._default_max_run = int(self.params["max_run"])
            return self._search_speed(context, at, tried, budget)
        from search.uniform import uniform_codes

        blocks = [m.name for m in context.modules if m.kind == "block"]
        last_error = None
        first = max(1, math.floor(2 * budget.speedup) - 2)
        for run in range(first, context.steps):
            upper = context.plan({b: uniform_codes(context.steps, run + 1, "D") for b in blocks})
            if context.predict(upper)[0] < budget.speedup - 1e-9:
                continue  # no pass can: skip it without running one
            self._default_max_run = run
            tried.clear()
            try:
                return self._search_speed(context, at, tried, budget)
            except PlannerError as e:
                last_error = e
                if run >= first + 2:
                    break
        raise last_error or unreachable(budget, context.max_speedup(), "of a greedy plan")

    def _search_speed(self, context, at, tried: dict, budget) -> dict:
        """Estimate delta from the last pass's trial errors, run there, correct upwards until met."""
        target = budget.speedup
        max_passes = int(self.params.get("max_passes", 6))
        step_up = 1.0 + float(self.params.get("step_up", 0.1))
        delta = float(self.params.get("delta0", 0.1))
        meeting: list[dict] = []
        last = None
        for _ in range(max_passes):
            last = at(delta)
            if last["speedup"] >= target - 1e-9:
                meeting.append(last)
                if last["speedup"] <= target * 1.03:
                    break  # close enough: more passes buy little
            estimate = self._estimate(context, last["records"], target)
            if estimate is None:  # even accepting every trial misses it: try the loosest delta once
                estimate = max(delta * 4, max(r[3] for r in last["records"] if math.isfinite(r[3])) * 1.01) \
                    if any(math.isfinite(r[3]) for r in last["records"]) else delta * 4
                if estimate > 1e3:
                    break
            if last["speedup"] < target - 1e-9:
                estimate = max(estimate, delta * step_up)
                step_up = 1.0 + 2.0 * (step_up - 1.0)  # the estimates keep undershooting: correct faster
            elif meeting and estimate >= delta:
                break  # met, and the records see no smaller delta that would
            if estimate in tried:
                break
            delta = estimate
        if not meeting:
            best = max(v["speedup"] for v in tried.values())
            raise unreachable(budget, best, "of a greedy plan found")
        return min(meeting, key=lambda v: v["error"])

    def _delta_for_error(self, at, budget) -> float:
        """The largest delta (fastest) whose plan keeps the calibration error within the target."""
        lo, hi = 0.0, 0.02
        while at(hi)["error"] <= budget.max_error:
            lo, hi = hi, hi * 4
            if hi > 50:
                return lo
        for _ in range(int(self.params.get("max_passes", 10))):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if at(mid)["error"] <= budget.max_error:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1.2:
                break
        if lo == 0.0:
            raise PlannerError(f"no greedy plan keeps the calibration error within {budget.max_error:g}")
        return lo

