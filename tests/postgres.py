"""A real PostgreSQL server for tests: ``with running_server() as server:`` starts one in a
temporary folder on a free localhost port and gives a :class:`PostgresServer` (its SQLAlchemy URL
carries a password); a test module wraps it in a fixture.

How: ``initdb`` (password authentication, scram-sha-256, for TCP and the unix socket) into a fresh
folder, then ``pg_ctl -w start`` with the server listening on 127.0.0.1 only and its unix socket in
that folder, then ``CREATE DATABASE``. Teardown (also after a failed test): ``pg_ctl stop -m
fast`` and the folder removed. PostgreSQL refuses to run as root; under root (CI) the server's
processes run as the ``postgres`` system user the Debian package creates (or ``nobody``), and the
folder is theirs. The password never appears on a command line (``initdb --pwfile``, a file
removed once read).

A test is skipped only when the server binaries cannot be found (``apt-get install postgresql``)
or the machine will not let a server run (no unprivileged user under root, no shared memory);
any other failure to start is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# psycopg2 named explicitly: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (version 3).
DRIVER = "postgresql+psycopg2"
USER = "planner"
DATABASE = "studies"
SERVER_USERS = ("postgres", "nobody")  # who runs the server when the tests run as root
START_TRIES = 3  # a free port can be taken between picking it and the server binding it
# Lines of a server log that mean the machine, not the code, stopped the server from starting.
ENVIRONMENT_ERRORS = ("could not create shared memory segment", "could not create semaphores",
                      "No space left on device", "could not create any TCP/IP sockets")
# A test server: durability across an OS crash does not matter, speed does.
SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "40",
            "shared_buffers": "32MB", "log_min_messages": "warning"}


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens and how to log in to its database."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)  # kept out of failure reports
    database: str
    folder: Path

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database (psycopg2 driver), password included."""
        return self.url_with()

    def url_with(self, password: str | None = None, port: int | None = None) -> str:
        """The same URL with another password or port (for tests of bad URLs)."""
        return (f"{DRIVER}://{self.user}:{password or self.password}@{self.host}:{port or self.port}"
                f"/{self.database}")


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (PATH first, then the newest
    /usr/lib/postgresql/*/bin), or None."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # Debian links them from /usr/local/bin
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: _version(Path(p).parent.name), reverse=True)]
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_account() -> pwd.struct_passwd | None:
    """Who runs the server: this process's user, or an unprivileged system user under root (None
    when there is none)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in SERVER_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class _Server:
    """Runs the server's commands as ``account`` in ``folder``."""

    def __init__(self, bin_dir: Path, folder: Path, account: pwd.struct_passwd):
        self.bin_dir, self.folder, self.account = bin_dir, folder, account
        self.data = folder / "data"
        self.log = folder / "server.log"

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a server binary as the server's user; no password on its command line."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.folder),
               "USER": self.account.pw_name}
        as_user = {}
        if os.geteuid() != self.account.pw_uid:
            as_user = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        result = subprocess.run([str(self.bin_dir / tool), *args], cwd=self.folder, env=env, capture_output=True,
                                text=True, timeout=120, check=False, **as_user)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
        return result

    def give(self, path: Path) -> None:
        """Hand ``path`` to the server's user (only root needs to)."""
        if os.geteuid() == 0:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def init(self, password: str) -> None:
        """A new cluster whose superuser ``USER`` logs in with ``password`` only."""
        pwfile = self.folder / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self.give(pwfile)
        try:
            self.run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                     "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, port: int) -> bool:
        """Start on ``port`` (127.0.0.1 only, unix socket in the folder); False when the port was taken."""
        conf = {**SETTINGS, "listen_addresses": "'127.0.0.1'", "port": str(port),
                "unix_socket_directories": f"'{self.folder}'"}
        with open(self.data / "postgresql.auto.conf", "a") as f:  # read last: overrides postgresql.conf
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        self.log.unlink(missing_ok=True)
        result = self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90", "start", check=False)
        if result.returncode == 0:
            return True
        log = self.log.read_text() if self.log.exists() else ""
        if "could not bind" in log or "Address already in use" in log:
            return False
        lines = [line for line in log.splitlines() if "FATAL" in line or "ERROR" in line] or log.splitlines()[-1:]
        reason = lines[-1].strip() if lines else (result.stderr or result.stdout).strip()
        if any(words in log for words in ENVIRONMENT_ERRORS):
            pytest.skip(f"PostgreSQL cannot start on this machine: {reason}")
        raise RuntimeError(f"pg_ctl start failed: {reason}")

    def stop(self) -> None:
        """Stop the server if it runs (fast: connections closed, transactions rolled back)."""
        if (self.data / "postmaster.pid").exists():
            result = self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop", check=False)
            if result.returncode != 0:
                self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)


def create_database(server: PostgresServer) -> None:
    """``CREATE DATABASE`` through the server's maintenance database, over TCP with the password."""
    try:
        import psycopg2
    except ImportError:
        pytest.fail("psycopg2 is missing: install the test extra (pip install -e '.[test]')")
    connection = psycopg2.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                                  dbname="postgres", connect_timeout=30)
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{server.database}"')
    finally:
        connection.close()


@contextlib.contextmanager
def running_server():
    """A PostgreSQL server of its own, stopped and removed on exit (see the module docstring);
    skips the calling test where the machine cannot have one."""
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin: apt-get install postgresql")
    account = server_account()
    if account is None:
        pytest.skip(f"running as root and no unprivileged user ({', '.join(SERVER_USERS)}) to run PostgreSQL as")
    # Not under pytest's tmp_path: its folders are private to this user, and the server's user must enter.
    folder = Path(tempfile.mkdtemp(prefix="planner-pg-"))
    server = _Server(bin_dir, folder, account)
    try:
        server.give(folder)
        password = "pw-" + secrets.token_hex(12)
        server.init(password)
        for _ in range(START_TRIES):
            port = free_port()
            if server.start(port):
                break
        else:
            raise RuntimeError(f"pg_ctl start failed {START_TRIES} times: every free port was taken before the server bound it")
        running = PostgresServer("127.0.0.1", port, USER, password, DATABASE, folder)
        create_database(running)
        yield running
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
