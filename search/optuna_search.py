"""``optuna``: multi-objective plan search (predicted run time vs calibration error) with a Pareto
front, resumable and distributed over any Optuna storage (:mod:`planner.search._optuna_storage`).

Each trial picks a point of the compact plan space of :mod:`planner.search._space`, turns it into a
plan (a pure function of the parameters) and evaluates it through the executor
(``context.evaluate``). The two objectives, both minimised, are the latency model's predicted run
time as a fraction of full compute and the calibration error (relative L1 of the final latents).
The budget is an Optuna constraint (``fraction - 1/speedup <= 0``, or ``error - max_error <= 0``),
stored with the figures in the trial's user attributes so any worker can rebuild the front. Every
trial is evaluated, infeasible ones too: the slower, more accurate points draw the front.

A new study starts with a few FORA-like points of the space (every group on one interval with one
action: the shortest interval that meets the budget, and one step longer with a cool-down), so the
optimizer begins near the known baselines (``warm_start=false`` turns them off).

Result: the feasible trial with the least error (speed budget) or the least predicted time (error
target) among *all* finished trials of the study, every worker's included. Beside the plan
(``context.artifacts``) go the Pareto front (one loadable plan per point, ``front.json``,
``front.csv``, ``trials.csv``) and the baselines' plans and points at the same budget; ``planner
plan pareto DIR`` draws them. Workers of a shared study get distinct sampler seeds (the seed mixed
with host and process id), so they do not propose the same points; such a study is not
bit-reproducible, an in-memory one is. See docs/strategies/optuna.md.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState
from pydantic import Field, field_validator, model_validator

from planner.errors import PlannerError
from planner.search import Strategy, StrategySettings, register
from planner.search._optuna_storage import (
    WORKER_ATTR,
    check_storage_url,
    fail_stale_trials,
    open_storage,
    open_study,
    redact,
    study_key,
    worker_id,
)
from planner.search._pareto import (
    FRONT_FORMAT,
    FRONT_VERSION,
    Point,
    dominating,
    pareto_indices,
    write_front,
)
from planner.search._space import DEFAULT_SHIFTS, DEFAULT_TOLERANCES, PlanSpace, build_space

SAMPLERS = ("nsga2", "tpe", "random")
FIGURES_ATTR = "figures"
# Optuna 5 reads constraints that trials set themselves (``Trial.set_constraint``) and deprecates the
# samplers' ``constraints_func``; Optuna 4 has only the latter.
TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


class OptunaSettings(StrategySettings):
    sampler: Literal["nsga2", "tpe", "random"] = Field("nsga2", description="Optuna's sampler")
    seed: int = Field(0, ge=0, description="sampler seed (an in-memory study is reproducible with it)")
    n_trials: int = Field(100, ge=0, description="trials this process runs (0: collect a stored study's result)")
    total_trials: int | None = Field(None, ge=1, description="every worker stops once the study holds this many complete trials")
    storage: str | None = Field(None, description="sqlite:///FILE, an SQLAlchemy URL (postgresql://...) or journal:FILE; "
                                                  "none: in memory")
    study: str | None = Field(None, description="study name in the storage (default: model, sampler and budget)")
    population: int = Field(12, ge=2, description="NSGA-II population")
    groups: int = Field(4, ge=1, description="depth groups of blocks, each with its own interval shift")
    max_interval: int = Field(6, ge=2, description="longest interval between computes")
    actions: str = Field("DF", pattern="^[DFQLR]+$",
                         description="letters of D (residual reuse), F / Q (first- / second-order forecast), "
                                     "L (limited second-order forecast), R (sub-layer reuse)")
    tolerances: tuple[int, ...] = Field(DEFAULT_TOLERANCES, description="percentiles of the profile's change allowed to reuse at")
    shifts: tuple[int, ...] = Field(DEFAULT_SHIFTS, description="per-group interval shifts to search")
    drift_ratio: float = Field(1.5, gt=0, description="F is offered where lag-2 change is at least this times lag-1")
    baselines: tuple[str, ...] = Field(("uniform", "smoothcache"), description="strategies placed beside the front (none: no baselines)")
    warm_start: bool = Field(True, description="queue FORA-like starting points in a new study")
    stale_after: float | None = Field(None, gt=0, description="seconds after which a RUNNING trial counts as dead "
                                                              "(default: max(600, 10 x median trial))")
    resume: bool = Field(False, description="accepted for symmetry: the storage itself is the checkpoint")

    @field_validator("baselines")
    @classmethod
    def _no_none(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n for n in names if n and n != "none")

    @model_validator(mode="after")
    def _usable(self) -> "OptunaSettings":
        if self.storage is None and self.n_trials == 0:
            raise ValueError("--n-trials 0 only makes sense with --storage (collect a stored study's result)")
        check_storage_url(self.storage)
        return self

    def record(self) -> dict:
        """Settings for a plan's provenance: the storage's password hidden."""
        return {**super().record(), "storage": redact(self.storage)}


def make_sampler(name: str, seed: int, population: int, constraints):
    """The Optuna sampler ``name`` (nsga2, tpe, random), seeded; ``constraints`` is passed only where
    trials cannot set their own (Optuna 4)."""
    constraints = None if TRIAL_CONSTRAINTS else constraints
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, multivariate=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise PlannerError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def budget_constraint(trial) -> list[float]:
    """Optuna's constraint value (feasible when <= 0), as the trial stored it."""
    return [float(trial.user_attrs[FIGURES_ATTR]["constraint"])]


