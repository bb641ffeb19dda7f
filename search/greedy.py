"""``greedy``: DiTFastAttn's post-training greedy plan search, generalised to every executor action.

One pass, for a threshold scale delta, is a real sampling run of the calibration inputs. At each
step t (the first always computes), with the executor's caches as the plan so far left them:

1. the reference is the full-compute model output at t, on the x_t of the *already compressed*
   trajectory;
2. modules are visited in forward order; each tries its candidate actions from most to least
   saving and keeps the first whose error against the reference stays within
   ``(block + 1) / blocks * delta * w_t``, else computes. Earlier modules keep their choice while
   later ones are tried; a block that reuses takes its sub-layers with it;
3. the step then runs with the chosen actions, and the trajectory moves on.

Trials rewind the executor's caches (``snapshot``/``restore`` of an editable session), so
everything runs through the executor. Beyond DiTFastAttn (the reasons are in
docs/strategies/greedy.md): the error is measured on the CFG-guided prediction with batched CFG;
the threshold has a per-step weight ``w_t`` from the profile's change curve; a module reuses at
most ``max_run`` steps in a row; candidates are ordered by the profile's costs; and the budget is
met by predicting, from every trial's error, the delta whose plan just meets it (then correcting
upwards), so a search takes a handful of passes. Each pass's final latents are the plan's
calibration error: no extra evaluation.

Under a speed budget the search is also seeded with TaylorSeer-class periodic forecast schedules
(``seeds="periodic"``, :mod:`planner.search._periodic`): warm-up, forecast order, evenly spread or
two-stride placement swept, each fitted to the budget on the latency model and run on the calibration inputs, the best
refined by moving single computed steps. Where a schedule meets the budget it is the plan; greedy's own
passes run where none does (``seeds="compare"``: they always run, and the plan with the lower calibration
error is kept). Greedy's own plans, fitted module by module to a handful of inputs, lost to the schedule on
held-out seeds even where they won on the calibration inputs (``benchmarks/greedy_vs_periodic.py``). The
finalists (the sweep's few best, the refined schedule, with ``compare`` the greedy plan) are ranked on
``judge_samples`` calibration inputs, more than every trial can afford: on 8 inputs close schedules trade
places by chance. A step-local threshold cannot see that
forecasting every block on the same steps, between evenly spaced computes, keeps the trajectory on
course; the seeds bring that in.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from pydantic import Field, field_validator

from planner.cfg import BRANCHES, CfgLayout, cfg_halves, guided, other_branch
from planner.errors import PlannerError
from planner.executor.session import open_session
from planner.executor.tree import first_tensor
from planner.metrics import rel_l1, typical_rel_l1
from planner.modules import module_kind
from planner.profile.branch_parts import shares_cfg
from planner.search import Strategy, StrategySettings, register
from planner.search.budget import first_true, unreachable
from planner.search.context import Evaluation

GREEDY_HOOK = "planner_greedy_search"
DEFAULT_ACTIONS = {"block": "FD", "attn": "", "cross_attn": "", "mlp": ""}
# The executor's reuse actions a module may try in a pass (planner.plan.ACTION_CODES): reuse (R), residual
# reuse (D, blocks only), first- and second-order forecasts (F, Q, and L, the limited Q). CFG sharing (S)
# is ``share_cfg``.
CANDIDATE_CODES = "RDFQL"
Kind = Literal["block", "attn", "cross_attn", "mlp"]


class GreedySettings(StrategySettings):
    delta: float | None = Field(None, gt=0, description="a fixed threshold scale: one pass, no budget search")
    actions: dict[Kind, str] = Field(
        default_factory=lambda: {"block": "FD"},
        description='candidate actions per module kind, in order of preference, e.g. {"block": "FD", "mlp": "R"}')
    share_cfg: bool = Field(False, description="also try sharing a module's output across the CFG branches")
    max_run: int | None = Field(None, ge=1, description="longest run of reuses (default: the shortest that meets the budget)")
    error: Literal["guided", "raw"] = Field(
        "guided", description="measure each trial on the CFG-guided prediction (batched CFG) or the raw output")
    step_weight: Literal["profile", "square", "none"] = Field(
        "profile", description="per-step threshold weight from the profile's change curve (or its square, or none)")
    position: Literal["linear", "none"] = Field(
        "linear", description="DiTFastAttn's (block + 1) / blocks scaling of the threshold, or none")
    max_passes: int | None = Field(
        None, ge=1, description="passes at most (default: 6 for a speed budget, 10 for an error target)")
    delta0: float = Field(0.1, gt=0, description="threshold scale of the first pass")
    step_up: float = Field(0.1, gt=0, description="least relative raise of delta after a pass that misses the budget")
    incremental: bool = Field(
        True, description="trials re-run only the blocks from the tried module's block onward (same errors, fewer calls)")
    seeds: Literal["periodic", "compare", "none"] = Field(
        "periodic", description="speed budgets: fit TaylorSeer-class periodic forecast schedules to the budget and "
                                "refine the best on the calibration inputs; periodic: that schedule is the plan "
                                "where one meets the budget (greedy's own passes run where none does); compare: "
                                "greedy's passes run too and the plan with the lower calibration error is kept; "
                                "none: greedy's passes alone")
    seed_refine: int = Field(12, ge=0, description="calibration runs at most for refining the best periodic schedule")
    judge_samples: int | None = Field(
        None, ge=0, description="speed budgets: calibration inputs the finalists (the best periodic schedules, the "
                                "greedy plan) are judged on (default: four times the search's own); no more than "
                                "the search's own: no judging")
    seed_finalists: int = Field(4, ge=1, description="periodic schedules judged on judge_samples inputs")
    seed_repeat: int | None = Field(
        4, ge=0, description="this many of the output level's best periodic shapes are swept again with every "
                             "block alike (null: every shape at both levels)")

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, actions: dict[str, str]) -> dict[str, str]:
        for kind, codes in actions.items():
            if set(codes) - set(CANDIDATE_CODES):
                raise ValueError(f"actions for {kind} must be letters of {', '.join(CANDIDATE_CODES)}, got {codes!r}")
            if len(set(codes)) != len(codes):
                raise ValueError(f"actions for {kind} name an action twice: {codes!r}")
            if "D" in codes and kind != "block":
                raise ValueError(f"reuse_residual (D) applies to blocks only, not to {kind}")
        return actions


# Finalists are judged on this many times the search's calibration inputs unless told otherwise. On the
# digit models, ranking on 32 inputs instead of the default 8 picked a better schedule at 4 of 12 points
# and a worse one at none (benchmarks/calibration_judge.py); a factor keeps the judge's share of the
# search's cost the same whatever the calibration batch.
JUDGE_FACTOR = 4


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

    ``records`` collects, per trial, in the order tried, ``(step, module, choice, required delta)``:
    the smallest delta at which that candidate would have been accepted. Every measured candidate
    counts (a pass that rejects a forecast and accepts a residual reuse records both), so the plan
    that a records-predicted delta gives keeps what the pass chose."""

    def __init__(self, context, delta: float, actions: dict[str, str], share_cfg: bool, bar=None,
                 weights: np.ndarray | None = None, guided: bool = True, max_run: int | None = None):
        self.ctx = context
        self.delta = delta
        self.layout = context.runner.cfg_layout(context.sampler)
        self.branches = self.layout.branches
        self.modules = context.modules
        self.costs = module_costs(context.latency)
        self.blocks = 1 + max(m.block for m in self.modules)
        self.parent = {m.name: m.name.rsplit(".", 1)[0] for m in self.modules if m.kind != "block"}
        self.actions = actions
        self.share_cfg = share_cfg and len(self.branches) == 2
        # modules whose branches the profile saw return outputs of different shapes cannot share them
        profile = getattr(context, "profile", None)
        extra = profile.meta.extra if profile is not None else {}
        self.shares_cfg = {m.name for m in self.modules if shares_cfg(extra, m.name)}
        self.codes = {m.name: {b: ["C"] * context.steps for b in self.branches} for m in self.modules}
        self.weights = np.ones(context.steps) if weights is None else weights
        self.guidance = float(context.sampler.guidance)
        self.guided = guided and self.layout.batched
        self.max_run = max_run
        self.position = True  # DiTFastAttn's (block + 1) / blocks threshold scaling
        self.incremental = True  # trials replay the blocks before the tried one (planner.search._incremental)
        self.replay = None
        self.calls = 0
        self.later_call = False  # whether the current call belongs to a second or later pipeline call of the run
        self.bar = bar
        self.trials = 0
        self.records: list[tuple[int, str, dict, float]] = []
        self.must_compute = _must_compute(context)

    def run(self):
        ctx = self.ctx
        base = ctx.plan({})
        self.handle = open_session(ctx.runner.pipe, base, editable=True)
        registry = HookRegistry.check_if_exists_or_initialize(ctx.runner.transformer)
        registry.register_hook(_StepSearchHook(self), GREEDY_HOOK)
        try:
            if self.incremental:
                from planner.search._cost import active_cost
                from planner.search._incremental import StepReplay

                self.replay = StepReplay(ctx.runner.transformer, self.modules, self.handle, active_cost(ctx))
            out = ctx.runner.run(ctx.conditions, ctx.seeds, ctx.sampler, output="latent")
        finally:
            registry.remove_hook(GREEDY_HOOK, recurse=False)
            if self.replay is not None:
                self.replay.remove()  # before the session's hooks, so that theirs leave the modules as they were
                self.replay = None
            self.handle.remove()
        return self.decisions(), out

    def decisions(self) -> dict[str, dict[str, str]]:
        return {m: {b: "".join(c) for b, c in per.items()} for m, per in self.codes.items()}

    def _set(self, module: str, step: int, choice: dict[str, str]) -> None:
        for b, code in choice.items():
            self.codes[module][b][step] = code
        self.handle.set_codes(module, {b: "".join(c) for b, c in self.codes[module].items()})

    def _candidates(self, module, active: tuple[str, ...], step: int) -> list[dict[str, str]]:
        """The module's candidate choices, most saving first (see :func:`by_saving`); CFG sharing (the
        module runs on one half) saves least, so it comes last, and only where the cond branch computes
        the module at this step (with separate calls, cond's call has chosen already)."""
        codes = self.actions.get(module.kind, "")
        if module.name in self.costs:
            codes = by_saving(codes, *self.costs[module.name])
        out = [{b: code for b in active} for code in codes]
        if self.share_cfg and "uncond" in active and module.name in self.shares_cfg:
            if "cond" in active or _computes(self.codes, self.parent, module.name, "cond", step):
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
        return guided(*cfg_halves(t.float(), self.layout), self.guidance)

    def on_call(self, forward):
        separate = self.layout is CfgLayout.SEPARATE
        per_step = 2 if separate else 1
        # A runner that takes fewer samples per pipeline call than there are calibration inputs (HunyuanVideo
        # 1.5: one) runs them as several pipeline calls, each from step 0.
        step = (self.calls // per_step) % self.ctx.steps
        self.later_call = self.calls >= per_step * self.ctx.steps
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
            out = self.replay.trial(module, at_step) if self.replay is not None else at_step()
            return rel_l1(self._view(out), reference)
        finally:
            self.handle.restore(saved)
            self.trials += 1

    def _select(self, step: int, active: tuple[str, ...], at_step):
        saved = self.handle.snapshot()
        reference = self._view(self.replay.reference(at_step) if self.replay is not None else at_step())
        self.handle.restore(saved)
        for m in self.modules:
            parent = self.parent.get(m.name)
            if parent is not None and any(self.codes[parent][b][step] != "C" for b in active):
                continue  # the block does not run, so neither do its sub-layers
            if step in self.must_compute.get(m.name, ()):
                continue  # two transformers (Wan 2.2): not its transformer's step, or its first one
            candidates = self._candidates(m, active, step)
            if self.later_call:  # a later pipeline call of this pass: a choice stays only if it holds here too
                now = {b: self.codes[m.name][b][step] for b in active}
                candidates = [c for c in candidates if c == now]
            if not candidates or self._run_length(m.name, step, active) >= (self.max_run or math.inf):
                self._set(m.name, step, {b: "C" for b in active})
                continue
            weight = ((m.block + 1) / self.blocks if self.position else 1.0) * float(self.weights[step])

            def error_of(choice, name=m.name):
                return self.trial_error(step, name, choice, at_step, reference, saved)

            index, errors = first_acceptable(candidates, error_of, weight * self.delta)
            if self.replay is not None:  # an accepted trial was the last one run: its forward is the incumbent
                self.replay.adopt() if index is not None else self.replay.discard()
            for choice, error in zip(candidates, errors):  # every candidate measured, in the order tried
                self.records.append((step, m.name, choice, error / weight if weight > 0 else math.inf))
            self._set(m.name, step, candidates[index] if index is not None else {b: "C" for b in active})
        return self.replay.finish(at_step) if self.replay is not None else at_step()


def _must_compute(context) -> dict[str, set[int]]:
    """``{module: steps it cannot reuse at}`` for a pipeline with several transformers (Wan 2.2): the steps its
    transformer does not run, and that transformer's first step (nothing cached before it); ``{}`` for one."""
    from planner.plan.components import absent_steps, module_steps

    components = context.runner.component_steps(context.sampler)
    if not components:
        return {}
    names = [m.name for m in context.modules]
    out = absent_steps(components, names, context.steps)
    for name in names:
        own = module_steps(components, name)
        if own:
            out.setdefault(name, set()).add(own[0])
    return out


def decisions_from_records(records, modules: Iterable[str], branches: Sequence[str], steps: int, delta: float) -> dict:
    """The plan a pass at ``delta`` would pick if every trial's error stayed what ``records`` say: per
    step, module and set of branches, the first candidate recorded (the order tried) whose required
    delta is within ``delta``, else compute. Candidates a pass never measured count as rejected."""
    codes = {m: {b: ["C"] * steps for b in branches} for m in modules}
    decided: set[tuple] = set()
    for step, module, choice, need in records:
        key = (step, module, tuple(sorted(choice)))
        if need <= delta and key not in decided:
            decided.add(key)
            for b, code in choice.items():
                codes[module][b][step] = code
    parent = {m: module_kind(m)[1] for m in codes}
    for m, per in codes.items():  # a share recorded where the other branch's choice at another delta is a reuse
        for b, row in per.items():
            other = other_branch(b)
            for k, code in enumerate(row):
                if code == "S" and not _computes(codes, parent, m, other, k):
                    row[k] = "C"
    return {m: {b: "".join(c) for b, c in per.items()} for m, per in codes.items()}


def _computes(codes: dict, parent: dict[str, str], module: str, branch: str, step: int) -> bool:
    """Whether ``module`` runs on ``branch`` at ``step`` under ``codes`` (its code and its block's are C)."""
    up = parent.get(module)
    return codes[module][branch][step] == "C" and (up is None or codes[up][branch][step] == "C")


@register
class Greedy(Strategy):
    """DiTFastAttn's greedy search over every executor action (see the module docstring)."""

    name = "greedy"
    summary = "DiTFastAttn's greedy search, steps outer, modules inner, over every executor action"
    Settings = GreedySettings

    def search(self, context, budget):
        return _GreedySearch(self.settings, context).run(budget)


class _GreedySearch:
    """One search: its passes (one per delta tried, memoised), the run bound in use, the budget loop."""

    def __init__(self, settings: GreedySettings, context):
        self.settings = settings
        self.ctx = context
        self.tried: dict[float, dict] = {}
        self.passes = 0
        self.max_run = settings.max_run if settings.max_run is not None else 3
        blocks = [m.name for m in context.modules if m.kind == "block"]
        weights = step_weights(context.profile, blocks, context.steps)
        self.weights = {"profile": weights, "square": weights ** 2, "none": np.ones(context.steps)}[settings.step_weight]
        self.actions = {**DEFAULT_ACTIONS, **settings.actions}
        self.judged: dict | None = None  # the finalists' errors on the judge's inputs, where judged

    def run(self, budget):
        s = self.settings
        seed = None
        if s.delta is not None:
            best = self.at(s.delta)
        elif budget.speedup is not None:
            best, seed = self._best_at_speed(budget)
        else:
            best = self.at(self._delta_for_error(budget))
        params = {**s.record(), "passes": self.passes}
        if self.judged is not None:
            params["judged"] = self.judged
        if seed is not None:  # the periodic schedule: the plan by default, or it beat greedy's passes
            params.update(chosen="periodic", periodic=seed.shape.params(),
                          greedy_error=None if best is None else best["error"])
            return seed.shape.plan(self.ctx, strategy=Greedy.name, params=params, evaluation=seed.evaluation)
        evaluation = best["evaluation"]
        params.update(delta=best["delta"], max_run=self.max_run)
        if s.seeds != "none" and budget.speedup is not None and s.delta is None:
            params["chosen"] = "greedy"
        return self.ctx.plan(best["decisions"], strategy=Greedy.name, params=params, evaluation=evaluation)

    def _best_at_speed(self, budget):
        """``(best greedy pass or None, periodic candidate or None)``, exactly one of them the winner: the
        best periodic forecast schedule fitted to the budget and refined on the calibration inputs
        (:mod:`planner.search._periodic`), which with ``seeds="periodic"`` wins wherever there is one, and
        greedy's own search, which runs where there is none or (``seeds="compare"``) always, the schedule
        winning when its calibration error is lower. With ``judge_samples`` more than the search's
        calibration inputs, the finalists are ranked by their error on that many (see
        :func:`~planner.search._periodic.best_periodic`), the greedy plan too."""
        from planner.search._periodic import best_periodic, ranking_error

        s = self.settings
        if s.seeds == "none":
            return self._search_speed_runs(budget), None
        wanted = s.judge_samples if s.judge_samples is not None else JUDGE_FACTOR * len(self.ctx.seeds)
        judge = self.ctx.widened(wanted) if wanted > len(self.ctx.seeds) else None
        seed = best_periodic(self.ctx, budget, refine_evaluations=s.seed_refine, judge=judge,
                             finalists=s.seed_finalists, repeat_best=s.seed_repeat)
        if seed is not None and s.seeds == "periodic":
            if judge is not None:
                self.judged = {"samples": len(judge.seeds), "periodic": seed.judged}
            return None, seed
        try:
            best, failure = self._search_speed_runs(budget), None
        except PlannerError as exc:  # the seeds may still meet it
            best, failure = None, exc
        if seed is None:
            if best is None:
                raise failure
            return best, None
        if best is None:
            return None, seed
        if judge is None:
            greedy_wins = ranking_error(best["evaluation"]) <= seed.error
        else:
            greedy_judged = ranking_error(judge.evaluate(judge.plan(best["decisions"])))
            self.judged = {"samples": len(judge.seeds), "periodic": seed.judged, "greedy": greedy_judged}
            greedy_wins = greedy_judged <= seed.judged
        return best, None if greedy_wins else seed

    def at(self, delta: float) -> dict:
        """The pass at ``delta`` (run once; later asks return the same figures)."""
        if delta not in self.tried:
            self.tried[delta] = self._pass(delta)
        return self.tried[delta]

    def _pass(self, delta: float) -> dict:
        from tqdm.auto import tqdm

        ctx, s = self.ctx, self.settings
        bar = tqdm(total=ctx.steps, desc=f"greedy delta={delta:.4g}", leave=False, disable=not ctx.progress)
        try:
            p = _GreedyPass(ctx, delta, self.actions, s.share_cfg, bar, self.weights, s.error == "guided", self.max_run)
            p.position = s.position == "linear"
            p.incremental = s.incremental
            decisions, out = p.run()
        finally:
            bar.close()
        ctx.evaluations += 1
        self.passes += 1
        speedup, fraction = ctx.predict(ctx.plan(decisions))
        evaluation = Evaluation(rel_l1(out, ctx.reference), speedup, fraction, {"trials": p.trials},
                                typical_rel_l1(out, ctx.reference))
        return {
            "delta": delta, "decisions": decisions, "error": evaluation.error, "evaluation": evaluation,
            "speedup": speedup, "fraction": fraction, "records": p.records, "trials": p.trials,
        }

    def _estimate(self, records, budget) -> float | None:
        """The smallest delta whose records-predicted plan meets the speed budget (None: none does)."""
        ctx = self.ctx
        names = [m.name for m in ctx.modules]
        needs = np.unique([r[3] for r in records if math.isfinite(r[3])])

        def meets(i: int) -> bool:
            d = decisions_from_records(records, names, ctx.layout.branches, ctx.steps, float(needs[i]))
            return budget.speed_met(ctx.predict(ctx.plan(d))[0])

        i = first_true(len(needs), meets)
        return None if i is None else float(needs[i])

    def _search_speed_runs(self, budget) -> dict:
        """The shortest bound on runs of reuses that can meet the budget, then delta for it.

        Stale caches bias consecutive steps the same way, so long runs of reuse cost more than the
        per-step error shows; the bound starts at ``max(1, floor(2 s) - 2)`` for a budget of s and
        grows while even the periodic pattern it allows (compute once every bound + 1 steps) cannot
        meet the budget, or the passes do not."""
        if self.settings.max_run is not None:
            return self._search_speed(budget)
        from planner.search.uniform import uniform_codes

        ctx = self.ctx
        blocks = [m.name for m in ctx.modules if m.kind == "block"]
        last_error = None
        first = max(1, math.floor(2 * budget.speedup) - 2)
        searched = 0
        for run in range(first, ctx.steps):
            upper = ctx.plan({b: uniform_codes(ctx.steps, run + 1, "D") for b in blocks})
            if not budget.speed_met(ctx.predict(upper)[0]):
                continue  # no pass can: skip it without running one
            self.max_run = run
            self.tried.clear()
            try:
                return self._search_speed(budget)
            except PlannerError as e:
                last_error = e
                searched += 1  # three bounds that can reach it on paper but whose passes do not: give up
                if searched >= 3:
                    break
        raise last_error or unreachable(budget, ctx.max_speedup(), "of a greedy plan")

    def _search_speed(self, budget) -> dict:
        """Estimate delta from the last pass's trial errors, run there, correct upwards until met.

        Passes bracket the delta: the largest that missed the budget and the smallest that met it. An
        estimate outside that bracket (the records of one trajectory misjudge another, most at loose
        budgets where a smaller delta changes many choices) is replaced by the bracket's geometric middle."""
        s = self.settings
        max_passes = s.max_passes or 6
        step_up = 1.0 + s.step_up
        delta = s.delta0
        meeting: list[dict] = []
        missed, meets = 0.0, math.inf
        for _ in range(max_passes):
            last = self.at(delta)
            met = budget.speed_met(last["speedup"])
            if met:
                meeting.append(last)
                meets = min(meets, delta)
                if last["speedup"] <= budget.speedup * 1.03:
                    break  # close enough: more passes buy little
            else:
                missed = max(missed, delta)
            estimate = self._estimate(last["records"], budget)
            if estimate is None:  # even accepting every trial misses it: try the loosest delta once
                finite = [r[3] for r in last["records"] if math.isfinite(r[3])]
                estimate = max(delta * 4, max(finite) * 1.01) if finite else delta * 4
                if estimate > 1e3:
                    break
            if not met:
                estimate = max(estimate, delta * step_up)
                step_up = 1.0 + 2.0 * (step_up - 1.0)  # the estimates keep undershooting: correct faster
            elif meeting and estimate >= delta:
                break  # met, and the records see no smaller delta that would
            if not missed < estimate < meets and missed > 0 and math.isfinite(meets):
                if meets / missed < 1.02:
                    break  # the bracket is closed: what met is as slow as a pass gets
                estimate = math.sqrt(missed * meets)
            if estimate in self.tried:
                break
            delta = estimate
        if not meeting:
            raise unreachable(budget, max(v["speedup"] for v in self.tried.values()), "of a greedy plan found")
        return min(meeting, key=lambda v: v["error"])

    def _delta_for_error(self, budget) -> float:
        """The largest delta (fastest) whose plan keeps the calibration error within the target."""
        lo, hi = 0.0, 0.02
        while self.at(hi)["error"] <= budget.max_error:
            lo, hi = hi, hi * 4
            if hi > 50:
                return lo
        for _ in range(self.settings.max_passes or 10):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if self.at(mid)["error"] <= budget.max_error:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1.2:
                break
        if lo == 0.0:
            raise PlannerError(f"no greedy plan keeps the calibration error within {budget.max_error:g}")
        return lo
