"""Apache Kafka for the embedded stack: found Java, fetched jars, and the one choice of embedded broker.

Kafka's jars (`org.apache.kafka:kafka_2.13` and its dependencies) come from Maven Central through `mvn`,
so Maven's own cache (~/.m2) is the download cache shared by every clone on a machine; they are then
copied to `<kafka dist dir>/<version>/libs` (under the data dir, never in git). `scripts/kafka fetch` and
`scripts/bootstrap` call `ensure_kafka`; nothing here runs a broker (see embedded.EmbeddedApacheKafka)."""

from __future__ import annotations

import argparse
import fcntl
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from site_activity.settings import Settings

BrokerKind = Literal["kafka", "tansu"]
MIN_JAVA = 17
# The SLF4J binding Kafka's own distribution ships: without it the broker's log4j2 config has no effect.
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>site-activity</groupId><artifactId>embedded-kafka</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


@lru_cache(maxsize=1)
def java_major() -> int | None:
    """The major version of `java` on PATH (17 for "17.0.15"), or None without a working Java."""
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def libs_dir(dist_dir: Path, version: str) -> Path:
    return dist_dir / version / "libs"


def is_fetched(dist_dir: Path, version: str) -> bool:
    return (dist_dir / version / ".complete").exists()


def can_run_kafka(dist_dir: Path, version: str) -> bool:
    """Java 17+ is there, and the jars are either fetched already or Maven can fetch them."""
    major = java_major()
    return (
        major is not None and major >= MIN_JAVA and (is_fetched(dist_dir, version) or shutil.which("mvn") is not None)
    )


def default_broker(dist_dir: Path, version: str) -> BrokerKind:
    """The embedded broker when none is configured: real Apache Kafka, which is what users run in
    production, wherever it can run here; Tansu (a pip wheel, no Java) only as the fallback."""
    return "kafka" if can_run_kafka(dist_dir, version) else "tansu"


def broker_kind(settings: Settings) -> BrokerKind:
    """The embedded broker to start: the setting, else this machine's default (looked up only here, so
    processes that never start a broker never probe for Java)."""
    if settings.embedded_broker is not None:
        return settings.embedded_broker
    return default_broker(settings.kafka_dist, settings.kafka_version)


def machine_settings(root: Path) -> Settings:
    """Settings() with the broker choice of this machine, and Kafka's jar cache anchored at project `root`
    (so tests and benchmarks share the fetched jars whatever data dir they run with)."""
    from site_activity.settings import Settings

    base = Settings()
    dist = base.kafka_dist if base.kafka_dist.is_absolute() else root / base.kafka_dist
    return base.model_copy(update={"kafka_dist_dir": dist})


def ensure_kafka(dist_dir: Path, version: str, quiet: bool = True) -> Path:
    """Fetches Kafka `version`'s jars into <dist_dir>/<version>/libs unless already there; returns that dir.
    Safe to call from concurrent processes (a file lock); raises RuntimeError when Java/Maven is missing or
    Maven fails (its output is in the message)."""
    root = (dist_dir / version).resolve()
    libs = libs_dir(dist_dir.resolve(), version)
    if is_fetched(dist_dir, version):
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_fetched(dist_dir, version):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(
                "Maven (mvn) is needed to fetch Apache Kafka; install it or use SITE_ACTIVITY_EMBEDDED_BROKER=tansu"
            )
        (root / "pom.xml").write_text(_POM.format(version=version, log4j=LOG4J_VERSION))
        if libs.exists():
            shutil.rmtree(libs)
        cmd = [
            mvn,
            "-B",
            "-f",
            str(root / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        if quiet:
            cmd.insert(1, "-q")
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"mvn could not fetch Kafka {version}:\n{(proc.stdout or '')[-3000:]}{proc.stderr or ''}"
            )
        (root / ".complete").touch()
    return libs


def main(argv: list[str] | None = None) -> int:
    from site_activity.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="scripts/kafka", description="Apache Kafka for the embedded stack")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch the Kafka jars with Maven (skipped when there already)")
    fetch.add_argument("--if-java", action="store_true", help="do nothing (exit 0) when Java 17+ is missing")
    start = sub.add_parser("start", help="run KRaft nodes on loopback in the foreground until Ctrl-C")
    start.add_argument("--nodes", type=int, default=settings.embedded_kafka_nodes)
    sub.add_parser("default", help="print the embedded broker this machine uses by default")
    args = parser.parse_args(argv)

    dist, version = settings.kafka_dist, settings.kafka_version
    if args.command == "default":
        print(broker_kind(settings))
        return 0
    if args.command == "fetch":
        if args.if_java and not can_run_kafka(dist, version):
            print(f"no Java {MIN_JAVA}+ and Maven here: the embedded stack will use Tansu", file=sys.stderr)
            return 0
        if not is_fetched(dist, version):
            print(
                f"fetching Apache Kafka {version} with Maven into {libs_dir(dist, version)} (first run only)...",
                file=sys.stderr,
            )
        ensure_kafka(dist, version)
        return 0
    return _run_foreground(settings, args.nodes)


def _run_foreground(settings: Settings, nodes: int) -> int:
    import signal
    import threading
    import time

    from dev_stack.embedded import EmbeddedApacheKafka

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = EmbeddedApacheKafka.from_settings(settings, settings.data_dir / "kafka-data", nodes=nodes)
    started = time.monotonic()
    cluster.start()
    print(
        f"Apache Kafka {settings.kafka_version}: {nodes} KRaft node(s) at {cluster.bootstrap} "
        f"(ready in {time.monotonic() - started:.1f}s; logs in {cluster.data_dir}); Ctrl-C stops",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