# --------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialRecord:
    """A complete trial: its number, full parameters and figures."""

    number: int
    params: dict[str, Any]
    fraction: float
    speedup: float
    error: float
    worker: str = ""

    @property
    def point(self) -> Point:
        return Point(self.fraction, self.error)


def finished_trials(study, space: PlanSpace) -> list[TrialRecord]:
    """Every complete trial of ``study`` (any worker's) with its figures, in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        f = t.user_attrs.get(FIGURES_ATTR)
        if not f or f.get("error") is None:
            continue
        w = t.user_attrs.get(WORKER_ATTR) or {}
        out.append(TrialRecord(t.number, space.complete(t.params), float(f["fraction"]), float(f["speedup"]),
                               float(f["error"]), f"{w.get('host', '?')}:{w.get('pid', '?')}"))
    return out


def choose_best(records: list[TrialRecord], budget) -> TrialRecord:
    """The feasible trial with the least error (speed budget) or least predicted time (error target)."""
    feasible = [r for r in records if budget.met(r.speedup, r.error)]
    if not feasible:
        fastest = max((r.speedup for r in records), default=1.0)
        raise PlannerError(
            f"none of the {len(records)} finished trials meets {budget.label()} (fastest predicted {fastest:.2f}x, "
            f"least error {min((r.error for r in records), default=math.nan):.4f}): run more trials (--n-trials)"
        )
    if budget.speedup is not None:
        return min(feasible, key=lambda r: (r.error, r.fraction, r.number))
    return min(feasible, key=lambda r: (r.fraction, r.error, r.number))


@register
class OptunaSearch(Strategy):
    """Multi-objective search over a compact plan space (see the module docstring)."""

    name = "optuna"
    summary = "multi-objective Optuna search (predicted time vs calibration error) over a compact plan space"
    Settings = OptunaSettings
    _storage = None

    def prepare(self) -> None:
        """Open a stored study's storage now (a database that cannot be reached fails before the model loads)."""
        if self._storage is None and self.settings.storage is not None:
            self._storage = open_storage(self.settings.storage)

    def search(self, context, budget):
        self.prepare()
        settings = self.settings
        space = space_for_budget(context, budget, settings)
        name = settings.study or default_study_name(context, budget)
        where = redact(settings.storage)
        storage = self._storage if settings.storage is not None else open_storage(None)  # a fresh in-memory study
        seed = settings.seed
        if settings.storage is not None:  # distinct proposals per worker of a shared study
            seed = zlib.crc32(f"{settings.seed}:{socket.gethostname()}:{os.getpid()}".encode())
        sampler = make_sampler(settings.sampler, seed, settings.population, budget_constraint)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study, created = open_study(storage, name, sampler, study_key(context, budget, space, settings.sampler), where)
            self.study, self.space = study, space  # for callers that want every trial, not only the plan
            self.stale_failed = fail_stale_trials(study, settings.stale_after)
            if created and settings.warm_start:
                for params in warm_starts(context, budget, space):
                    study.enqueue_trial(params, user_attrs={"origin": "warm start"})
            self.ran = run_trials(study, space, context, budget, settings)
        finally:
            optuna.logging.set_verbosity(verbosity)
        records = finished_trials(study, space)
        best = choose_best(records, budget)
        info = {"sampler": settings.sampler, "seed": settings.seed, "study": name, "storage": where,
                "trials_complete": len(records), "space": f"v{space.version}:{space.digest()}"}
        if context.artifacts is not None:
            save_front(context, budget, space, records, best, info, settings.baselines)
        return plan_of(context, space, best, {**info, "trial": best.number})


