"""Distributed ``optuna`` search on a real PostgreSQL server (started by the test, see postgres.py):
``planner search`` worker processes sharing one study, one of them killed mid-trial; and bad
PostgreSQL URLs refused in one line. The password of the storage URL must never come out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from postgres import free_port, running_server  # tests/postgres.py

from planner.cli import main
from planner.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"
STUDY = "distributed"
TOTAL = 12  # the study's target of complete trials
EACH = 3  # trials each of the two surviving first workers runs: together they leave the study unfinished
TORCH_THREADS = 1  # see conftest.py (the in-process CLI runs below)
DEADLINE_S = 300  # generous: worker start-up (torch, diffusers) is slow on a loaded 2-core machine


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server for this module's tests (tests/postgres.py)."""
    with running_server() as server:
        yield server


def _worker(url: str, cwd: Path, out: str, n_trials: int, *extra: str) -> subprocess.Popen:
    """A ``planner search`` worker process on the shared study."""
    cmd = [sys.executable, "-m", "planner", "search", "--strategy", "optuna", "--budget", "2x",
           "--storage", url, "--study", STUDY, "--n-trials", str(n_trials), "--param", f"total_trials={TOTAL}",
           "--profile", str(PROFILE), "--calib-samples", "2", "--out", out, "--quiet", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(worker: subprocess.Popen) -> tuple[str, str]:
    """Wait for a worker; its stdout and stderr."""
    try:
        return worker.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        _, err = worker.communicate()
        pytest.fail(f"worker {worker.pid} did not end within {DEADLINE_S} s; stderr: {err[-2000:]}")


class _Study:
    """Reads the shared study the way any Optuna client would, once a worker has made it (reading
    earlier would race the workers that create the database tables)."""

    def __init__(self, url: str):
        self.url = url
        self.storage = None

    def exists(self) -> bool:
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                found = connection.execute(sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name"),
                                           {"name": STUDY}).first()
            return found is not None
        except sqlalchemy.exc.ProgrammingError:  # no tables yet
            return False
        finally:
            engine.dispose()

    def trials(self) -> list:
        """All trials of the study (none while it does not exist yet)."""
        if self.storage is None:
            if not self.exists():
                return []
            self.storage = optuna.storages.RDBStorage(self.url, skip_table_creation=True)
        return optuna.load_study(study_name=STUDY, storage=self.storage).trials

    def close(self) -> None:
        if self.storage is not None:
            self.storage.remove_session()
            self.storage.engine.dispose()


@pytest.fixture
def shared_study(postgres_server):
    """A reader of the workers' study on the test server; its connections closed at teardown."""
    study = _Study(postgres_server.url)
    yield study
    study.close()


def _pid(trial) -> int | None:
    return (trial.user_attrs.get("worker") or {}).get("pid")


def _complete(trials) -> dict[int, tuple]:
    return {t.number: tuple(t.values) for t in trials if t.state == TrialState.COMPLETE}


def _kill_mid_trial(victim: subprocess.Popen, study: _Study, min_complete: int) -> tuple[int, list]:
    """SIGKILL ``victim`` while it runs a trial, once the study holds ``min_complete`` complete
    trials. The victim is stopped (SIGSTOP) before the study is read, so that the trial seen
    RUNNING is the one it is killed in; it is let go on when it is between trials. Returns the
    killed trial's number and the study's trials right after the kill."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and victim.poll() is None:
        trials = study.trials()
        if len(_complete(trials)) >= min_complete and \
                any(t.state == TrialState.RUNNING and _pid(t) == victim.pid for t in trials):
            victim.send_signal(signal.SIGSTOP)
            trials = study.trials()
            running = [t.number for t in trials if t.state == TrialState.RUNNING and _pid(t) == victim.pid]
            if running:
                victim.kill()
                victim.wait()
                return running[0], study.trials()
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    _, err = victim.communicate(timeout=DEADLINE_S) if victim.poll() is not None else ("", "")
    pytest.fail(f"the worker to kill never ran a trial with {min_complete} complete ones in the study "
                f"(exit status {victim.poll()}): {err[-2000:]}")


@pytest.fixture
def workers():
    """Registers worker processes; at teardown (a failed test too) the ones still running are
    killed, so none outlives the test or holds the server."""
    started = []

    def register(worker: subprocess.Popen) -> subprocess.Popen:
        started.append(worker)
        return worker

    yield register
    for worker in started:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


def _check_clean(name: str, worker: subprocess.Popen, out: str, err: str, password: str) -> dict:
    """A worker that ended well: status 0, no error or traceback (Optuna's for a trial told twice
    included), a JSON report; returns the report."""
    assert worker.returncode == 0, f"{name}: {err[-3000:]}"
    for words in ("Traceback", "planner: error", "has already finished", "Error"):
        assert words not in err, f"{name}: {err[-3000:]}"
    assert password not in out and password not in err
    return json.loads(out)


@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_workers_share_a_postgresql_study_and_a_killed_ones_trial_fails(postgres_server, shared_study, tmp_path,
                                                                         workers):
    url, password, study = postgres_server.url, postgres_server.password, shared_study
    # Three workers start together on an empty database (they race to create its tables and the
    # study); two run EACH trials, the third is killed in the middle of one of its trials.
    first = {name: workers(_worker(url, tmp_path, f"{name}.json", n))
             for name, n in (("a", EACH), ("b", EACH), ("c", 500))}
    killed, at_kill = _kill_mid_trial(first["c"], study, min_complete=2)
    outputs = {"c": first["c"].communicate()}
    for name in ("a", "b"):
        outputs[name] = _finish(first[name])
    reports = {name: _check_clean(name, first[name], *outputs[name], password) for name in ("a", "b")}
    pid = {name: w.pid for name, w in first.items()}

    before_kill = _complete(at_kill)
    before_rerun = study.trials()
    complete_before_rerun = _complete(before_rerun)
    assert len(complete_before_rerun) < TOTAL  # the re-run below has work left
    assert {n: v for n, v in complete_before_rerun.items() if n in before_kill} == before_kill
    assert before_rerun[killed].state in (TrialState.RUNNING, TrialState.FAIL)  # FAIL: b or a joined after the kill

    # The killed worker's command, re-run: marks the dead worker's trial failed, finishes the study.
    rerun = workers(_worker(url, tmp_path, "d.json", 500))
    outputs["d"] = _finish(rerun)
    reports["d"] = _check_clean("d", rerun, *outputs["d"], password)
    pid["d"] = rerun.pid

    trials = study.trials()
    complete = _complete(trials)
    assert len(complete) == TOTAL  # the study completed, exactly: the re-run worker was alone at the end
    assert {n: complete.get(n) for n in complete_before_rerun} == complete_before_rerun  # no finished trial lost
    assert trials[killed].state == TrialState.FAIL and trials[killed].values is None
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    ran = {name: sum(_pid(t) == p for t in trials if t.state == TrialState.COMPLETE) for name, p in pid.items()}
    assert ran["a"] == ran["b"] == EACH  # each ran its --n-trials, every one of them told once (exit 0, no error)
    assert ran["d"] == TOTAL - len(complete_before_rerun) >= 1  # the re-run ran exactly what was missing
    assert ran["c"] == sum(_pid(t) == pid["c"] for t in at_kill if t.state == TrialState.COMPLETE)
    assert sum(ran.values()) == TOTAL
    assert {t.state for t in trials if _pid(t) == pid["c"] and t.number != killed} <= {TrialState.COMPLETE}
    assert reports["d"]["params"]["trials_complete"] == TOTAL  # the last worker chose among every trial

    # Plans: one per finished worker, loadable, with the storage recorded without its password.
    assert not (tmp_path / "c.json").exists()  # the killed worker wrote nothing
    for name in ("a", "b", "d"):
        plan = load_plan(tmp_path / f"{name}.json")
        assert plan.provenance.params["study"] == STUDY
        assert plan.provenance.params["storage"] == url.replace(password, "***")
    assert (tmp_path / "d" / "front.json").is_file()
    # The password is nowhere: not in any output, plan or front folder.
    for name, (out, err) in outputs.items():
        assert password not in out and password not in err, name
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 9  # three plans and their front folders
    for path in files:
        assert password.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("case", ["wrong password", "no server on the port"])
def test_a_bad_postgresql_url_is_a_one_line_error(postgres_server, tmp_path, capfd, case):
    server = postgres_server
    bad = "pw-wrong-8d1f0c" if case == "wrong password" else server.password
    url = server.url_with(password=bad) if case == "wrong password" else server.url_with(port=free_port())
    out = tmp_path / "p.json"
    status = main(["search", "--strategy", "optuna", "--budget", "2x", "--storage", url, "--study", STUDY,
                   "--n-trials", "2", "--profile", str(PROFILE), "--calib-samples", "2", "--out", str(out), "--quiet"])
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("planner: error: cannot open storage") and "***" in lines[0]
    reason = "password authentication failed" if case == "wrong password" else "refused"
    assert reason in lines[0]
    assert bad not in captured.err and bad not in captured.out and server.password not in captured.err
    assert not out.exists() and not out.with_suffix("").exists()
