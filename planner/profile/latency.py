"""The latency model: predicted time of a step and of a whole run under any cache plan.

    run  = run_fixed + sum over steps of step(s)
    step = step_fixed + calls_per_step * call_fixed
           + sum over modules whose own compute runs of their *self* time
             (children excluded; half-batch time when batched CFG computes one branch only)
           + sum over modules a plan reuses (where their parent runs) of the reuse operation's cost
           + the executor's hook overhead for every call of a module the plan hooks (one not
             computed at every step), measured per module group with planner.executor when present
    step = step_fixed + calls_per_step * (the reuse operation on the output)
           at a step whose whole transformer output the plan serves (``Plan.output``)

``call_fixed`` is the transformer outside the cached modules (embeddings, final layer),
``step_fixed`` the step outside the transformer (scheduler step, CFG combination), ``run_fixed``
the run outside the loop (noise, prompt encoding, VAE decode). Everything was measured at the
profile's batch (its calibration samples, times two for batched CFG); predictions hold for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from planner.cfg import CfgLayout
from planner.plan import COMPUTE
from planner.profile.timing import REUSE_COLUMNS, REUSE_FALLBACKS


def _served(plan: Any) -> dict[int, str]:
    """``{step: code}`` of the steps whose transformer output ``plan`` serves (none for masks and None)."""
    codes = getattr(plan, "output", None) or ""
    return {k: c for k, c in enumerate(codes) if c != COMPUTE}


@dataclass(frozen=True)
class ModuleCost:
    """Cost of one cacheable module, seconds: its own compute at full and half batch, each reuse op."""

    name: str
    kind: str
    parent: str | None
    self_s: float
    self_half_s: float
    reuse_s: dict[str, float]  # action code (R, D, F, Q, S) -> seconds, for the full batch of one call
    hook_s: float = 0.0  # what the executor's hook adds to every call that reaches the module, once hooked


@dataclass(frozen=True)
class LatencyModel:
    """Predicts run and step time for a plan; see the module docstring for the formula.

    ``modules`` are in forward order (each block followed by its sub-layers), the order a compute
    mask's module axis uses.
    """

    layout: CfgLayout
    steps: int
    modules: tuple[ModuleCost, ...]
    call_fixed_s: float
    step_fixed_s: float
    run_fixed_s: float
    # pipelines with several transformers (Wan 2.2): {component: global steps it runs}; a module costs nothing
    # at the steps its transformer skips (module names of components other than the first are prefixed)
    components: dict | None = None

    @property
    def branches(self) -> tuple[str, ...]:
        return CfgLayout(self.layout).branches

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def compute_s(self) -> dict[str, float]:
        """Seconds to compute each module with everything inside it (a block includes its sub-layers)."""
        inside: dict[str, float] = {}
        for m in self.modules:
            inside[m.name] = inside.get(m.name, 0.0) + m.self_s
            if m.parent:
                inside[m.parent] = inside.get(m.parent, 0.0) + m.self_s
        return inside

    @classmethod
    def from_cost_table(cls, cost: pd.DataFrame, layout: str, steps: int, hook_ms: float = 0.0,
                        components: dict | None = None) -> "LatencyModel":
        """Build the model from a profile's cost table (module rows plus the ``fixed`` rows); modules
        without a ``hook_ms`` value get ``hook_ms``. A reuse column the table lacks (``forecast2_ms`` or
        ``forecast2_limited_ms`` in profiles made before them) is estimated from the one :data:`REUSE_FALLBACKS` names."""
        mods = cost[cost.kind != "fixed"]
        fixed = cost[cost.kind == "fixed"].groupby("scope").self_ms.sum()
        modules = tuple(
            ModuleCost(
                name=r.module,
                kind=r.kind,
                parent=r.parent or None,
                self_s=float(r.self_ms) / 1e3,
                self_half_s=float(r.self_half_ms) / 1e3,
                reuse_s={code: _reuse_ms(r, col) / 1e3 for code, col in REUSE_COLUMNS.items()},
                hook_s=_num(getattr(r, "hook_ms", None), hook_ms) / 1e3,
            )
            for r in mods.itertuples()
        )
        return cls(
            layout=layout,
            steps=steps,
            modules=modules,
            call_fixed_s=float(fixed.get("call", 0.0)) / 1e3,
            step_fixed_s=float(fixed.get("step", 0.0)) / 1e3,
            run_fixed_s=float(fixed.get("run", 0.0)) / 1e3,
            components=components or None,
        )

    # -- plan handling -------------------------------------------------------------------------

    def code_array(self, plan: Any = None) -> tuple[np.ndarray, set[str]]:
        """Action codes ``[steps, modules, branches]`` a plan (or mask) asks for, and the set of modules
        an executor would hook (those not computed everywhere)."""
        names, branches = self.module_names, self.branches
        codes = np.full((self.steps, len(names), len(branches)), COMPUTE, dtype="<U1")
        if plan is None:
            return codes, set()
        if hasattr(plan, "code") and hasattr(plan, "decisions"):
            for i, name in enumerate(names):
                if name not in plan.decisions:
                    continue
                for j, b in enumerate(branches):
                    if hasattr(plan, "codes"):
                        row = plan.codes(name, b)
                    else:
                        row = "".join(plan.code(name, s, b) for s in range(self.steps))
                    if len(row) != self.steps:
                        raise ValueError(f"plan has {len(row)} steps for {name}, the profile {self.steps}")
                    codes[:, i, j] = list(row)
        else:
            if isinstance(plan, dict):
                # {module: {branch: [bool per step]}}, as Plan.compute_mask()/effective_compute() give
                mask = np.ones((self.steps, len(names), len(branches)), dtype=bool)
                for i, name in enumerate(names):
                    for j, b in enumerate(branches):
                        row = plan.get(name, {}).get(b)
                        if row is not None:
                            mask[:, i, j] = np.asarray(row, dtype=bool)
            else:
                mask = np.asarray(plan, dtype=bool)
                if mask.ndim == 2:
                    mask = mask[:, :, None].repeat(len(branches), 2)
            if mask.shape != (self.steps, len(names), len(branches)):
                raise ValueError(
                    f"compute mask has shape {mask.shape}, expected {(self.steps, len(names), len(branches))} (steps, modules, branches)"
                )
            codes[~mask] = "R"
        hooked = {names[i] for i in np.flatnonzero((codes != COMPUTE).any(axis=(0, 2)))}
        return codes, hooked

    def predict_step(self, plan: Any = None, step: int = 0) -> float:
        """Predicted seconds of sampling step ``step`` under ``plan``.

        ``plan`` is ``None`` (compute everything), a :class:`planner.plan.Plan` (its action codes;
        modules it does not name are computed), a compute mask ``{module: {branch: [bool per
        step]}}`` as ``Plan.effective_compute()`` gives, or a boolean array ``[steps, modules,
        branches]`` (or ``[steps, modules]``, branches alike) in :attr:`module_names` order. True
        means the module's own compute runs; a False module whose parent runs counts as reused
        (``R``). A module inside a block that does not run costs nothing.
        """
        served = _served(plan)
        if step in served:
            return self.served_step_s(served[step])
        codes, hooked = self.code_array(plan)
        return float(self._step_costs(codes[step:step + 1], hooked, step)[0])

    def served_step_s(self, code: str) -> float:
        """Seconds of a step whose transformer output is served with ``code`` (``Plan.output``): the step
        outside the transformer plus the reuse operation on each call's output. The last block's
        operation stands in for it: a transformer's output is no larger than its blocks' (it projects
        the hidden states back to the latent), so the stand-in errs on the slow side."""
        last = next((m for m in reversed(self.modules) if m.kind == "block"), None)
        op = 0.0 if last is None else last.reuse_s.get(code, last.reuse_s.get("R", 0.0))
        return self.step_fixed_s + CfgLayout(self.layout).calls_per_step * op

    def _present(self, n_steps: int, nb: int, step0: int) -> dict[str, np.ndarray]:
        """``{module: [steps, branches] mask of the steps its transformer runs}`` for the modules whose
        transformer skips some (none for one transformer)."""
        if not self.components:
            return {}
        from planner.plan.components import absent_steps

        out = {}
        for name, missing in absent_steps(self.components, self.module_names, self.steps).items():
            mask = np.ones((n_steps, nb), dtype=bool)
            for k in missing:
                if step0 <= k < step0 + n_steps:
                    mask[k - step0] = False
            out[name] = mask
        return out

    def _step_costs(self, codes: np.ndarray, hooked: set[str], step0: int = 0) -> np.ndarray:
        """Seconds of each step of ``codes`` (``[steps, modules, branches]``), vectorised over steps."""
        n_steps, _, nb = codes.shape
        layout = CfgLayout(self.layout)
        batched = layout.batched
        total = np.full(n_steps, self.step_fixed_s + layout.calls_per_step * self.call_fixed_s)
        everywhere = np.ones((n_steps, nb), dtype=bool)
        present = self._present(n_steps, nb, step0)
        running: dict[str, np.ndarray] = {}  # block name -> [steps, branches] where it runs
        for i, m in enumerate(self.modules):
            own = present.get(m.name, everywhere)  # the steps its transformer runs
            parent_runs = running.get(m.parent, own) if m.parent else own
            c = codes[:, i, :]
            computes = (c == COMPUTE) & parent_runs
            if m.kind == "block":
                running[m.name] = computes
            n_run = computes.sum(axis=1)
            if batched:  # one call carries both branches: one computing branch runs at half batch
                total += np.where(n_run == nb, m.self_s, np.where(n_run > 0, m.self_half_s, 0.0))
            else:  # one call per branch (separate), or the only branch (none)
                total += n_run * m.self_s
            reused = parent_runs & ~computes
            if reused.any():
                share = 0.5 if batched else 1.0  # the op on one branch of a batched call touches half the batch
                known = np.zeros_like(reused)
                for code, op in m.reuse_s.items():
                    hit = reused & (c == code)
                    known |= hit
                    total += hit.sum(axis=1) * op * share
                total += (reused & ~known).sum(axis=1) * m.reuse_s.get("R", 0.0) * share
            if m.name in hooked:  # the executor's hook intercepts every call that reaches the module
                total += m.hook_s * (parent_runs.any(axis=1) if batched else parent_runs.sum(axis=1))
        return total

    def predict_run(self, plan: Any = None) -> float:
        """Predicted seconds of a whole run (all steps plus what happens outside the loop) under ``plan``
        (same forms as :meth:`predict_step`)."""
        codes, hooked = self.code_array(plan)
        steps = self._step_costs(codes, hooked)
        for k, code in _served(plan).items():
            steps[k] = self.served_step_s(code)
        return float(self.run_fixed_s + steps.sum())

    def predict_speedup(self, plan: Any) -> float:
        """Predicted full-compute run time divided by the run time under ``plan``."""
        return self.predict_run(None) / self.predict_run(plan)

    def breakdown(self) -> dict[str, float]:
        """Seconds per full-compute run spent in each part: fixed costs and each module kind's own compute."""
        layout = CfgLayout(self.layout)
        calls = layout.calls_per_step
        per_kind: dict[str, float] = {}
        runs = self._present(self.steps, 1, 0)  # several transformers: a module runs at its transformer's steps
        for m in self.modules:
            n = int(runs[m.name].sum()) if m.name in runs else self.steps
            per_kind[m.kind] = per_kind.get(m.kind, 0.0) + m.self_s * (1 if layout.batched else calls) * n
        out = {
            "outside_loop": self.run_fixed_s,
            "outside_transformer": self.step_fixed_s * self.steps,
            "outside_blocks": self.call_fixed_s * calls * self.steps,
        }
        out.update({f"{k}_self": v for k, v in per_kind.items()})
        return out

    def to_dict(self) -> dict:
        """Plain-JSON form (seconds)."""
        return {
            "layout": self.layout,
            "steps": self.steps,
            "call_fixed_s": self.call_fixed_s,
            "step_fixed_s": self.step_fixed_s,
            "run_fixed_s": self.run_fixed_s,
            **({"components": self.components} if self.components else {}),
            "modules": [
                {"name": m.name, "kind": m.kind, "parent": m.parent, "self_s": m.self_s, "self_half_s": m.self_half_s,
                 "reuse_s": m.reuse_s, "hook_s": m.hook_s}
                for m in self.modules
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        """Inverse of :meth:`to_dict`."""
        mods = tuple(
            ModuleCost(m["name"], m["kind"], m["parent"], m["self_s"], m["self_half_s"], dict(m["reuse_s"]), m.get("hook_s", 0.0))
            for m in d["modules"]
        )
        return cls(d["layout"], d["steps"], mods, d["call_fixed_s"], d["step_fixed_s"], d["run_fixed_s"],
                   d.get("components"))


def _reuse_ms(row, col: str) -> float:
    """The cost table's ``col`` of ``row`` in ms; where the profile has no such value, the stand-in
    :data:`REUSE_FALLBACKS` gives (so old profiles still price every action)."""
    value = _num(getattr(row, col, None), float("nan"))
    if np.isfinite(value):
        return value
    if col in REUSE_FALLBACKS:
        base, factor = REUSE_FALLBACKS[col]
        return _reuse_ms(row, base) * factor
    return float(getattr(row, col))


def _num(value, default: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def plan_from_codes(codes: dict[str, str]) -> "_CodePlan":
    """A minimal plan-like object (``decisions`` + ``code``) for tests and benchmarks: ``codes`` maps a
    module name to its per-step code string, the same on every branch."""
    return _CodePlan({n: {"cond": c, "uncond": c} for n, c in codes.items()})


@dataclass
class _CodePlan:
    decisions: dict

    def code(self, module: str, step: int, branch: str = "cond") -> str:
        d = self.decisions.get(module)
        return COMPUTE if d is None else d[branch][step]
