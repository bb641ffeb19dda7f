"""``greedy``: DiTFastAttn's post-training greedy plan search, generalised to every executor action.

One pass, for a threshold scale delta: run the calibration inputs through the sampler; at each
step t (the first always computes), with the executor's caches as the plan so far left them:

1. the reference is the full-compute model output at t, on the x_t of the *already compressed*
   trajectory (the pass is a real run of the plan being built);
2. modules are visited in forward order; each tries its candidate actions from most to least
   saving and keeps the first whose model-output error (relative L1 against the reference) stays
   within ``(block + 1) / blocks * delta`` (DiTFastAttn's position scaling), else computes.
   Earlier modules keep their choice while later ones are tried; a block that reuses takes its
   sub-layers with it;
3. the step then runs with the chosen actions, and the trajectory moves on.

Candidates: blocks try ``reuse_residual`` and ``forecast`` (METHODS.md: residual reuse beats
output reuse on every block of digits-dit, so block ``reuse`` is opt-in), sub-layers ``reuse``
and ``forecast``; then, with CFG, ``share_cfg`` (the uncond branch copies the cond branch).
Trials rewind the executor's caches with ``PlanHandle.snapshot/restore``, so everything runs
through the executor: one implementation of the caching semantics.

The budget is met by searching delta: doubling until the predicted speedup reaches it, then
bisection in log space; each pass's own run gives the plan's calibration error for free.
"""

from __future__ import annotations

import math

from diffusers.hooks import HookRegistry, ModelHook

from planner.errors import PlannerError
from planner.executor import apply_plan
from planner.executor.tree import first_tensor
from planner.metrics import rel_l1
from planner.plan import BRANCHES, branches_of
from planner.runner import CFG_SEPARATE
from search import Strategy, register
from search._common import unreachable

GREEDY_HOOK = "planner_greedy_search"
DEFAULT_ACTIONS = {"block": "DF", "attn": "RF", "cross_attn": "RF", "mlp": "RF"}


class _StepSearchHook(ModelHook):
    """Outermost hook on the transformer: turns every call into a greedy selection at its step."""

    def __init__(self, search: "_GreedyPass"):
        super().__init__()
        self.search = search

    def new_forward(self, module, *args, **kwargs):
        return self.search.on_call(lambda: self.fn_ref.original_forward(*args, **kwargs))


class _GreedyPass:
    """One greedy pass at a fixed delta; ``run()`` returns ``(decisions, final latents)``."""

    def __init__(self, context, delta: float, actions: dict[str, str], share_cfg: bool, bar=None):
        self.ctx = context
        self.delta = delta
        self.layout = context.runner.cfg_layout(context.sampler)
        self.branches = branches_of(self.layout)
        self.modules = context.modules
        self.blocks = 1 + max(m.block for m in self.modules)
        self.parent = {m.name: m.name.rsplit(".", 1)[0] for m in self.modules if m.kind != "block"}
        self.actions = actions
        self.share_cfg = share_cfg and len(self.branches) == 2
        self.codes = {m.name: {b: ["C"] * context.steps for b in self.branches} for m in self.modules}
        self.calls = 0
        self.bar = bar
        self.trials = 0

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

    def _candidates(self, kind: str, active: tuple[str, ...]) -> list[dict[str, str]]:
        out = [{b: code for b in active} for code in self.actions[kind]]
        if self.share_cfg and "uncond" in active:
            out.append({b: ("S" if b == "uncond" else "C") for b in active})
        return out

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

    def _select(self, step: int, active: tuple[str, ...], at_step):
        saved = self.handle.snapshot()
        reference = first_tensor(at_step())
        self.handle.restore(saved)
        for m in self.modules:
            parent = self.parent.get(m.name)
            if parent is not None and any(self.codes[parent][b][step] != "C" for b in active):
                continue  # the block does not run, so neither do its sub-layers
            threshold = (m.block + 1) / self.blocks * self.delta
            chosen = False
            for choice in self._candidates(m.kind, active):
                self._set(m.name, step, choice)
                error = rel_l1(first_tensor(at_step()), reference)
                self.handle.restore(saved)
                self.trials += 1
                if error <= threshold:
                    chosen = True
                    break
            if not chosen:
                self._set(m.name, step, {b: "C" for b in active})
        return at_step()


@register
class Greedy(Strategy):
    """Params: ``delta`` (a fixed threshold scale: no budget search), ``actions`` (per kind, e.g.
    ``{"block": "DFR", "mlp": "R"}``), ``share_cfg`` (default true), ``max_passes`` (default 10)."""

    name = "greedy"

    def _pass(self, context, delta: float):
        from tqdm.auto import tqdm

        actions = {**DEFAULT_ACTIONS, **self.params.get("actions", {})}
        bar = tqdm(total=context.steps, desc=f"greedy delta={delta:.4g}", leave=False, disable=not context.progress)
        try:
            p = _GreedyPass(context, delta, actions, bool(self.params.get("share_cfg", True)), bar)
            decisions, out = p.run()
        finally:
            bar.close()
        plan = context.plan(decisions)
        return plan, decisions, rel_l1(out, context.reference), context.predict(plan)[0]

    def search(self, context, budget):
        tried: dict[float, tuple] = {}

        def at(delta):
            if delta not in tried:
                tried[delta] = self._pass(context, delta)
            return tried[delta]

        if "delta" in self.params:
            delta = float(self.params["delta"])
        elif budget.speedup is not None:
            delta = self._delta_for_speed(at, budget)
        else:
            delta = self._delta_for_error(at, budget)
        plan, decisions, _, _ = at(delta)
        evaluation = context.evaluate(plan)
        params = {**self.params, "delta": delta, "passes": len(tried)}
        return context.plan(decisions, strategy=self.name, params=params, evaluation=evaluation)

    def _delta_for_speed(self, at, budget) -> float:
        """The smallest delta (least error) whose plan's predicted speedup meets the budget."""
        max_passes = int(self.params.get("max_passes", 10))
        lo, hi = 0.0, 0.02
        while at(hi)[3] < budget.speedup - 1e-9:
            lo, hi = hi, hi * 4
            if hi > 50:  # every candidate passes long before this: the budget is beyond any plan
                raise unreachable(budget, at(lo)[3], "of a greedy plan (every module reusing where it can)")
        for _ in range(max_passes):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if at(mid)[3] >= budget.speedup - 1e-9:
                hi = mid
            else:
                lo = mid
            if at(hi)[3] <= budget.speedup * 1.03:  # close enough: more passes buy little
                break
        return hi

    def _delta_for_error(self, at, budget) -> float:
        """The largest delta (fastest) whose plan keeps the calibration error within the target."""
        lo, hi = 0.0, 0.02
        while at(hi)[2] <= budget.max_error:
            lo, hi = hi, hi * 4
            if hi > 50:
                return lo
        for _ in range(int(self.params.get("max_passes", 10))):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
            if at(mid)[2] <= budget.max_error:
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1.2:
                break
        if lo == 0.0:
            raise PlannerError(f"no greedy plan keeps the calibration error within {budget.max_error:g}")
        return lo
