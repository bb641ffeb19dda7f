"""Tests of the ``optuna`` strategy: the params -> plan mapping on a hand example, the space's use of
the profile, Pareto fronts, reproducible in-memory studies, the front folder and its plot, queued
trials claimed once by concurrent workers, two worker processes sharing one SQLite study, a killed
worker resumed on a journal file, stale trials, and clear errors for bad storages, samplers and
studies made for another model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from planner.cli import main
from planner.errors import PlannerError
from planner.plan import load_plan
from planner.profile import TimingConfig, profile_model
from planner.runner import Sampler, load_runner
from planner.search import get_strategy
from planner.search._pareto import Point, dominates, dominating, pareto_indices
from planner.search._space import GroupSpace, PlanSpace, build_space
from planner.search.budget import Budget
from planner.search.context import SearchContext
from planner.search._optuna_storage import fail_stale_trials, open_storage, redact
from planner.search.uniform import uniform_codes

ROOT = Path(__file__).resolve().parents[1]
FAST = TimingConfig(warmup=1, repeats=3, run_repeats=1)
STEPS, GUIDANCE = 10, 3.0


TORCH_THREADS = 1  # see conftest.py


@pytest.fixture(scope="module")
def ctx10(digits10):
    """digits-dit at DDIM 10 steps: runner, sampler, its FLOP-costed 2-sample profile and folder, a context."""
    context = SearchContext.build(digits10.runner, digits10.sampler, digits10.profile, samples=2)
    return digits10.runner, digits10.sampler, digits10.profile, digits10.folder, context


def _search(context, budget="1.5x", **params):
    params = {"baselines": "none", **params}
    strategy = get_strategy("optuna")(**params)
    return strategy, strategy.search(context, Budget.parse(budget))


# --------------------------------------------------------------------------- the space


def _hand_space(tolerance_mask: str = "1" * 10) -> PlanSpace:
    groups = (
        GroupSpace("g0", ("transformer_blocks.0", "transformer_blocks.1"),
                   ("transformer_blocks.0.attn1", "transformer_blocks.0.ff"), 4,
                   {"D": {80: (tolerance_mask, "1" * 10)}, "R": {80: ("1" * 10, "1" * 10)}}),
        GroupSpace("g1", ("transformer_blocks.2",), ("transformer_blocks.2.attn1",), 3,
                   {"D": {80: ("1" * 10, "1" * 10)}, "R": {80: ("1" * 10, "1" * 10)}}),
    )
    return PlanSpace(steps=10, actions=("D", "R"), max_interval=5, groups=groups, max_warmup=2, max_cooldown=3,
                     tolerances=(80, 90, 100), shifts=(-1, 0, 1))


def test_params_map_to_the_plan_of_a_hand_example():
    space = _hand_space(tolerance_mask="1111011111")
    params = {"action": "D", "interval": 3, "warmup": 1, "cooldown": 2, "tolerance": 100, "g0_shift": 0, "g1_shift": 1}
    d = space.decisions(params)
    # g0: computes at 0, then every 3rd step of the pattern, and at the 2 last steps; g1: interval 4 capped at 3
    assert d == {"transformer_blocks.0": "CDDCDDCDCC", "transformer_blocks.1": "CDDCDDCDCC",
                 "transformer_blocks.2": "CDDCDDCDCC"}
    d = space.decisions({**params, "interval": 4, "g1_shift": -1, "warmup": 2, "cooldown": 0})
    assert d["transformer_blocks.0"] == "CCDDDCDDDC"  # warm-up: steps 0, 1 compute; then interval 4 from step 1
    assert d["transformer_blocks.2"] == "CCDDCDDCDD"  # interval 3
    # tolerance 80: a lag-1 reuse is refused at step 4 (mask 0 there), so the group computes and restarts
    d = space.decisions({**params, "warmup": 0, "cooldown": 0, "tolerance": 80})
    assert d["transformer_blocks.0"] == "CDDCCDDCDD"
    # R: the sub-layers carry the codes and the blocks compute
    d = space.decisions({**params, "action": "R", "warmup": 0, "cooldown": 0})
    assert set(d) == {"transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.2.attn1"}
    assert d["transformer_blocks.0.ff"] == "CRRCRRCRRC"
    # interval 1 never reuses: no module is named
    assert space.decisions({**params, "interval": 1, "g1_shift": 0}) == {}
    # pure: the same params always give the same decisions, the input is not modified
    copy = dict(params)
    assert space.decisions(params) == space.decisions(copy) and params == copy


def test_uniform_params_are_foras_pattern_and_bad_params_are_refused():
    space = _hand_space()
    d = space.decisions(space.uniform_params(3, "D"))
    assert d["transformer_blocks.0"] == uniform_codes(10, 3, "D")
    with pytest.raises(PlannerError, match="interval=9"):
        space.decisions({"interval": 9})
    with pytest.raises(PlannerError, match="action='F'"):
        space.decisions({"action": "F", "interval": 2})
    with pytest.raises(PlannerError, match="g0_shift=2"):
        space.decisions({"interval": 2, "g0_shift": 2})
    assert space.digest() == _hand_space().digest() != _hand_space("0" * 10).digest()


class _FakeProfile:
    """Curves for 4 blocks over 12 steps: blocks 2-3 change twice as much; outputs drift or not."""

    def __init__(self, drift: bool):
        self.meta = type("M", (), {"lags": 2})()
        self.drift = drift

    def curve(self, lag, metric="rel_l1_mean", residual=False):
        base = np.full(12, 0.01)
        base[0] = np.nan
        base[-1] = 0.1  # the last step changes a lot: a cool-down range
        scale = lag if (self.drift or metric != "rel_l1_mean") else 1.0
        cols = {f"transformer_blocks.{i}": base * scale * (2 if i >= 2 else 1) for i in range(4)}
        return pd.DataFrame(cols)


def test_build_space_is_shaped_by_the_profile():
    modules = [type("Mod", (), {"name": f"transformer_blocks.{i}", "kind": "block"})() for i in range(4)]
    space = build_space(_FakeProfile(drift=True), modules, 12, groups=2, max_interval=6)
    assert [g.blocks for g in space.groups] == [("transformer_blocks.0", "transformer_blocks.1"),
                                                ("transformer_blocks.2", "transformer_blocks.3")]
    assert [g.max_interval for g in space.groups] == [6, 3]  # the group changing twice as much: half
    assert space.actions == ("D", "F")  # outputs drift: lag-2 change is twice lag-1
    assert space.max_cooldown == 2 and space.max_warmup == 1  # 1 sharp last step -> up to 2; floor 12 // 10
    noisy = build_space(_FakeProfile(drift=False), modules, 12, groups=2)
    assert noisy.actions == ("D",)  # no drift: forecasting would extrapolate noise
    assert noisy.digest() != space.digest()


def test_build_space_on_a_real_profile(ctx10):
    _, _, profile, _, context = ctx10
    space = build_space(profile, context.modules, STEPS)
    assert len(space.groups) == 4 and all(2 <= g.max_interval <= 6 for g in space.groups)
    assert sum(len(g.blocks) for g in space.groups) == 8


# --------------------------------------------------------------------------- fronts


def test_pareto_front_and_dominance():
    pts = [Point(0.5, 0.05), Point(0.4, 0.08), Point(0.6, 0.02), Point(0.5, 0.06), Point(0.7, 0.03), Point(0.4, 0.08)]
    assert pareto_indices(pts) == [1, 0, 2]  # fastest first; dominated and duplicate points left out
    assert dominates(Point(0.5, 0.05), Point(0.5, 0.06)) and not dominates(Point(0.5, 0.05), Point(0.5, 0.05))
    front = [pts[i] for i in pareto_indices(pts)]
    assert dominating(front, Point(0.55, 0.07)) == 1  # (0.5, 0.05) dominates it, and is more accurate than (0.4, 0.08)
    assert dominating(front, Point(0.3, 0.5)) is None


# --------------------------------------------------------------------------- in-memory studies


@pytest.mark.slow  # two whole studies: CI runs it (pytest --slow)
def test_same_seed_gives_the_same_study(ctx10):
    context = ctx10[4]
    runs = []
    for seed in (0, 0, 1):
        strategy, plan = _search(context, seed=seed, n_trials=8, population=4)
        runs.append(([t.params for t in strategy.study.trials], plan.decisions))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_search_returns_the_best_feasible_plan_and_writes_its_front(ctx10, tmp_path, capsys):
    runner, sampler, profile, _, _ = ctx10
    context = SearchContext.build(runner, sampler, profile, samples=2, artifacts=tmp_path / "front")
    budget = Budget.parse("1.5x")
    strategy, plan = _search(context, n_trials=12, baselines="uniform,smoothcache")
    assert plan.provenance.strategy == "optuna" and budget.met(plan.prediction.speedup, plan.prediction.calib_error)
    assert context.evaluate(plan).error == pytest.approx(plan.prediction.calib_error, rel=1e-6)
    done = [t for t in strategy.study.trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in done if Budget.parse("1.5x").speed_met(t.user_attrs["figures"]["speedup"])]
    assert plan.prediction.calib_error == pytest.approx(min(t.user_attrs["figures"]["error"] for t in feasible))
    assert all(t.constraints == {"budget": t.user_attrs["figures"]["constraint"]} for t in done)

    doc = json.loads((tmp_path / "front" / "front.json").read_text())
    points = [Point(p["fraction"], p["error"]) for p in doc["points"]]
    everything = [Point(t.values[0], t.values[1]) for t in done]
    assert len(points) == len(pareto_indices(everything)) >= 1
    assert not any(dominates(q, p) for p in points for q in everything)
    for p in doc["points"]:  # each front point is a loadable plan rebuilt from its parameters
        front_plan = load_plan(tmp_path / "front" / p["plan"])
        assert front_plan.decisions == context.plan(strategy.space.decisions(p["params"])).decisions
        assert front_plan.prediction.calib_error == pytest.approx(p["error"])
    assert {b["name"] for b in doc["baselines"]} == {"uniform", "smoothcache"}
    assert len(pd.read_csv(tmp_path / "front" / "trials.csv")) == len(done)

    assert main(["plan", "pareto", str(tmp_path / "front"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert Path(report["out"]).is_file() and Path(report["out"]).stat().st_size > 10_000
    assert report["best"] == plan.provenance.params["trial"]
    for b in report["baselines"]:
        if "failed" not in b:
            target = Point(b["fraction"], b["error"])
            assert (b["dominated_by"] is not None) == any(dominates(p, target) for p in points)


# --------------------------------------------------------------------------- errors


def test_bad_storage_unknown_sampler_and_bad_params_fail_fast(tmp_path, capsys):
    for params, match in (
        ({"storage": "foo.db"}, "cannot read storage URL"),
        ({"storage": f"journal:{tmp_path}/no/such/dir/j.log"}, "does not exist"),
        ({"sampler": "cmaes"}, "sampler: Input should be 'nsga2', 'tpe' or 'random'"),
        ({"smapler": "tpe"}, "no setting 'smapler' \\(did you mean 'sampler'\\?\\)"),
        ({"n_trials": 0}, "only makes sense with --storage"),
    ):
        with pytest.raises(PlannerError, match=match):
            get_strategy("optuna")(**params)
    with pytest.raises(PlannerError, match="cannot open storage sqlite"):
        open_storage(f"sqlite:///{tmp_path}/no/such/dir/s.db")
    with pytest.raises(PlannerError, match="driver is not installed|cannot open storage"):
        open_storage("postgresql://user:secret@127.0.0.1:1/db")
    assert redact("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"
    # the CLI: one line, exit status 2, before any model is loaded
    assert main(["search", "--strategy", "optuna", "--storage", "nonsense", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read storage URL" in err[0]
    assert main(["plan", "pareto", str(tmp_path / "no-front")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no front.json" in err[0]


def test_a_study_of_another_model_or_budget_is_refused(ctx10, tmp_path):
    storage = f"journal:{tmp_path / 'j.log'}"
    _search(ctx10[4], storage=storage, study="s", n_trials=2)
    with pytest.raises(PlannerError, match="made for another budget"):
        _search(ctx10[4], budget="2x", storage=storage, study="s", n_trials=1)
    with pytest.raises(PlannerError, match="made for another search sampler"):
        _search(ctx10[4], storage=storage, study="s", n_trials=1, sampler="tpe")
    tiny = load_runner("tiny:dit")
    tiny_sampler = tiny.resolve(Sampler("default", 4, 4.0))
    tiny_profile = profile_model(tiny, tiny_sampler, samples=1, lags=2, costs="flops")
    tiny_context = SearchContext.build(tiny, tiny_sampler, tiny_profile, samples=1)
    with pytest.raises(PlannerError, match="made for another model"):
        _search(tiny_context, storage=storage, study="s", n_trials=1)
    # a study made outside the planner, with a trial in it
    with _quiet():
        foreign = optuna.create_study(storage=open_storage(storage), study_name="foreign", directions=["minimize"] * 2)
        foreign.enqueue_trial({"interval": 2})
    with pytest.raises(PlannerError, match="not made by planner search"):
        _search(ctx10[4], storage=storage, study="foreign", n_trials=1)


def test_stale_running_trials_of_dead_workers_fail_and_live_ones_stay(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize", "minimize"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t_dead, t_live, t_done = study.ask(), study.ask(), study.ask()
    t_dead.set_user_attr("worker", {"host": os.uname().nodename, "pid": dead.pid})
    t_live.set_user_attr("worker", {"host": os.uname().nodename, "pid": os.getppid()})
    study.tell(t_done, [0.5, 0.1])
    assert fail_stale_trials(study) == [t_dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states == {t_dead.number: TrialState.FAIL, t_live.number: TrialState.RUNNING, t_done.number: TrialState.COMPLETE}
    assert fail_stale_trials(study, stale_after=0.0) == [t_live.number]  # too old: another host's worker died
    assert study.trials[t_done.number].state == TrialState.COMPLETE


# --------------------------------------------------------------------------- workers


def _worker(profile_dir: Path, cwd: Path, storage: str, out: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "planner", "search", "--strategy", "optuna", "--profile", str(profile_dir),
           "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--calib-samples", "2", "--budget", "1.5x",
           "--storage", storage, "--study", "shared", "--out", out, "--json", "--param", "baselines=none", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete_trials(storage_url: str, reader=None) -> list:
    """The COMPLETE trials of the shared study (none while it does not exist yet)."""
    with _quiet():
        try:
            trials = optuna.load_study(study_name="shared", storage=reader or storage_url).trials
        except KeyError:
            return []
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _wait_for_trials(worker: subprocess.Popen, storage_url: str, n: int, reader=None) -> list:
    """Poll the study until it holds ``n`` complete trials (or the worker ends): worker startup
    (importing torch and diffusers) takes seconds, the trials a tenth of one each."""
    deadline = time.monotonic() + 240
    done = []
    while time.monotonic() < deadline and worker.poll() is None:
        done = _complete_trials(storage_url, reader)
        if len(done) >= n:
            break
        time.sleep(0.1)
    return done


# A worker that claims queued trials until none is left: it waits for a common start time (so that
# two of them overlap), records who told each trial, and prints the numbers it claimed.
_CLAIMER = """
import json, os, sys, time
import optuna
from planner.search._optuna_storage import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="q", storage=open_storage(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
claimed, lost = [], []
while True:
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    if "queued" not in trial.user_attrs:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        break
    claimed.append(trial.number)
    time.sleep(0.005)
    try:
        trial.set_user_attr("by", os.getpid())
        study.tell(trial, x)
    except Exception:
        lost.append(trial.number)
print(json.dumps({"pid": os.getpid(), "claimed": claimed, "lost": lost}))
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_each_queued_trial_is_claimed_by_one_worker(tmp_path, kind):
    # Optuna claims a queued trial by a read and a write; on SQLite both workers could read WAITING
    # and run the same trial (CI saw it: the loser failed on a finished trial). See open_storage.
    url = f"sqlite:///{tmp_path / 'q.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'q.log'}"
    queued = 60
    with _quiet():
        study = optuna.create_study(study_name="q", storage=open_storage(url))
        for i in range(queued):
            study.enqueue_trial({"x": i / queued}, user_attrs={"queued": True})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = str(time.time() + 4)
    workers = [subprocess.Popen([sys.executable, "-c", _CLAIMER, url, start], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for w in workers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        results.append(json.loads(out))
    a, b = (set(r["claimed"]) for r in results)
    assert not a & b and len(a) + len(b) == queued  # every queued trial ran once
    assert results[0]["lost"] == results[1]["lost"] == []
    assert a and b  # both workers took part
    with _quiet():
        told = {t.number: t.user_attrs["by"] for t in optuna.load_study(study_name="q", storage=open_storage(url)).trials
                if t.state == TrialState.COMPLETE}
    assert told == {n: r["pid"] for r in results for n in r["claimed"]}


def test_sqlite_transactions_take_the_write_lock_when_they_begin(tmp_path):
    # what makes the claim above atomic: a transaction that has only read still holds the write lock
    import sqlite3

    path = tmp_path / "lock.db"
    storage = open_storage(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with storage.engine.begin() as connection:
        connection.exec_driver_sql("SELECT 1")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # free again once the transaction ends
    other.execute("ROLLBACK")


@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_two_worker_processes_share_one_sqlite_study(ctx10, tmp_path):
    # worker 1: a `planner search` process; worker 2: this test process, joining while worker 1 runs
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    other = _worker(ctx10[3], tmp_path, storage, "w1.json", "--n-trials", "24")
    assert len(_wait_for_trials(other, storage, 1, reader=open_storage(storage))) >= 1, other.communicate()[1]
    _, plan = _search(ctx10[4], storage=storage, study="shared", n_trials=6)
    overlapped = other.poll() is None
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    done = _complete_trials(storage)
    assert len(done) == 30 and len({t.number for t in done}) == 30
    by_pid = {pid: sum(t.user_attrs["worker"]["pid"] == pid for t in done) for pid in (other.pid, os.getpid())}
    assert by_pid == {other.pid: 24, os.getpid(): 6}  # both workers' trials, in one study
    assert overlapped  # the two really ran at the same time
    assert json.loads(out)["params"]["trials_complete"] == 30  # worker 1 ended last and chose among all trials
    assert plan.provenance.params["trials_complete"] >= 7  # worker 2 saw worker 1's trials too


@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_a_killed_worker_resumes_without_losing_trials(ctx10, tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    first = _worker(ctx10[3], tmp_path, storage, "p.json", "--n-trials", "500", "--param", "total_trials=24")
    _wait_for_trials(first, storage, 4, reader=open_storage(storage))
    assert first.poll() is None, "the worker ended before it could be killed: " + first.communicate()[1]
    first.send_signal(signal.SIGKILL)
    first.communicate()
    with _quiet():
        trials = optuna.load_study(study_name="shared", storage=open_storage(storage)).trials
    before = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert 4 <= len(before) < 24

    # the restart (same storage, study and target; in this process, to spare a second startup)
    strategy, plan = _search(ctx10[4], storage=storage, study="shared", n_trials=500, total_trials=24)
    after = strategy.study.trials
    complete = {t.number: t.values for t in after if t.state == TrialState.COMPLETE}
    assert all(complete.get(n) == v for n, v in before.items())  # no finished trial lost or changed
    assert len(complete) == 24 and strategy.ran == 24 - len(before)  # it ran exactly what was missing
    assert strategy.stale_failed == running  # the killed worker's unfinished trial was marked failed
    assert not [t for t in after if t.state == TrialState.RUNNING]
    assert plan.provenance.params["trials_complete"] == 24


class _quiet:
    def __enter__(self):
        self.verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc):
        optuna.logging.set_verbosity(self.verbosity)
