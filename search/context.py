"""The search context: everything a strategy needs, and nothing model-specific.

A strategy sees the runner and sampler, the calibration inputs, the full-compute reference
outputs, the profile with its latency model, and ``evaluate(plan)``, which runs the
calibration inputs through the executor and returns the error against the reference plus the
predicted cost. Calibration and evaluation seeds come from disjoint ranges by construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.metrics import rel_l1, typical_rel_l1
from planner.plan import Plan, Prediction, plan_for_runner
from planner.seeds import EVAL_SEED_BASE, calibration_seeds

@dataclass(frozen=True)
class Evaluation:
    """A plan's figures on the calibration inputs."""

    error: float  # relative L1 of the final output against full compute
    predicted_speedup: float
    predicted_fraction: float  # predicted run time / full run time
    stats: dict = field(default_factory=dict, compare=False)
    typical: float | None = None  # the typical input's error (planner.metrics.typical_rel_l1), where measured


class SearchContext:
    """Calibration inputs, references and costs for one (model, sampler) pair."""

    def __init__(self, runner, sampler, profile, conditions: list[Any], seeds: list[int], *, progress: bool = False,
                 artifacts: Path | None = None, checkpoints: Path | None = None, costs: str = "measured"):
        if any(s >= EVAL_SEED_BASE for s in seeds):
            raise PlannerError(f"calibration seeds must lie below {EVAL_SEED_BASE}")
        self.runner = runner
        self.sampler = runner.resolve(sampler)
        self.profile = profile
        # What the budget and every predicted speedup are in: the profile's measured costs, or its FLOPs.
        self.costs = profile.priced_by(costs)
        self.latency = profile.latency_model(costs)
        self.conditions = conditions
        self.seeds = list(seeds)
        self.progress = progress
        # Where a strategy may keep by-products of its search (a Pareto front, a router and its training
        # curve, a resumable checkpoint): the CLI sets it to the folder named like the plan, next to it.
        self.artifacts = Path(artifacts) if artifacts is not None else None
        # Where resumable training state goes (checkpoints): the plan's folder itself, which a killed search
        # leaves in place, while the by-products are staged in ``artifacts`` (default: ``artifacts``).
        self.checkpoints = Path(checkpoints) if checkpoints is not None else self.artifacts
        self.evaluations = 0
        self._widened: dict[int, SearchContext] = {}  # shared by with_costs copies: one reference run per size
        self._check_profile()
        self.reference = self.run_full()

    @classmethod
    def build(cls, runner, sampler, profile, samples: int = 8, progress: bool = False,
              artifacts: Path | None = None, checkpoints: Path | None = None, costs: str = "measured") -> "SearchContext":
        """A context with ``samples`` calibration inputs (conditions from seed 0, calibration seeds)."""
        return cls(runner, sampler, profile, runner.conditions(samples, seed=0), calibration_seeds(samples),
                   progress=progress, artifacts=artifacts, checkpoints=checkpoints, costs=costs)

    def with_costs(self, costs: str) -> "SearchContext":
        """This context (same calibration inputs and reference, no new run) pricing plans by ``costs``
        (``measured`` or ``flops``, see :meth:`planner.profile.artifact.Profile.latency_model`)."""
        if self.profile.priced_by(costs) == self.costs:
            return self
        other = copy.copy(self)
        other.costs, other.latency = self.profile.priced_by(costs), self.profile.latency_model(costs)
        return other

    def widened(self, samples: int) -> "SearchContext":
        """A context like this one (model, sampler, profile, costs) with ``samples`` calibration inputs
        (conditions from seed 0, calibration seeds), to judge a few finalists on more inputs than a search
        can afford for every trial. Built once per size: its reference costs one full-compute run."""
        if samples not in self._widened:
            self._widened[samples] = SearchContext(
                self.runner, self.sampler, self.profile, self.runner.conditions(samples, seed=0),
                calibration_seeds(samples), costs=self.costs)
        return self._widened[samples].with_costs(self.costs)  # itself when it prices alike

    def _check_profile(self) -> None:
        meta = self.profile.meta
        if meta.fingerprint != self.runner.fingerprint():
            raise PlannerError(f"profile {meta.name} was made for another model (fingerprint {meta.fingerprint})")
        if meta.steps != self.sampler.steps or abs(meta.sampler.guidance - self.sampler.guidance) > 1e-9:
            raise PlannerError(
                f"profile {meta.name} is for {meta.steps} steps at guidance {meta.sampler.guidance:g}, "
                f"the search for {self.sampler.steps} steps at guidance {self.sampler.guidance:g}"
            )
        self._check_profile_scheduler()

    def _check_profile_scheduler(self) -> None:
        """The profile must come from the search's scheduler: same class and config (profiles made before
        these were recorded: the class their scheduler name gives on this model)."""
        from planner.plan.build import config_hash

        meta = self.profile.meta
        ours = self.runner.scheduler_for(self.sampler)
        cls = type(ours).__name__
        theirs = meta.scheduler_class
        if theirs is None:
            try:
                theirs = type(self.runner.scheduler_for(meta.sampler)).__name__
            except (KeyError, ValueError):
                theirs = meta.sampler.scheduler
        if theirs != cls:
            raise PlannerError(f"profile {meta.name} was made with scheduler {meta.sampler.scheduler} ({theirs}), "
                               f"the search runs {self.sampler.scheduler} ({cls}); profile with --scheduler "
                               f"{self.sampler.scheduler} or give the matching --profile")
        if meta.scheduler_config is not None and meta.scheduler_config != config_hash(ours.config):
            raise PlannerError(f"profile {meta.name} was made with a {cls} configured otherwise (config hash "
                               f"{meta.scheduler_config}, the search's {config_hash(ours.config)})")

    @cached_property
    def modules(self):
        """The model's cacheable modules in forward order."""
        return self.runner.modules()

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def layout(self) -> CfgLayout:
        """How the CFG branches reach the transformer under this context's sampler."""
        return self.runner.cfg_layout(self.sampler)

    @property
    def branches(self) -> tuple[str, ...]:
        return self.layout.branches

    def run_full(self) -> torch.Tensor:
        """Final latents of the calibration inputs with no caching (the reference)."""
        return self.runner.run(self.conditions, self.seeds, self.sampler, output="latent")

    def predict(self, plan: Plan) -> tuple[float, float]:
        """``(predicted speedup, predicted run-time fraction)`` from the profile's latency model."""
        speedup = self.latency.predict_speedup(plan)
        return speedup, 1.0 / speedup

    def evaluate(self, plan: Plan) -> Evaluation:
        """Run the calibration inputs through the executor with ``plan``; its errors (pooled and typical)
        and predicted cost."""
        from planner.executor import apply_plan

        self.evaluations += 1
        with apply_plan(self.runner.pipe, plan) as handle:
            out = self.runner.run(self.conditions, self.seeds, self.sampler, output="latent")
            stats = handle.stats()
        speedup, fraction = self.predict(plan)
        return Evaluation(rel_l1(out, self.reference), speedup, fraction, stats, typical_rel_l1(out, self.reference))

    def max_speedup(self) -> float:
        """The predicted speedup of reusing every block at every step but the first: no plan of module
        decisions beats it, and the searches take it as the model's reach (a plan that also serves the
        transformer's whole output, ``Plan.output``, could go a little further: nothing at all runs at its
        served steps)."""
        blocks = [m.name for m in self.modules if m.kind == "block"]
        return self.predict(self.plan({b: "C" + "D" * (self.steps - 1) for b in blocks}))[0]

    def plan(self, decisions: dict, strategy: str = "manual", params: dict | None = None,
             evaluation: Evaluation | None = None, output: str | None = None) -> Plan:
        """A Plan for this context's model and sampler, with provenance (and predictions when evaluated);
        ``output``: the transformer output's code string (``None``: it runs at every step)."""
        prediction = None
        if evaluation is not None:
            prediction = Prediction(
                speedup=evaluation.predicted_speedup,
                latency_fraction=evaluation.predicted_fraction,
                calib_error=evaluation.error,
                metric="rel_l1_final_latent",
                costs=self.costs,
            )
        components = self.runner.component_steps(self.sampler)
        if components:  # several transformers (Wan 2.2): a module decides only at its transformer's steps, and
            # each transformer's first step computes
            from planner.plan import normalize_decisions
            from planner.plan.components import compute_absent, output_computing_first_steps

            decisions = compute_absent(normalize_decisions(decisions or {}, self.branches, self.steps), components,
                                       self.steps)
            output = output_computing_first_steps(output, components)
        return plan_for_runner(
            self.runner,
            self.sampler,
            decisions,
            prediction=prediction,
            strategy=strategy,
            params=params or {},
            profile_id=self.profile.meta.name,
            calib_seeds=self.seeds,
            output=output,
        )
