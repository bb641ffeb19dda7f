"""``optuna``: multi-objective plan search (predicted run time vs calibration error) with a Pareto
front, resumable and distributed over any Optuna storage.

Each trial picks a point of the compact plan space of :mod:`search._space` (per depth group of
blocks: action, interval, tolerance on the profile's change curves; warm-up and cool-down steps),
turns it into a plan (a pure function of the parameters) and evaluates it through the executor
(``context.evaluate``). The two objectives, both minimised, are the latency model's predicted
run time as a fraction of full compute and the calibration error (relative L1 of the final
latents). The budget is an Optuna constraint (``fraction - 1/speedup <= 0``, or ``error -
max_error <= 0`` for an error target), stored with the figures in the trial's user attributes so
any worker can rebuild the front. Samplers: NSGA-II (default), TPE, random; the seed (``--seed``,
default 0) makes an in-memory study reproducible. Every trial is evaluated, infeasible ones too:
on digits-dit a trial costs about 0.3 s, and the slower-but-more-accurate points draw the front.

A new study starts with a few warm starts (FORA-like points of the space: every group on one
interval with one action, the shortest interval that meets the budget, and one step longer with a
cool-down), so the optimizer begins near the known baselines; ``--param warm_start=false`` turns
them off.

Result: the feasible trial with the least error (speed budget) or the least predicted time (error
target) among *all* finished trials of the study, every worker's included. Beside the plan
(``context.artifacts``) go the Pareto front (one loadable plan per point, ``front.json``,
``front.csv``, ``trials.csv``) and the baselines' plans and points (``uniform``, ``smoothcache`` at
the same budget, on the same context); ``planner plan pareto DIR`` draws them.

Storage and workers: without ``--storage`` the study lives in memory. ``--storage`` takes
``sqlite:///FILE``, any SQLAlchemy database URL (``postgresql://user:pw@host/db``, needs psycopg2)
or ``journal:FILE`` (Optuna's JournalStorage on a file, also for NFS), and ``--study NAME`` (default
named after model, sampler and budget). Processes naming the same storage and study join one study;
``--n-trials K`` is how many trials *this process* runs (default 100), ``--param total_trials=T``
stops every worker once the study holds T complete trials (a worker may overshoot by the trials
others have in flight), so re-running a killed worker's command finishes exactly what is missing.
The study records what it was made for (model fingerprint, sampler and budget, search sampler,
space version and digest, profile and calibration size) and refuses a worker that differs.
Killed workers: a joining worker marks as failed the RUNNING trials whose process is gone (same
host) or that started more than ``stale_after`` seconds ago (default: 600 s or 10 times the median
trial, whichever is longer); complete trials are never touched. Workers of a shared study get
distinct sampler seeds (the seed mixed with host and process id), so they do not propose the same
points; such a study is not bit-reproducible, an in-memory one is.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import socket
import statistics
import time
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from planner.errors import PlannerError
from search import Strategy, register
from search._pareto import (
    FRONT_FORMAT,
    FRONT_VERSION,
    Point,
    dominating,
    pareto_indices,
    write_front,
)
from search._space import DEFAULT_SHIFTS, DEFAULT_TOLERANCES, PlanSpace, build_space

SAMPLERS = ("nsga2", "tpe", "random")
STUDY_ATTR = "planner"
FIGURES_ATTR = "figures"
WORKER_ATTR = "worker"
DIRECTIONS = ("minimize", "minimize")
# Optuna 5 reads constraints that trials set themselves (``Trial.set_constraint``) and deprecates the
# samplers' ``constraints_func``; Optuna 4 has only the latter.
TRIAL_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")
# What opening a storage or study may raise besides a missing driver: database errors (unreachable
# host, bad credentials, unwritable file), file errors, and Optuna's own (a schema of another version).
STORAGE_ERRORS = (SQLAlchemyError, OSError, ValueError, RuntimeError)
SCHEMA_RETRIES = 5
STORAGE_HELP = "use sqlite:///FILE, an SQLAlchemy database URL such as postgresql://user:pw@host/db, or journal:FILE"


@dataclass(frozen=True)
class OptunaSettings:
    """The strategy's parameters (``--param KEY=VALUE`` and the run options), checked."""

    sampler: str = "nsga2"
    seed: int = 0
    n_trials: int = 100
    total_trials: int | None = None
    storage: str | None = None
    study: str | None = None
    population: int = 12
    groups: int = 4
    max_interval: int = 6
    actions: str = "DF"
    tolerances: tuple[int, ...] = DEFAULT_TOLERANCES
    shifts: tuple[int, ...] = DEFAULT_SHIFTS
    drift_ratio: float = 1.5
    baselines: tuple[str, ...] = ("uniform", "smoothcache")
    warm_start: bool = True
    stale_after: float | None = None
    resume: bool = field(default=False, compare=False)  # the storage is the checkpoint: nothing to do

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> OptunaSettings:
        """Settings from a strategy's params; PlannerError naming a key that is unknown or of the wrong kind."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise PlannerError(f"unknown optuna parameter {unknown[0]!r}: known are {', '.join(sorted(known))}")
        values = dict(params)
        try:
            for key in ("seed", "n_trials", "population", "groups", "max_interval"):
                if key in values:
                    values[key] = int(values[key])
            if values.get("total_trials") is not None:
                values["total_trials"] = int(values["total_trials"])
            for key in ("drift_ratio", "stale_after"):
                if values.get(key) is not None:
                    values[key] = float(values[key])
            for key in ("tolerances", "shifts"):
                if key in values:
                    values[key] = tuple(int(t) for t in _as_list(values[key]))
            if "baselines" in values:
                values["baselines"] = tuple(b for b in _as_list(values["baselines"]) if b and b != "none")
            if "warm_start" in values:
                values["warm_start"] = _as_bool(values["warm_start"])
        except (TypeError, ValueError) as e:
            raise PlannerError(f"bad optuna parameter: {e}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """PlannerError for values no search can use."""
        if self.sampler not in SAMPLERS:
            raise PlannerError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.n_trials < 0:
            raise PlannerError(f"--n-trials must be 0 or more, got {self.n_trials}")
        if self.total_trials is not None and self.total_trials < 1:
            raise PlannerError(f"total_trials must be at least 1, got {self.total_trials}")
        if self.population < 2:
            raise PlannerError(f"population must be at least 2, got {self.population}")
        if self.storage is None and self.n_trials == 0:
            raise PlannerError("--n-trials 0 only makes sense with --storage (collect a stored study's result)")
        check_storage_url(self.storage)


def _as_list(value) -> list:
    return [v.strip() if isinstance(v, str) else v for v in (value.split(",") if isinstance(value, str) else value)]


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


# --------------------------------------------------------------------------- storage and study


def redact(url: str | None) -> str:
    """The storage URL fit for logs and files: the password hidden; ``memory`` for none."""
    if url is None:
        return "memory"
    if "://" in url:
        try:
            return make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            return url.split("://", 1)[0] + "://***"
    return url


def check_storage_url(url: str | None) -> None:
    """PlannerError unless ``url`` has one of the forms :func:`open_storage` takes (nothing is opened)."""
    if url is None:
        return
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if not str(path) or str(path) == ".":
            raise PlannerError(f"storage {url!r} names no file: {STORAGE_HELP}")
        if not path.parent.is_dir():
            raise PlannerError(f"cannot open storage {url}: folder {path.parent} does not exist")
        return
    if "://" not in url:
        raise PlannerError(f"cannot read storage URL {url!r}: {STORAGE_HELP}")
    try:
        make_url(url)
    except (ArgumentError, ValueError) as e:
        raise PlannerError(f"cannot read storage URL {redact(url)}: {_reason(e)}; {STORAGE_HELP}") from None


def open_storage(url: str | None):
    """An Optuna storage for ``url`` (None: in memory); PlannerError with a one-line reason when it
    cannot be opened (unknown form, missing driver, unreachable database, unwritable file)."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    check_storage_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(url[len("journal:"):]))
        except OSError as e:
            raise PlannerError(f"cannot open storage {url}: {_reason(e)}") from None
    dialect = make_url(url).get_backend_name()
    # SQLite: wait for a busy database instead of failing (several workers write to one file), and
    # leave BEGIN to us (see serialize_sqlite_transactions); other databases: check pooled
    # connections before use (long studies outlive idle timeouts).
    engine = {"connect_args": {"timeout": 60, "isolation_level": None}} if dialect == "sqlite" \
        else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_RETRIES + 1):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
            if dialect == "sqlite":
                serialize_sqlite_transactions(storage.engine)
            return storage
        except ImportError:
            raise PlannerError(f"cannot open storage {redact(url)}: the {dialect} database driver is not installed "
                               f"(for PostgreSQL: pip install psycopg2-binary)") from None
        except STORAGE_ERRORS as e:
            # Workers that start together on a fresh database race to create its tables; the loser
            # sees a duplicate-key or already-exists error and only has to open what the winner made.
            racing = isinstance(e, IntegrityError) or "already exists" in str(e) or "locked" in str(e)
            if not racing or attempt == SCHEMA_RETRIES:
                raise PlannerError(f"cannot open storage {redact(url)}: {_reason(e)}") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def serialize_sqlite_transactions(engine) -> None:
    """Make every transaction on ``engine`` take SQLite's write lock when it begins.

    Optuna claims a queued (WAITING) trial by reading its state and writing RUNNING in one
    transaction, with SELECT ... FOR UPDATE, which SQLite ignores; and Python's sqlite3 begins a
    transaction only at the first write. Two workers could both read WAITING and both run the
    trial (the second then fails on a finished trial). BEGIN IMMEDIATE makes the read and the
    write one step per worker; the connection's busy timeout queues the others.
    """
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def study_key(context, budget, space: PlanSpace, settings: OptunaSettings) -> dict[str, Any]:
    """What a study is made for; a worker whose key differs may not join it."""
    s = context.sampler
    cost = context.profile.cost.to_csv(index=False, float_format="%.6g").encode()
    return {
        "model": context.runner.spec,
        "fingerprint": context.runner.fingerprint(),
        "sampler": f"{s.scheduler} {s.steps} steps guidance {s.guidance:g}",
        "budget": budget.label(),
        "search_sampler": settings.sampler,
        "space": f"v{space.version}:{space.digest()}",
        "profile": f"{context.profile.meta.name}:{hashlib.sha256(cost).hexdigest()[:12]}",
        "calib_samples": len(context.seeds),
    }


