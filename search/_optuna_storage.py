"""Where an ``optuna`` study lives and who works on it: storages, the study's identity, workers.

Storages: ``sqlite:///FILE``, any SQLAlchemy database URL (``postgresql://user:pw@host/db``, needs
psycopg2) or ``journal:FILE`` (Optuna's JournalStorage on a file, also for NFS). Passwords never
leave :func:`redact`. A study records what it was made for (:func:`study_key`: model, sampler,
budget, search sampler, plan space, profile, calibration size) and refuses a worker that differs.
Killed workers: :func:`fail_stale_trials` marks as failed the RUNNING trials whose process is gone
(same host) or that started too long ago; complete trials are never touched.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from planner.errors import PlannerError
from planner.io import process_alive

STUDY_ATTR = "planner"
WORKER_ATTR = "worker"
DIRECTIONS = ("minimize", "minimize")
# What opening a storage or study may raise besides a missing driver: database errors (unreachable
# host, bad credentials, unwritable file), file errors, and Optuna's own (a schema of another version).
STORAGE_ERRORS = (SQLAlchemyError, OSError, ValueError, RuntimeError)
SCHEMA_RETRIES = 5
STORAGE_HELP = "use sqlite:///FILE, an SQLAlchemy database URL such as postgresql://user:pw@host/db, or journal:FILE"


def redact(url: str | None) -> str:
    """The storage URL fit for logs and files: the password hidden; ``memory`` for none."""
    if url is None:
        return "memory"
    if "://" in url:
        try:
            return make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            return url.split("://", 1)[0] + "://***"
    if "@" in url:  # not a URL, but it may still hold user:password@host
        return re.sub(r"[^@]*@", "***@", url, count=1)
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
        raise PlannerError(f"cannot read storage URL {redact(url)!r}: {STORAGE_HELP}")
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

        from planner.search._journal_lock import JournalLock

        # An absolute path and a lock a killed worker cannot turn into a hang (see _journal_lock).
        path = os.path.abspath(url[len("journal:"):])
        try:
            return JournalStorage(JournalFileBackend(path, lock_obj=JournalLock(path)))
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
        except ImportError as e:
            raise PlannerError(f"cannot open storage {redact(url)}: {missing_driver(url, e)}") from None
        except STORAGE_ERRORS as e:
            # Workers that start together on a fresh database race to create its tables; the loser
            # sees a duplicate-key or already-exists error and only has to open what the winner made.
            racing = isinstance(e, IntegrityError) or "already exists" in str(e) or "locked" in str(e)
            if not racing or attempt == SCHEMA_RETRIES:
                raise PlannerError(f"cannot open storage {redact(url)}: {_reason(e)}") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


def missing_driver(url: str, error: ImportError) -> str:
    """What to install (or write in the URL) when a database's driver is missing. SQLAlchemy picks a
    default driver per dialect (``postgresql://`` means psycopg 3 in SQLAlchemy 2.1, psycopg2 before),
    so the message names the module that failed to import and the two ways out."""
    dialect = make_url(url).get_backend_name()
    module = getattr(error, "name", None) or str(error)
    if dialect == "postgresql":
        return (f"its driver {module!r} is not installed: pip install 'psycopg[binary]', or pip install "
                "psycopg2-binary and write postgresql+psycopg2://...")
    return f"its {dialect} driver {module!r} is not installed"


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


def study_key(context, budget, space, search_sampler: str) -> dict[str, Any]:
    """What a study is made for; a worker whose key differs may not join it."""
    s = context.sampler
    cost = context.profile.cost.to_csv(index=False, float_format="%.6g").encode()
    return {
        "model": context.runner.spec,
        "fingerprint": context.runner.fingerprint(),
        "sampler": f"{s.scheduler} {s.steps} steps guidance {s.guidance:g}",
        "budget": budget.label(),
        "search_sampler": search_sampler,
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
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another joining worker failed it between our read and our write
            failed.append(t.number)
    return failed