def space_reach(context, space: PlanSpace) -> float:
    """The fastest predicted speedup of any point of ``space``: its most reusing point, over its actions."""
    return max(context.predict(context.plan(space.decisions(space.fastest_params(a))))[0] for a in space.actions)


def space_for_budget(context, budget, settings: OptunaSettings) -> PlanSpace:
    """The plan space of ``settings``; when a speed budget lies beyond its fastest point and ``max_interval``
    was left at its default, the longest interval doubles (up to the number of steps) until the space
    reaches the budget, and last every depth group may take that longest interval (not only the most
    stable one): then the space holds the model's fastest plan, compute at the first step only. PlannerError,
    before any trial, when the space cannot reach the budget: trials only pick points of the space, so
    more of them cannot help."""

    def build(max_interval: int, scale_groups: bool = True) -> PlanSpace:
        return build_space(context.profile, context.modules, context.steps, groups=settings.groups,
                           max_interval=max_interval, actions=settings.actions, tolerances=settings.tolerances,
                           shifts=settings.shifts, drift_ratio=settings.drift_ratio, scale_groups=scale_groups)

    space = build(settings.max_interval)
    if budget.speedup is None or budget.speed_met(reach := space_reach(context, space)):
        return space
    if "max_interval" not in settings.model_fields_set:
        interval = settings.max_interval
        while interval < context.steps:
            interval = min(2 * interval, context.steps)
            space = build(interval)
            if budget.speed_met(reach := space_reach(context, space)):
                return space
        space = build(max(interval, 2), scale_groups=False)
        if budget.speed_met(reach := space_reach(context, space)):
            return space
    raise PlannerError(
        f"budget {budget.label()} lies beyond optuna's plan space: its fastest point predicts {reach:.2f}x "
        f"(actions {''.join(space.actions)}, intervals up to {space.max_interval}; the model's fastest plan: "
        f"{context.max_speedup():.2f}x); more trials cannot help: widen the space (max_interval, actions) or use greedy")


def default_study_name(context, budget) -> str:
    """``digits-dit-ddim50-g3-2x`` and the like: one study per model, sampler and budget."""
    from planner.profile.artifact import slug

    s = context.sampler
    return f"{slug(Path(context.runner.spec).name)}-{slug(s.scheduler)}{s.steps}-g{s.guidance:g}-{budget.label()}"