KEY_WORDS = {
    "fingerprint": "another model",
    "model": "another model",
    "sampler": "another sampler",
    "budget": "another budget",
    "search_sampler": "another search sampler",
    "space": "another search space (other groups or options, or another profile's curves)",
    "profile": "another profile (give every worker the same --profile)",
    "calib_samples": "another number of calibration samples",
}


def check_study(study, key: dict[str, Any], where: str) -> None:
    """PlannerError unless ``study`` was made for ``key`` (same model, sampler, budget, space, ...)."""
    if [d.name for d in study.directions] != ["MINIMIZE", "MINIMIZE"]:
        raise PlannerError(f"study {study.study_name!r} in {where} was not made by planner search (its objectives differ)")
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        raise PlannerError(f"study {study.study_name!r} in {where} was not made by planner search: use another --study")
    for field_name, words in KEY_WORDS.items():
        if stored.get(field_name) != key[field_name]:
            raise PlannerError(
                f"study {study.study_name!r} in {where} was made for {words}: it has {field_name} "
                f"{stored.get(field_name)!r}, this search {key[field_name]!r}; use another --study"
            )


def open_study(storage, name: str, sampler, key: dict[str, Any], where: str) -> tuple[Any, bool]:
    """Create the study, or join it when it exists (after checking it was made for ``key``);
    returns ``(study, created here)``."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS), sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    except STORAGE_ERRORS as e:
        raise PlannerError(f"cannot open study {name!r} in {where}: {_reason(e)}") from None
    if created or (STUDY_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False)):
        study.set_user_attr(STUDY_ATTR, key)  # a worker racing the creator writes the same key
    check_study(study, key, where)
    return study, created


def worker_id() -> dict[str, Any]:
    """This process, as recorded on its trials: host name and process id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def fail_stale_trials(study, stale_after: float | None = None) -> list[int]:
    """Mark as failed the RUNNING trials of dead workers: same host and process gone, or started
    more than ``stale_after`` seconds ago (default max(600, 10 x median complete trial)). Returns
    their numbers. Complete trials are never touched."""
    if stale_after is None:
        done = [(t.datetime_complete - t.datetime_start).total_seconds()
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.datetime_complete and t.datetime_start]
        stale_after = max(600.0, 10 * statistics.median(done)) if done else 600.0
    me, now, failed = socket.gethostname(), datetime.now(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR) or {}
        gone = worker.get("host") == me and worker.get("pid") != os.getpid() and not process_alive(int(worker.get("pid", 0)))
        old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > stale_after
        if gone or old:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


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
    """Params (``--param``): ``sampler`` (nsga2, tpe, random), ``population`` (NSGA-II, default 12),
    ``total_trials`` (stop the study at this many complete trials), ``groups`` (depth groups, 4),
    ``max_interval`` (6), ``actions`` (letters of DFR, default DF), ``tolerances`` (percentiles,
    default 70,80,90,100), ``drift_ratio`` (1.5), ``baselines`` (default uniform,smoothcache; none),
    ``warm_start`` (true), ``stale_after`` (seconds); run options ``seed``, ``n_trials``,
    ``storage``, ``study``. See the module docstring."""

    name = "optuna"

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.settings = OptunaSettings.from_params(params)  # bad parameters fail before any model loads

    def search(self, context, budget):
        settings = self.settings
        space = build_space(context.profile, context.modules, context.steps, groups=settings.groups,
                            max_interval=settings.max_interval, actions=settings.actions,
                            tolerances=settings.tolerances, shifts=settings.shifts,
                            drift_ratio=settings.drift_ratio)
        name = settings.study or default_study_name(context, budget)
        where = redact(settings.storage)
        storage = open_storage(settings.storage)
        seed = settings.seed
        if settings.storage is not None:  # distinct proposals per worker of a shared study
            seed = zlib.crc32(f"{settings.seed}:{socket.gethostname()}:{os.getpid()}".encode())
        sampler = make_sampler(settings.sampler, seed, settings.population, budget_constraint)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study, created = open_study(storage, name, sampler, study_key(context, budget, space, settings), where)
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
                if context.predict(plan)[0] >= budget.speedup - 1e-9:
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
    study.tell(trial, [evaluation.predicted_fraction, evaluation.error])


def plan_of(context, space: PlanSpace, record: TrialRecord, info: dict[str, Any]):
    """The plan of a finished trial, with its stored figures as the prediction."""
    from search.context import Evaluation

    evaluation = Evaluation(record.error, record.speedup, record.fraction)
    return context.plan(space.decisions(record.params), strategy="optuna", params={**info, **record.params},
                        evaluation=evaluation)


def baseline_points(context, budget, names) -> tuple[list[dict], dict[str, Any]]:
    """Each baseline strategy's plan at ``budget`` on ``context``: its point (or why it failed), and the plans."""
    from search import get_strategy

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