def warm_starts(context, budget, space: PlanSpace) -> list[dict[str, Any]]:
    """FORA-like starting points: per action, the shortest common interval whose plan meets the
    budget on the latency model, and one step longer with half the cool-down range."""
    longest = space.max_interval
    starts = []
    for action in space.actions:
        chosen = 2
        if budget.speedup is not None:
            for interval in range(2, longest + 1):
                chosen = interval
                plan = context.plan(space.decisions(space.uniform_params(interval, action)))
                if budget.speed_met(context.predict(plan)[0]):
                    break
        starts.append(space.uniform_params(chosen, action))
        starts.append(space.uniform_params(min(chosen + 1, longest), action, cooldown=space.max_cooldown // 2))
    unique = []
    for s in starts:
        if s not in unique:
            unique.append(s)
    return unique


def run_trials(study, space: PlanSpace, context, budget, settings: OptunaSettings) -> int:
    """Run up to ``n_trials`` trials in this process (fewer once the study holds ``total_trials``
    complete ones); returns how many ran."""
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.n_trials, desc="optuna trials", leave=False, disable=not context.progress)
    ran = 0
    try:
        while ran < settings.n_trials:
            if settings.total_trials is not None and \
                    len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= settings.total_trials:
                break
            run_trial(study, space, context, budget)
            ran += 1
            bar.update(1)
    finally:
        bar.close()
    return ran


def run_trial(study, space: PlanSpace, context, budget) -> None:
    """Ask for a point, evaluate its plan through the executor, tell the two objectives (the
    figures and the budget's constraint go to the trial's user attributes first)."""
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, worker_id())
    try:
        params = space.suggest(trial)
        evaluation = context.evaluate(context.plan(space.decisions(params)))
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if not math.isfinite(evaluation.error):  # a diverging plan: recorded as failed, never on the front
        trial.set_user_attr(FIGURES_ATTR, {"fraction": evaluation.predicted_fraction, "error": None})
        study.tell(trial, state=TrialState.FAIL)
        return
    if budget.speedup is not None:
        constraint = evaluation.predicted_fraction - 1.0 / budget.speedup
    else:
        constraint = evaluation.error - budget.max_error
    trial.set_user_attr(FIGURES_ATTR, {
        "fraction": evaluation.predicted_fraction, "speedup": evaluation.predicted_speedup,
        "error": evaluation.error, "constraint": constraint,
    })
    if TRIAL_CONSTRAINTS:
        trial.set_constraint("budget", constraint)
    try:
        study.tell(trial, [evaluation.predicted_fraction, evaluation.error])
    except optuna.exceptions.UpdateFinishedTrialError:
        # another worker took this trial for dead (it ran past stale_after) and failed it: its figures
        # stay out of the study, and this worker goes on with the next trial
        warnings.warn(f"trial {trial.number} was marked failed by another worker while it ran (stale_after); "
                      "its result is dropped", stacklevel=2)


def plan_of(context, space: PlanSpace, record: TrialRecord, info: dict[str, Any]):
    """The plan of a finished trial, with its stored figures as the prediction."""
    from planner.search.context import Evaluation

    evaluation = Evaluation(record.error, record.speedup, record.fraction)
    return context.plan(space.decisions(record.params), strategy="optuna", params={**info, **record.params},
                        evaluation=evaluation)


def baseline_points(context, budget, names) -> tuple[list[dict], dict[str, Any]]:
    """Each baseline strategy's plan at ``budget`` on ``context``: its point (or why it failed), and the plans."""
    from planner.search import get_strategy

    points, plans = [], {}
    for name in names:
        try:
            plan = get_strategy(name)().search(context, budget)
        except PlannerError as e:
            points.append({"name": name, "failed": str(e)})
            continue
        file = f"baseline-{name}.json"
        plans[file] = plan
        p = plan.prediction
        points.append({"name": name, "fraction": p.latency_fraction, "speedup": p.speedup, "error": p.calib_error,
                       "plan": file, "params": plan.provenance.params})
    return points, plans


def save_front(context, budget, space: PlanSpace, records: list[TrialRecord], best: TrialRecord,
               info: dict[str, Any], baselines) -> Path:
    """Write the front folder (see :mod:`search._pareto`) into ``context.artifacts``."""
    front = [records[i] for i in pareto_indices([r.point for r in records])]
    plans = {}
    points = []
    for r in front:
        file = f"front-trial-{r.number:05d}.json"
        plans[file] = plan_of(context, space, r, {**info, "trial": r.number})
        points.append({"trial": r.number, "fraction": r.fraction, "speedup": r.speedup, "error": r.error,
                       "feasible": budget.met(r.speedup, r.error), "plan": file, "params": r.params})
    base_points, base_plans = baseline_points(context, budget, baselines)
    for b in base_points:
        if "failed" not in b:
            i = dominating([r.point for r in front], Point(b["fraction"], b["error"]))
            b["dominated_by"] = None if i is None else front[i].number
    s = context.sampler
    doc = {
        "format": FRONT_FORMAT,
        "version": FRONT_VERSION,
        "model": context.runner.spec,
        "sampler": {"scheduler": s.scheduler, "steps": s.steps, "guidance": s.guidance},
        "budget": budget.to_dict(),
        "study": info,
        "best": best.number,
        "space": space.to_dict(),
        "points": points,
        "baselines": base_points,
    }
    rows = [{"trial": r.number, "fraction": r.fraction, "speedup": r.speedup, "error": r.error,
             "feasible": budget.met(r.speedup, r.error), "worker": r.worker} for r in records]
    return write_front(context.artifacts, doc, {**plans, **base_plans}, rows)
